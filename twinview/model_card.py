"""The model card: ``model.json``, a plain-JSON description of a trained network.

Export writes one beside every ``encoder.pt`` and ``model.pt``; torch-free readers (the browser apps)
rebuild the network's preprocessing from it. The JSON Schema is packaged as
``twinview/schemas/model_card.schema.json``; :func:`validate_card` adds the checks that span keys.
Old run folders have no card: :func:`card_from_metadata` turns the metadata dict their ``.pt`` files hold
into one. This module imports neither torch nor numpy.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError

from twinview import __version__
from twinview.errors import DataError, display_path
from twinview.files import write_text_atomic

CARD_FILE = "model.json"
ONNX_CARD_KEY = "twinview_model_card"  # the card inside an exported file's ONNX metadata_props
SCHEMA_ID = "twinview-model-card/1"

_EMBEDDING_SIZE = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
_INTENSITY_KINDS = ("ct_window", "zscore_nonzero", "percentile", "mean_std")


def schema() -> dict[str, Any]:
    """The packaged JSON Schema of the model card (a fresh copy)."""
    return copy.deepcopy(_schema())


@functools.lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    text = resources.files("twinview").joinpath("schemas/model_card.schema.json").read_text("utf-8")
    return json.loads(text)


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    s = _schema()
    return jsonschema.validators.validator_for(s)(s)


# --------------------------------------------------------------------------- validation


def validate_card(card: dict[str, Any], source: str | os.PathLike[str] | None = None) -> None:
    """Check ``card`` against the schema and the cross-key rules; a ``DataError(source, ...)`` names the key.

    The reason is one line, ``<key path>: <what is wrong>``, e.g. ``preprocessing.intensity.window: ...``.
    """
    errors = list(_validator().iter_errors(card))
    if errors:
        raise DataError(source, _describe(_first(errors)))
    problem = _cross_field_problem(card)
    if problem:
        raise DataError(source, problem)


def _first(errors: list[ValidationError]) -> ValidationError:
    """The error to report: the shallowest (ties: schema order), a oneOf resolved by the ``kind`` it names."""
    err = min(errors, key=lambda e: len(e.absolute_path))
    if err.validator == "oneOf" and not isinstance(err.instance, dict):
        kinds = list(_INTENSITY_KINDS)
        return _custom(err, None, f"{err.instance!r} is not an object with a kind in {kinds}")
    if err.validator == "oneOf" and err.context:
        kind = err.instance.get("kind")
        if "kind" not in err.instance:
            return _custom(err, "kind", f"missing; one of {list(_INTENSITY_KINDS)}")
        if kind not in _INTENSITY_KINDS:
            return _custom(err, "kind", f"{kind!r} is not one of {list(_INTENSITY_KINDS)}")
        variants: dict[int, list[ValidationError]] = {}
        for sub in err.context:
            variants.setdefault(sub.relative_schema_path[0], []).append(sub)
        for subs in variants.values():
            if all(list(sub.relative_path) != ["kind"] for sub in subs):  # the variant ``kind`` names
                return _first(subs)
    return err


def _custom(err: ValidationError, key: str | None, message: str) -> ValidationError:
    path = [*err.absolute_path] if key is None else [*err.absolute_path, key]
    return ValidationError(message, validator="custom", path=path)


def _describe(err: ValidationError) -> str:
    path = list(err.absolute_path)
    comment = err.schema.get("$comment") if isinstance(err.schema, dict) else None
    if err.validator == "required":
        present = err.instance if isinstance(err.instance, dict) else {}
        missing = next((k for k in err.validator_value if k not in present), err.validator_value[0])
        return f"{_key_path([*path, missing])}: missing"
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = set(err.schema.get("properties", {}))
        extra = sorted(k for k in err.instance if k not in known)
        if extra and err.validator_value is False:
            return f"{_key_path([*path, extra[0]])}: unknown key (known: {', '.join(sorted(known))})"
    if err.validator == "not" and set(err.validator_value) == {"required"}:
        key = err.validator_value["required"][0]
        return f"{_key_path([*path, key])}: not allowed here" + (f" ({comment})" if comment else "")
    message = " ".join(err.message.split())
    if len(message) > 200:
        message = message[:197] + "..."
    return f"{_key_path(path)}: {message}" + (f" ({comment})" if comment else "")


def _key_path(parts: Iterable[Any]) -> str:
    """``preprocessing.intensity.window`` or ``input_size[1]``; ``card`` for the card itself."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "card"


def _cross_field_problem(card: Mapping[str, Any]) -> str | None:
    """The first rule the schema cannot state that ``card`` (already schema-valid) breaks, or None."""
    dims, channels = card["spatial_dims"], card["in_channels"]
    for key in ("input_size", "patch_size"):
        size = card[key]
        if size is not None and len(size) != dims:
            return f"{key}: {size} needs {dims} entries for spatial_dims {dims}"
    pre = card["preprocessing"]
    intensity = pre["intensity"]
    if intensity["kind"] == "mean_std":
        for key in ("mean", "std"):
            if len(intensity[key]) != channels:
                return (f"preprocessing.intensity.{key}: {intensity[key]} needs one value per channel "
                        f"(in_channels {channels})")
    elif intensity["kind"] == "ct_window":
        lo, hi = intensity["window"]
        if not lo < hi:
            return f"preprocessing.intensity.window: {intensity['window']} needs lo < hi"
    elif intensity["kind"] == "percentile":
        lo, hi = intensity["percentiles"]
        if not lo < hi:
            return f"preprocessing.intensity.percentiles: {intensity['percentiles']} needs lo < hi"
    if pre["slice_axis"] is not None and dims != 2:
        return f"preprocessing.slice_axis: {pre['slice_axis']} needs spatial_dims 2 (a 2D model on volumes)"
    labels, arch = card["labels"], card["architecture"]
    out_channels = arch.get("out_channels")
    if labels is not None and isinstance(out_channels, int) and not isinstance(out_channels, bool):
        top = max(int(k) for k in labels)
        if top >= out_channels:
            return f"labels: label {top} needs architecture.out_channels > {top}, got {out_channels}"
    return None


# --------------------------------------------------------------------------- files


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file as 64 lowercase hex digits (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_card(card: dict[str, Any], path: Path) -> Path:
    """Validate ``card``, write it atomically to ``path`` (a folder: ``path / model.json``); returns the file.

    Written as a temporary file in the same folder, fsynced, then renamed over ``path``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CARD_FILE
    validate_card(card, path)
    try:
        text = json.dumps(card, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError as e:  # NaN or infinity: not JSON
        raise DataError(path, f"card is not plain JSON: {e}") from None
    try:
        write_text_atomic(path, text)
    except OSError as e:
        raise DataError(path, f"cannot write the model card: {e.strerror or e}") from None
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows, where folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_card(path: Path) -> dict[str, Any]:
    """Read and validate a card (``path``, or ``path / model.json`` for a folder).

    A missing or unreadable file, bytes that are not UTF-8, invalid JSON (also NaN and repeated keys) or a
    schema violation is a DataError naming the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CARD_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "no model card here (old runs: convert the .pt metadata)") from None
    except OSError as e:
        raise DataError(path, f"cannot read the model card: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        card = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except ValueError as e:
        raise DataError(path, f"invalid JSON: {e}") from None
    validate_card(card, path)
    return card


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check_weights(card: dict[str, Any], folder: Path) -> None:
    """Raise a DataError naming the weights file if its sha256 differs from the card's (or it is missing)."""
    folder = Path(folder)
    validate_card(card, folder / CARD_FILE)
    weights = folder / card["weights"]["file"]
    try:
        actual = file_sha256(weights)
    except FileNotFoundError:
        raise DataError(weights, f"missing; {display_path(folder / CARD_FILE)} describes it") from None
    except OSError as e:
        raise DataError(weights, f"cannot read the weights: {e.strerror or e}") from None
    expected = card["weights"]["sha256"]
    if actual != expected:
        raise DataError(weights, f"sha256 {actual[:12]}... differs from the model card's {expected[:12]}...; "
                                 "the weights changed after the card was written")


# --------------------------------------------------------------------------- old run folders


def intensity_from_preset(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The card's intensity step from old pretraining preset metadata (``pretrain.views.preset_metadata``).

    Metadata already in the card's vocabulary (``intensity`` an object with a ``kind``) passes through.
    """
    kind = meta.get("intensity")
    if isinstance(kind, Mapping):
        return copy.deepcopy(dict(kind))
    if kind == "hu_window":
        center, width = (float(v) for v in meta["window"])
        return {"kind": "ct_window", "window": [center - width / 2, center + width / 2]}
    if kind == "zscore_nonzero":
        return {"kind": "zscore_nonzero"}
    if kind == "percentile":
        return {"kind": "percentile", "percentiles": [float(v) for v in meta["percentiles"]]}
    if kind == "uint8/255":
        return {"kind": "mean_std", "mean": [float(v) for v in meta["mean"]],
                "std": [float(v) for v in meta["std"]], "max_value": 255.0}
    raise DataError(None, f"preprocessing.intensity: unknown old intensity {kind!r}")


def intensity_from_seg(p: Mapping[str, Any]) -> dict[str, Any]:
    """The card's intensity step from old segmentation metadata (``seg.data.preprocess_metadata``).

    Metadata already in the card's vocabulary (``intensity`` an object with a ``kind``) passes through.
    """
    if isinstance(p.get("intensity"), Mapping):
        return copy.deepcopy(dict(p["intensity"]))
    mode = p.get("normalize")
    if mode == "zscore":
        return {"kind": "zscore_nonzero"}
    if mode == "ct_window":
        return {"kind": "ct_window", "window": [float(v) for v in p["ct_window"]]}
    if mode == "percentile":  # the old segmentation code scaled the 1st..99th percentiles
        return {"kind": "percentile", "percentiles": [1.0, 99.0]}
    raise DataError(None, f"preprocessing.normalize: unknown old mode {mode!r}")


def card_from_metadata(payload_meta: dict[str, Any], kind: str, weights_file: str, sha256: str, *,
                       source: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """A valid card from the metadata dict inside a ``.pt`` file, in the card's vocabulary or the older
    one (run folders from before model cards).

    ``kind``: ``"encoder"`` (``encoder_config`` of ``encoder.pt``), ``"segmentation"``, ``"reid"`` or
    ``"detection"`` (``model_config`` of ``model.pt``). ``source`` (the ``.pt`` file) is named in any
    DataError.
    """
    builders = {"encoder": _encoder_card, "segmentation": _segmentation_card, "reid": _reid_card,
                "detection": _detection_card}
    if kind not in builders:
        raise ValueError(f"kind must be one of {sorted(builders)}, got {kind!r}")
    try:
        card = builders[kind](payload_meta)
    except DataError as e:
        raise DataError(source, f"metadata: {e.reason}") from None
    except KeyError as e:
        raise DataError(source, f"{kind} metadata lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise DataError(source, f"{kind} metadata is malformed: {e}") from None
    card["weights"] = {"file": weights_file, "sha256": sha256}
    validate_card(card, source)
    return card


def write_card_for(weights: Path, payload_meta: dict[str, Any], kind: str) -> Path:
    """Write ``model.json`` beside ``weights`` (an ``encoder.pt`` or ``model.pt`` just saved), describing
    it from the metadata saved inside it; returns the card's path."""
    weights = Path(weights)
    card = card_from_metadata(payload_meta, kind, weights.name, file_sha256(weights), source=weights)
    return write_card(card, weights.parent / CARD_FILE)


def _base(task: str) -> dict[str, Any]:
    return {"schema": SCHEMA_ID, "twinview_version": __version__, "task": task}


def _embedding_size(encoder: str) -> int:
    if encoder not in _EMBEDDING_SIZE:
        raise DataError(None, f"encoder: unknown {encoder!r}; known: {sorted(_EMBEDDING_SIZE)}")
    return _EMBEDDING_SIZE[encoder]


def _preset_preprocessing(pre: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"intensity": intensity_from_preset(pre), "resize": pre["resize"]}
    if "shorter_side" in pre:
        out["shorter_side"] = int(pre["shorter_side"])
    out.update(orientation=pre.get("orientation", ""), spacing=pre.get("spacing"),
               slice_axis=pre.get("slice_axis"), channel_policy=pre["channel_policy"])
    return out


def _encoder_card(m: Mapping[str, Any]) -> dict[str, Any]:
    pre = m["preprocessing"]
    return {**_base("pretraining"),
            "architecture": {"name": m["name"], "small_stem": bool(m["small_stem"])},
            "spatial_dims": int(m["spatial_dims"]), "in_channels": int(m["in_channels"]),
            "input_size": [int(s) for s in (pre["size"] if "size" in pre else m["size"])], "patch_size": None,
            "preprocessing": _preset_preprocessing(pre), "labels": None,
            "embedding_size": _embedding_size(m["name"]), "pretraining_method": m["method"], "data": None}


def _segmentation_card(m: Mapping[str, Any]) -> dict[str, Any]:
    p = m["preprocessing"]
    dims = int(m["spatial_dims"])
    if isinstance(p.get("intensity"), Mapping):  # already the card's vocabulary; the window is m["roi"]
        preprocessing, roi = copy.deepcopy(dict(p)), m["roi"]
    else:
        policy = ("RGB: alpha dropped, grey repeated" if m["kind"] == "dsb2018"
                  else "as stored: a 4D volume's last axis holds the in_channels channels")
        preprocessing, roi = {
            "intensity": intensity_from_seg(p), "resize": "sliding_window",
            "orientation": p["orientation"] or "",
            "spacing": None if p["spacing"] is None else [float(s) for s in p["spacing"]],
            "slice_axis": int(p["slice_axis"]) if dims == 2 and int(p["image_dims"]) == 3 else None,
            "channel_policy": policy}, p["roi"]
    return {**_base("segmentation"),
            "architecture": {"name": m["arch"], "encoder": m["encoder"],
                             "unet_channels": [int(c) for c in m["unet_channels"]],
                             "out_channels": int(m["out_channels"])},
            "spatial_dims": dims, "in_channels": int(m["in_channels"]),
            "input_size": None, "patch_size": [int(s) for s in roi], "preprocessing": preprocessing,
            "labels": {str(k): str(v) for k, v in m["labels"].items()},
            "embedding_size": None, "pretraining_method": m.get("pretraining_method"),
            "data": {"name": m["task"], "kind": m["kind"], "modality": m["modality"]}}


def _reid_card(m: Mapping[str, Any]) -> dict[str, Any]:
    pre = m["preprocessing"]
    return {**_base("reid"),
            "architecture": {"name": "reid_bnneck", "encoder": m["encoder"],
                             "last_stride": int(m["last_stride"]), "pooling": m["pooling"],
                             "num_classes": int(m["num_classes"])},
            "spatial_dims": 2, "in_channels": 3,
            "input_size": [int(s) for s in m["size"]], "patch_size": None,
            "preprocessing": _preset_preprocessing(pre), "labels": None,
            "embedding_size": _embedding_size(m["encoder"]),
            "pretraining_method": m.get("pretraining_method"),
            # old re-ID runs trained on Market-1501 only (downstream.reid.train.run_reid)
            "data": m.get("data") or {"name": "Market-1501", "kind": "market1501", "modality": "photo"}}


def _detection_card(m: Mapping[str, Any]) -> dict[str, Any]:
    """A detector (``downstream.det.train.model_metadata``): whole images in, boxes of categories out."""
    channels = int(m["in_channels"])
    resize = "pad_to_32" if m["min_size"] is None else "shorter_side_within_max_then_pad_to_32"
    policy = "RGB: alpha dropped, grey repeated" if channels == 3 else "grey: RGB averaged, alpha dropped"
    return {**_base("detection"),
            "architecture": {"name": m["arch"], "encoder": m["encoder"], "norm": m["norm"],
                             "anchor_sizes": [int(s) for s in m["anchor_sizes"]],
                             "aspect_ratios": [float(r) for r in m["aspect_ratios"]],
                             "min_size": m["min_size"], "max_size": int(m["max_size"]),
                             "num_classes": len(m["category_ids"]),
                             "category_ids": [int(c) for c in m["category_ids"]],
                             "score_thresh": float(m["score_thresh"]),
                             "detections_per_img": int(m["detections_per_img"])},
            "spatial_dims": 2, "in_channels": channels,
            "input_size": None, "patch_size": None,  # whole images in (training crops are no window)
            "preprocessing": {"intensity": {"kind": "mean_std", "mean": [float(v) for v in m["image_mean"]],
                                            "std": [float(v) for v in m["image_std"]],
                                            "max_value": float(m["max_value"])},
                              "resize": resize, "orientation": "", "spacing": None, "slice_axis": None,
                              "channel_policy": policy},
            "labels": {str(k): str(v) for k, v in m["labels"].items()},
            "embedding_size": None, "pretraining_method": m.get("pretraining_method"),
            "data": {"name": m["data_name"], "kind": m["kind"],
                     "modality": "microscopy" if m["kind"] == "dsb2018" else "image"}}


def read_onnx_card(path: Path) -> dict[str, Any]:
    """The model card embedded in an ONNX file written by ``twinview export`` (read with onnxruntime, no
    torch); a file that is no ONNX model or carries no valid card is a DataError naming it."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such ONNX file")
    try:
        meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
    except Exception as e:  # onnxruntime raises its own exception types for every kind of broken file
        raise DataError(path, f"not a readable ONNX model ({str(e).splitlines()[0][:200]})") from None
    text = meta.custom_metadata_map.get(ONNX_CARD_KEY)
    if text is None:
        raise DataError(path, "carries no twinview model card: export it with `twinview export`")
    try:
        card = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except ValueError as e:
        raise DataError(path, f"its model card is not valid JSON: {e}") from None
    validate_card(card, path)
    return card
