"""``twinview export``: a run's network as one self-contained ONNX file that carries its model card.

The file holds the whole graph and its weights (no ``.onnx.data`` beside it) with a dynamic batch axis;
spatial axes stay at the size the model card gives (the crop size, or the segmentation patch, around
which sliding windows run outside the network). ``metadata_props["twinview_model_card"]`` holds the run's
model card with an ``export`` section: opset, input and output names and shapes, what the output means,
and the largest absolute difference between onnxruntime and torch on a batch of real-shaped input,
measured at export. Above the tolerance the export fails and writes nothing.

A detector (Faster R-CNN or RetinaNet) exports differently: torch.export cannot trace torchvision's
detectors, so the TorchScript exporter writes it, taking one image ``(C, height, width)`` in [0, 1] (pixels
divided by the card's ``max_value``; the detector's own transform subtracts the mean and divides by the
std inside the graph) with both spatial axes dynamic, and giving ``boxes`` (N, 4, xyxy in input pixels),
``labels`` (N, 1..K) and ``scores`` (N). Parity is checked on the export example and on two images of other
sizes: the detections scoring at least :data:`DET_SCORE` must pair up one to one (same label) with boxes
within ``10 x tolerance`` pixels and scores within ``tolerance``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.checkpoint import load_payload
from twinview.errors import OutputError, TwinviewError, display_path, missing_path
from twinview.model_card import (
    CARD_FILE,
    ONNX_CARD_KEY,
    card_from_metadata,
    check_weights,
    file_sha256,
    read_card,
)

TOLERANCE = 1e-4  # float32 parity between torch and onnxruntime
OUTPUTS = {"pretraining": "features: the encoder's globally pooled features, not normalised",
           "segmentation": "logits: class scores per pixel or voxel (softmax, then argmax over axis 1)",
           "reid": "embedding: BNNeck features, L2-normalise before comparing (cosine similarity)"}
DET_OUTPUTS = {"boxes": "boxes xyxy in the input image's pixels, sorted by score (highest first)",
               "labels": "labels 1..K: label k is category architecture.category_ids[k - 1]",
               "scores": "scores in [0, 1], above architecture.score_thresh"}
DET_EXAMPLE = (72, 88)  # (height, width) of the traced image: padded to 96 x 96 inside the graph
DET_SIZES = (DET_EXAMPLE, (100, 60), (45, 131))  # parity images: the example and two other sizes
DET_SCORE = 0.05  # detections compared at export score at least this
BOX_FACTOR = 10.0  # box coordinates (pixels) must agree within BOX_FACTOR x tolerance


class ExportError(TwinviewError):
    """The network does not export faithfully, or the output cannot be written."""


@dataclass
class Exported:
    path: Path
    task: str
    max_abs_diff: float
    card: dict[str, Any]


def _source(run: Path) -> tuple[Path, dict[str, Any]]:
    """The weights file of a run (``model.pt`` or ``encoder.pt``) and its model card (converted from the
    file's own metadata for runs written before model cards)."""
    if not run.exists():
        raise missing_path(run, "no such run folder or weights file")
    folder = run if run.is_dir() else run.parent
    if run.is_dir():
        found = [folder / n for n in ("model.pt", "encoder.pt") if (folder / n).is_file()]
        if not found:
            raise missing_path(folder, "no model.pt or encoder.pt here: not a finished twinview run")
        run = found[0]
    if (folder / CARD_FILE).is_file():
        card = read_card(folder / CARD_FILE)
        if card["weights"]["file"] == run.name:
            check_weights(card, folder)
            return run, card
    payload = load_payload(run, [("model", "model_config"), ("encoder", "encoder_config")], "model")
    if "encoder_config" in payload:
        kind = "encoder"
    elif "category_ids" in payload["model_config"]:
        kind = "detection"
    else:
        kind = "segmentation" if "arch" in payload["model_config"] else "reid"
    meta = payload.get("encoder_config") or payload["model_config"]
    return run, card_from_metadata(meta, kind, run.name, file_sha256(run), source=run)


def _network(weights: Path, card: dict[str, Any]) -> tuple[nn.Module, str | None]:
    """The network in eval mode, as the card describes it, on the CPU, and for a re-ID model the
    fingerprint that ``twinview reid index`` records (so an index can be matched to the exported file)."""
    if card["task"] == "segmentation":
        from downstream.seg.evaluate import load_model

        return load_model(weights)[0], None
    if card["task"] == "reid":
        from downstream.reid.evaluate import load_reid_model

        model, meta = load_reid_model(weights)
        return model, meta["model_id"]
    if card["task"] == "detection":
        from downstream.det.evaluate import load_det_model

        return load_det_model(weights)[0], None
    from pretrain.encoders import build_encoder

    encoder = build_encoder(card["architecture"]["name"], in_channels=card["in_channels"],
                            spatial_dims=card["spatial_dims"], small_stem=card["architecture"]["small_stem"])
    encoder.load_state_dict(load_payload(weights, ("encoder",), "encoder")["encoder"])
    return encoder.eval(), None


def export_run(run: Path, out: Path, overwrite: bool = False, tolerance: float = TOLERANCE) -> Exported:
    """Export the network of ``run`` (a run folder, ``model.pt`` or ``encoder.pt``) to ``out``."""
    try:  # say what is missing before any work is done (torch's exporter needs onnxscript)
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ExportError(f"ONNX export needs {err.name}: pip install -e '.[export]'") from err

    run, out = Path(run), Path(out)
    weights, card = _source(run)
    if out.suffix != ".onnx":
        raise OutputError(out, "the exported file must end in .onnx")
    if out.exists() and (out.is_dir() or not overwrite):
        raise OutputError(out, "exists; pass --overwrite to replace an earlier export" if out.is_file()
                          else "is a folder; give a file name ending in .onnx")
    model, model_id = _network(weights, card)
    if card["task"] == "detection":
        return _export_detection(model, weights, card, out, tolerance)
    spatial = card["input_size"] or card["patch_size"]
    example = torch.randn(2, card["in_channels"], *spatial, generator=torch.Generator().manual_seed(0))
    tmp = _temporary(out)
    try:
        def export() -> None:
            program = torch.onnx.export(model, (example,), input_names=["input"], output_names=["output"],
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                                        dynamo=True, verbose=False)
            program.save(str(tmp), external_data=False)

        proto, opset, session = _exported(export, tmp, weights, f"this {card['spatial_dims']}D "
                                                                f"{card['architecture']['name']}")
        got = session.run(None, {"input": example.numpy()})[0]
        with torch.no_grad():
            want = model(example).numpy()
        diff = float(np.max(np.abs(got - want)))
        if not diff <= tolerance:
            raise ExportError(f"{display_path(weights)}: onnxruntime differs from torch by {diff:.2e} "
                              f"(tolerance {tolerance:.0e}); nothing written")
        card = {**card, "export": {"format": "onnx", "opset": int(opset), "tolerance": tolerance,
                                   "max_abs_diff": diff, "input": {"name": "input",
                                                                   "shape": ["batch", card["in_channels"],
                                                                             *spatial]},
                                   "output": {"name": "output", "shape": ["batch", *got.shape[1:]],
                                              "meaning": OUTPUTS[card["task"]]},
                                   **({"model_id": model_id} if model_id else {})}}
        _write(proto, card, tmp, out)
    finally:
        _clean(tmp)
    return Exported(out, card["task"], diff, card)


def _exported(export: Callable[[], None], tmp: Path, weights: Path, what: str) -> tuple[Any, int, Any]:
    """Run ``export`` (it writes ``tmp``); the written model, its opset and an onnxruntime session on it.
    Any exporter failure is one ExportError naming ``weights`` and ``what`` would not export."""
    import onnx
    import onnxruntime as ort

    try:
        export()
    except Exception as err:  # noqa: BLE001 - the exporter fails in many ways; name the network
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ExportError(f"{display_path(weights)}: {what} does not export to ONNX ({first})") from err
    proto = onnx.load(str(tmp))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return proto, opset, ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])


def _temporary(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")


def _write(proto: Any, card: dict[str, Any], tmp: Path, out: Path) -> None:
    """Embed the (validated) card in ``proto``, save it as one file and move it into place."""
    import onnx

    from twinview.model_card import validate_card

    validate_card(card, out)
    onnx.helper.set_model_props(proto, {ONNX_CARD_KEY: json.dumps(card)})
    onnx.save(proto, str(tmp), save_as_external_data=False)
    if tmp.with_name(tmp.name + ".data").exists():
        raise ExportError(f"{display_path(out)}: the exporter wrote external weights; nothing written")
    os.replace(tmp, out)


def _clean(tmp: Path) -> None:
    tmp.unlink(missing_ok=True)
    tmp.with_name(tmp.name + ".data").unlink(missing_ok=True)


class _OneImage(nn.Module):
    """A torchvision detector on one image ``(C, H, W)``, giving ``(boxes, labels, scores)``."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        found = self.detector([image])[0]
        return found["boxes"], found["labels"], found["scores"]


Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (N, 4), labels (N,), scores (N,)


def match_detections(want: Detections, got: Detections, tolerance: float, min_score: float = DET_SCORE,
                     cap: int | None = None) -> tuple[int, float, float]:
    """``(count, box diff, score diff)``: how many detections of ``want`` score at least ``min_score``,
    and the largest coordinate and score differences once they are paired one to one (same label, nearest
    boxes) with those of ``got``, and the other way round; a detection left unpaired makes both infinite.
    Scores within ``tolerance`` of a cut-off may fall either side of it: the cut-off ``min_score``, and for
    lists full at ``cap`` detections their lowest score (the last places may be taken by near-ties)."""
    from scipy.optimize import linear_sum_assignment

    cut = max([min_score] + [float(d[2].min()) + 2 * tolerance for d in (want, got)
                             if cap is not None and len(d[2]) >= cap])
    count = int((want[2] >= cut).sum())
    box_diff = score_diff = 0.0
    for a, b in ((want, got), (got, want)):
        keep_a, keep_b = a[2] >= cut, b[2] >= cut - tolerance
        boxes_a, labels_a, scores_a = (x[keep_a] for x in a)
        boxes_b, labels_b, scores_b = (x[keep_b] for x in b)
        if not len(scores_a):
            continue
        if len(scores_b) < len(scores_a):
            return count, float("inf"), float("inf")
        distance = np.abs(boxes_a[:, None].astype(np.float64) - boxes_b[None]).max(axis=2)
        other_label = labels_a[:, None] != labels_b[None]
        cost = distance + np.abs(scores_a[:, None] - scores_b[None]) + 1e9 * other_label
        rows, cols = linear_sum_assignment(cost)
        if (labels_a[rows] != labels_b[cols]).any():
            return count, float("inf"), float("inf")
        box_diff = max(box_diff, float(distance[rows, cols].max()))
        score_diff = max(score_diff, float(np.abs(scores_a[rows] - scores_b[cols]).max()))
    return count, box_diff, score_diff


def _export_detection(model: nn.Module, weights: Path, card: dict[str, Any], out: Path,
                      tolerance: float) -> Exported:
    """A detector through the TorchScript exporter, checked on images of three sizes (see the module)."""
    import warnings

    channels, arch = card["in_channels"], card["architecture"]
    wrapped = _OneImage(model).eval()
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(channels, *size, generator=generator) for size in DET_SIZES]
    tmp = _temporary(out)
    try:
        def export() -> None:
            with warnings.catch_warnings():  # tracer and deprecation warnings: parity below is the check
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapped, (images[0],), str(tmp), opset_version=17, dynamo=False,
                                  input_names=["image"], output_names=list(DET_OUTPUTS),
                                  dynamic_axes={"image": {1: "height", 2: "width"}})

        proto, opset, session = _exported(export, tmp, weights, f"this {arch['name']} detector")
        counts, box_diff, score_diff = [], 0.0, 0.0
        for image in images:
            got = tuple(session.run(list(DET_OUTPUTS), {"image": image.numpy()}))
            with torch.no_grad():
                want = tuple(t.numpy() for t in wrapped(image))
            count, boxes, scores = match_detections(want, got, tolerance, DET_SCORE,
                                                    arch["detections_per_img"])
            counts.append(count)
            box_diff, score_diff = max(box_diff, boxes), max(score_diff, scores)
        if not (box_diff <= BOX_FACTOR * tolerance and score_diff <= tolerance):
            raise ExportError(f"{display_path(weights)}: onnxruntime's detections differ from torch's (boxes "
                              f"by {box_diff:.2e} px, scores by {score_diff:.2e}; tolerance "
                              f"{BOX_FACTOR * tolerance:.0e} px, {tolerance:.0e}); nothing written")
        tensors = {"boxes": ["detections", 4], "labels": ["detections"], "scores": ["detections"]}
        outputs = [{"name": k, "shape": v, "meaning": DET_OUTPUTS[k]} for k, v in tensors.items()]
        card = {**card, "export": {
            "format": "onnx", "opset": int(opset), "tolerance": tolerance, "max_abs_diff": score_diff,
            "input": {"name": "image", "shape": [channels, "height", "width"],
                      "meaning": "one image, pixels / max_value in [0, 1]; mean and std are applied inside"},
            "output": outputs[0], "outputs": outputs,
            "parity": {"min_score": DET_SCORE, "images": [list(size) for size in DET_SIZES],
                       "detections": counts, "box_tolerance": BOX_FACTOR * tolerance,
                       "box_max_abs_diff": box_diff}}}
        _write(proto, card, tmp, out)
    finally:
        _clean(tmp)
    return Exported(out, card["task"], score_diff, card)
