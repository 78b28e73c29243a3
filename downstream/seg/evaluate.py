"""Evaluate a segmentation model on labelled cases: metrics table, CSV and overlay PNGs."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from downstream.seg.config import SegDataConfig, SegModelConfig, SegTrainConfig
from downstream.seg.data import SegTask, preprocess_case, spacing_of
from downstream.seg.inference import predict_logits
from downstream.seg.metrics import case_metrics, summarize
from downstream.seg.model import build_seg_model
from engine.checkpoint import load_payload
from twinview.errors import DataError, display_path

OVERLAY_CASES = 4
_MODEL_KEYS = ("arch", "encoder", "unet_channels", "spatial_dims", "in_channels", "out_channels", "labels",
               "task", "kind", "modality", "preprocessing")
COLOURS = np.array([[0, 0, 0], [230, 60, 60], [60, 140, 255], [250, 200, 40], [80, 220, 120]],
                   dtype=np.float32)


def model_file(run: str | Path) -> Path:
    """The ``model.pt`` of a run folder (or the file given); ``DataError`` naming a missing one."""
    from twinview.errors import missing_path

    path = Path(run)
    if not path.is_dir() and not path.exists():
        raise missing_path(path, "no such run folder or model file")
    path = path / "model.pt" if path.is_dir() else path
    if not path.is_file():
        raise missing_path(path, "no trained model (a finished `twinview seg train` run writes model.pt)")
    return path


def load_model(run: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The trained network of a run folder (or its ``model.pt``) and its metadata; ``DataError`` naming
    the file when it is missing or no twinview segmentation model."""
    path = model_file(run)
    payload = load_payload(path, ("model", "model_config"), "segmentation model", map_location=device)
    meta = payload["model_config"]
    missing = [k for k in _MODEL_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(path, f"not a twinview segmentation model file: its model_config lacks {missing} "
                              "(a re-ID model?)")
    mcfg = SegModelConfig(arch=meta["arch"], encoder=meta["encoder"], unet_channels=meta["unet_channels"])
    model = build_seg_model(mcfg, meta["spatial_dims"], meta["in_channels"], meta["out_channels"])
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), meta


def data_config_from(meta: dict[str, Any], path: str = "") -> SegDataConfig:
    """The preprocessing a model was trained with, as a data config (for prediction on new data).

    Reads the model card's vocabulary and, for models trained before it, the older one."""
    p = meta["preprocessing"]
    if "intensity" in p:
        intensity = p["intensity"]
        normalize = {"zscore_nonzero": "zscore"}.get(intensity["kind"], intensity["kind"])
        ct_window = intensity.get("window", SegDataConfig().ct_window)
        slice_axis = p["slice_axis"] if p["slice_axis"] is not None else SegDataConfig().slice_axis
        roi = meta["roi"]
    else:
        normalize, ct_window, slice_axis, roi = p["normalize"], p["ct_window"], p["slice_axis"], p["roi"]
    layout = meta.get("layout", {})  # file-name patterns and declared classes of the training layout
    return SegDataConfig(path=path, kind=meta["kind"], spatial_dims=meta["spatial_dims"],
                         slice_axis=slice_axis, roi=list(roi), orientation=p["orientation"] or "",
                         spacing=p["spacing"], normalize=normalize, ct_window=list(ct_window),
                         image=list(layout.get("image", [])), label=layout.get("label", ""),
                         labels=labels_of(meta) if layout else {}, mask_suffix=layout.get("mask_suffix"),
                         mask_values={int(k): int(v) for k, v in layout.get("mask_values", {}).items()})


def labels_of(meta: dict[str, Any]) -> dict[int, str]:
    return {int(k): v for k, v in meta["labels"].items()}


def evaluate_cases(model: nn.Module, meta: dict[str, Any], task: SegTask, data: SegDataConfig,
                   case_ids: list[str], out_dir: Path, device: torch.device, train: SegTrainConfig,
                   amp_dtype: torch.dtype | None = None, csv_name: str = "test_metrics.csv",
                   progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-case metrics (written to ``out_dir/csv_name``), their means, and overlays of a few cases."""
    from tqdm.auto import tqdm

    model.to(device)
    labels = labels_of(meta)
    rows: list[dict[str, Any]] = []
    for i, case_id in enumerate(tqdm(case_ids, desc="evaluate", unit="case", disable=not progress)):
        case = preprocess_case(task.case(case_id), task, data)
        logits = predict_logits(model, case["image"], meta["spatial_dims"], data.roi, data.slice_axis,
                                train.sw_batch_size, train.overlap, amp_dtype)
        pred = logits.argmax(0).numpy()
        truth = case["label"].as_tensor()[0].numpy().astype(np.int64)
        rows.append({"case": case_id, **case_metrics(pred, truth, labels, spacing_of(case["image"]))})
        if i < OVERLAY_CASES:
            image = case["image"].as_tensor().numpy()
            save_overlay(image, pred, out_dir / "overlays" / f"{case_id}.png", data.slice_axis, truth)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / csv_name).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows, summarize(rows)


def metrics_table(summary: dict[str, float], labels: dict[int, str]) -> str:
    """A Markdown table: Dice and HD95 per class and their means."""
    names = [labels[c] for c in sorted(labels) if c > 0]
    lines = ["| structure | Dice | HD95 (mm) | volume pred (mL) | volume true (mL) |",
             "|---|---|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {summary[f'dice_{n}']:.3f} | {summary[f'hd95_{n}']:.2f} | "
                     f"{summary[f'volume_ml_pred_{n}']:.3f} | {summary[f'volume_ml_true_{n}']:.3f} |")
    lines.append(f"| mean | {summary['dice_mean']:.3f} | {summary['hd95_mean']:.2f} | | |")
    return "\n".join(lines)


def _slices_to_show(mask: np.ndarray, axis: int, n: int = 3) -> list[int]:
    """The ``n`` slices along ``axis`` with the most foreground (the middle ones when there is none)."""
    if mask.ndim == 2:
        return [0]
    other = tuple(a for a in range(3) if a != axis)
    counts = (mask > 0).sum(axis=other)
    if counts.max() == 0:
        mid = mask.shape[axis] // 2
        return sorted({max(0, min(mask.shape[axis] - 1, mid + k)) for k in (-2, 0, 2)})
    return sorted(np.argsort(-counts, kind="stable")[:n].tolist())


def _rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) in [0, 1], robustly scaled."""
    x = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    low, high = np.percentile(x, [1, 99])
    return np.clip((np.moveaxis(x, 0, -1) - low) / max(high - low, 1e-6), 0, 1)


def save_overlay(image: np.ndarray, pred: np.ndarray, out: Path, slice_axis: int,
                 truth: np.ndarray | None = None) -> Path:
    """PNG: image slices with the prediction filled in colour and the ground truth outlined in white."""
    from matplotlib.figure import Figure
    from scipy import ndimage

    idx = _slices_to_show(truth if truth is not None and truth.any() else pred, slice_axis)
    fig = Figure(figsize=(3 * len(idx), 3.2), dpi=100)
    for k, s in enumerate(idx):
        def take(a: np.ndarray, ch: int, s: int = s) -> np.ndarray:
            return a if a.ndim == 2 + ch else np.take(a, s, axis=slice_axis + ch)

        rgb = _rgb(take(image, 1))
        p = take(pred, 0)
        colour = COLOURS[np.clip(p, 0, len(COLOURS) - 1)] / 255.0
        blend = np.where((p > 0)[..., None], 0.55 * rgb + 0.45 * colour, rgb)
        if truth is not None:
            t = take(truth, 0)
            edge = (t > 0) & ~ndimage.binary_erosion(t > 0)
            blend[edge] = 1.0
        ax = fig.add_subplot(1, len(idx), k + 1)
        ax.imshow(blend, interpolation="nearest")
        ax.set_title(f"slice {s}" if pred.ndim == 3 else "image", fontsize=9)
        ax.axis("off")
    outline = ", ground truth (white outline)" if truth is not None else ""
    fig.suptitle(f"{display_path(out.stem)}: prediction (colour){outline}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out

