"""``twinview export``: a run's network as one self-contained ONNX file that carries its model card.

The file holds the whole graph and its weights (no ``.onnx.data`` beside it) with a dynamic batch axis;
spatial axes stay at the size the model card gives (the crop size, or the segmentation patch, around
which sliding windows run outside the network). ``metadata_props["twinview_model_card"]`` holds the run's
model card with an ``export`` section: opset, input and output names and shapes, what the output means,
and the largest absolute difference between onnxruntime and torch on a batch of real-shaped input,
measured at export. Above the tolerance the export fails and writes nothing.
"""

from __future__ import annotations

import json
import os
import uuid
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
    from pretrain.encoders import build_encoder

    encoder = build_encoder(card["architecture"]["name"], in_channels=card["in_channels"],
                            spatial_dims=card["spatial_dims"], small_stem=card["architecture"]["small_stem"])
    encoder.load_state_dict(load_payload(weights, ("encoder",), "encoder")["encoder"])
    return encoder.eval(), None


def export_run(run: Path, out: Path, overwrite: bool = False, tolerance: float = TOLERANCE) -> Exported:
    """Export the network of ``run`` (a run folder, ``model.pt`` or ``encoder.pt``) to ``out``."""
    try:
        import onnx
        import onnxruntime as ort
        import onnxscript  # noqa: F401 - torch's exporter needs it; say so before any work is done
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
    spatial = card["input_size"] or card["patch_size"]
    example = torch.randn(2, card["in_channels"], *spatial, generator=torch.Generator().manual_seed(0))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            program = torch.onnx.export(model, (example,), input_names=["input"], output_names=["output"],
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                                        dynamo=True, verbose=False)
            program.save(str(tmp), external_data=False)
        except Exception as err:  # noqa: BLE001 - the exporter fails in many ways; name the network
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise ExportError(f"{display_path(weights)}: this {card['spatial_dims']}D "
                              f"{card['architecture']['name']} does not export to ONNX ({first})") from err
        proto = onnx.load(str(tmp))
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
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
        from twinview.model_card import validate_card

        validate_card(card, out)
        onnx.helper.set_model_props(proto, {ONNX_CARD_KEY: json.dumps(card)})
        onnx.save(proto, str(tmp), save_as_external_data=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".data").unlink(missing_ok=True)
    return Exported(out, card["task"], diff, card)
