"""COCO box metrics (pycocotools' ``COCOeval``) for a detector on labelled images, and loading a run.

AP is averaged over IoU 0.50:0.95 (AP50 and AP75 at one IoU) with up to ``max_dets`` detections per
image: COCO's 100 would cap the recall on DSB2018 images holding hundreds of nuclei. Areas (for
AP_small, below 32^2 px) are box areas, since the boxes carry no masks. Metrics that have no ground
truth to measure (no small objects) are null in ``eval.json`` (COCO's -1).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from downstream.det.config import DetDataConfig, DetModelConfig
from downstream.det.data import load_det_image, to_tensor
from downstream.det.model import build_det_model
from engine.checkpoint import load_payload
from twinview.data.coco import DetImage
from twinview.errors import DataError

EVAL_FILE = "eval.json"
METRICS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
MODEL_KEYS = ("arch", "encoder", "norm", "trainable_layers", "anchor_sizes", "aspect_ratios", "min_size",
              "max_size", "image_mean", "image_std", "score_thresh", "detections_per_img", "fpn_channels",
              "box_batch_size_per_image")
# Keys that model files written before they existed lack; those files were built with the default.
_LATER_KEYS = ("fpn_channels", "box_batch_size_per_image")
_META_KEYS = (*(k for k in MODEL_KEYS if k not in _LATER_KEYS), "in_channels", "max_value", "category_ids",
              "labels")


def model_file(run: str | Path) -> Path:
    """The ``model.pt`` of a run folder (or the file given); ``DataError`` naming a missing one."""
    from twinview.errors import missing_path

    path = Path(run)
    if not path.exists():
        raise missing_path(path, "no such run folder or model file")
    path = path / "model.pt" if path.is_dir() else path
    if not path.is_file():
        raise missing_path(path, "no trained model (a finished `twinview det train` run writes model.pt)")
    return path


def rebuild(meta: dict[str, Any]) -> nn.Module:
    """The detector that ``meta`` (a model file's ``model_config``) describes, with random weights."""
    cfg = DetModelConfig(**{k: meta[k] for k in MODEL_KEYS if k in meta})
    return build_det_model(cfg, meta["in_channels"], len(meta["category_ids"]))[0]


def load_det_model(run: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The trained detector of a run folder (or its ``model.pt``/``best.pt``) in eval mode and its
    metadata; ``DataError`` naming the file when it is missing or no twinview detection model."""
    path = model_file(run)
    payload = load_payload(path, ("model", "model_config"), "detection model", map_location=device)
    meta = payload["model_config"]
    missing = [k for k in _META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(path, f"not a twinview detection model file: its model_config lacks {missing}")
    model = rebuild(meta)
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), meta


@torch.no_grad()
def detect(model: nn.Module, image: torch.Tensor, device: torch.device,
           amp_dtype: torch.dtype | None = None) -> dict[str, np.ndarray]:
    """Boxes (xyxy), scores and labels (1..K) for one ``C x H x W`` image, in its pixels."""
    was_training = model.training
    model.eval()
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        out = model([image.to(device)])[0]
    model.train(was_training)
    # RetinaNet scores class 0 (kept as background so that labels are 1..K, as in Faster R-CNN) like
    # any class; training never makes it positive, but an early model can still emit it
    keep = out["labels"] > 0
    found = {k: out[k][keep].cpu() for k in ("boxes", "scores", "labels")}
    return {k: (v if k == "labels" else v.float()).numpy() for k, v in found.items()}


def results_of(image_id: int, found: dict[str, np.ndarray], ids: list[int]) -> list[dict[str, Any]]:
    """COCO results entries (``bbox`` as ``[x, y, w, h]``, original category ids) of one image."""
    rows = []
    for box, score, label in zip(found["boxes"], found["scores"], found["labels"], strict=True):
        x0, y0, x1, y1 = (float(v) for v in box)
        rows.append({"image_id": int(image_id), "category_id": int(ids[int(label) - 1]),
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    return rows


def coco_ground_truth(images: list[DetImage], categories: dict[int, str]) -> dict[str, Any]:
    """A COCO dict of ``images``' boxes (area = box area, ids from 1)."""
    annotations = []
    for image in images:
        for box, label in zip(image.boxes.astype(np.float32), image.labels, strict=True):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({"id": len(annotations) + 1, "image_id": int(image.id),
                                "category_id": int(label), "bbox": [float(box[0]), float(box[1]), w, h],
                                "area": w * h, "iscrowd": 0})
    return {"images": [{"id": int(i.id), "width": i.width, "height": i.height} for i in images],
            "annotations": annotations,
            "categories": [{"id": k, "name": v} for k, v in sorted(categories.items())]}


def coco_metrics(truth: dict[str, Any], results: list[dict[str, Any]], max_dets: int = 100
                 ) -> dict[str, float | None]:
    """AP, AP50, AP75 and AP by size (None where COCO has nothing to measure: -1) with pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = truth
        gt.createIndex()
        if not results:  # loadRes refuses an empty list; nothing found is AP 0 wherever there is truth
            return {k: (0.0 if truth["annotations"] else None) for k in METRICS}
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # [IoU, recall, category, area, maxDets]
    areas = ev.params.areaRngLbl  # all, small, medium, large
    ious = list(np.round(ev.params.iouThrs, 2))

    def ap(iou: float | None = None, area: str = "all") -> float | None:
        p = precision[:, :, :, areas.index(area), -1]
        if iou is not None:
            p = p[ious.index(iou)]
        p = p[p > -1]
        return float(p.mean()) if p.size else None

    return {"AP": ap(), "AP50": ap(0.5), "AP75": ap(0.75), "AP_small": ap(area="small"),
            "AP_medium": ap(area="medium"), "AP_large": ap(area="large")}


def evaluate_images(model: nn.Module, meta: dict[str, Any], images: list[DetImage],
                    categories: dict[int, str], device: torch.device, amp_dtype: torch.dtype | None = None,
                    progress: bool = False) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """COCO metrics of ``model`` on labelled ``images`` and its results (COCO results entries)."""
    from tqdm.auto import tqdm

    results: list[dict[str, Any]] = []
    for image in tqdm(images, desc="evaluate", unit="image", disable=not progress):
        pixels = to_tensor(load_det_image(image.path, meta["in_channels"], meta["max_value"]))
        results += results_of(image.id, detect(model, pixels, device, amp_dtype), meta["category_ids"])
    truth = coco_ground_truth(images, categories)
    return coco_metrics(truth, results, meta["detections_per_img"]), results


def write_eval(out_dir: Path, metrics: dict[str, float | None], results: list[dict[str, Any]],
               extra: dict[str, Any]) -> Path:
    """``eval.json`` (metrics and what they were measured on) and ``results.json`` (COCO results)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results) + "\n")
    path = out_dir / EVAL_FILE
    path.write_text(json.dumps({**metrics, **extra}, indent=2) + "\n")
    return path


def evaluate_run(run: Path, out: Path, data: str | None = None, split: str | None = None,
                 device: str = "auto") -> dict[str, Any]:
    """Metrics of a run on a split of its own data (``test`` by default, ``val``, ``train``, ``all``) or
    on all images of ``data`` (a COCO JSON file or a DSB2018 folder); writes ``out/eval.json`` and
    ``out/results.json``."""
    from downstream.det.config import DetConfig
    from downstream.det.data import read_det_set, select
    from engine.device import select_device
    from twinview.config import load_config
    from twinview.errors import check_output

    out = Path(out)
    check_output(out, [model_file(run)], kind="evaluation folder")
    dev = select_device(device)
    model, meta = load_det_model(run, dev)
    run_dir = model_file(run).parent
    data_cfg: DetDataConfig = load_config(DetConfig, run_dir / "config.yaml").data
    split = split or ("all" if data else "test")
    if data:
        data_cfg.path = str(data)
        data_cfg.kind = "coco" if Path(data).is_file() else "dsb2018"
        data_cfg.image_root = ""
    check_output(out, [data_cfg.path], kind="evaluation folder")
    det_set = read_det_set(data_cfg)
    if split == "all":
        images = det_set.images
    else:
        split_file = run_dir / "split.json"
        ids = json.loads(split_file.read_text())[split]
        if not ids:
            raise DataError(split_file, f"the {split} split is empty")
        images = select(det_set, ids)
    metrics, results = evaluate_images(model, meta, images, det_set.categories, dev, progress=True)
    write_eval(out, metrics, results, {"images": len(images), "split": split, "data": data_cfg.path})
    return metrics

