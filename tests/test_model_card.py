"""The model card (model.json): schema, cross-key checks, files, old-run converters, torch-free import."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import REPO
from twinview.errors import DataError
from twinview.model_card import (
    CARD_FILE,
    SCHEMA_ID,
    card_from_metadata,
    check_weights,
    file_sha256,
    intensity_from_preset,
    intensity_from_seg,
    read_card,
    schema,
    validate_card,
    write_card,
)

SHA = "0123456789abcdef" * 4


def _pretraining_card() -> dict[str, Any]:
    return {
        "schema": SCHEMA_ID, "twinview_version": "0.1.0", "task": "pretraining",
        "architecture": {"name": "resnet18", "small_stem": False},
        "spatial_dims": 2, "in_channels": 3, "input_size": [64, 64], "patch_size": None,
        "preprocessing": {
            "intensity": {"kind": "mean_std", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                          "max_value": 255.0},
            "resize": "shorter_side_then_center_crop", "shorter_side": 73, "orientation": "", "spacing": None,
            "slice_axis": None, "channel_policy": "drop alpha; repeat a single channel"},
        "labels": None, "embedding_size": 512, "pretraining_method": "simclr",
        "data": {"name": "market", "kind": "images", "modality": "photo"},
        "weights": {"file": "encoder.pt", "sha256": SHA},
    }


def _segmentation_card() -> dict[str, Any]:
    return {
        "schema": SCHEMA_ID, "twinview_version": "0.1.0", "task": "segmentation",
        "architecture": {"name": "flexunet", "encoder": "resnet18", "unet_channels": [32, 64, 128, 256, 512],
                         "out_channels": 3},
        "spatial_dims": 2, "in_channels": 1, "input_size": None, "patch_size": [32, 32],
        "preprocessing": {"intensity": {"kind": "ct_window", "window": [-175.0, 250.0]},
                          "resize": "sliding_window", "orientation": "RAS", "spacing": [1.0, 1.0, 1.5],
                          "slice_axis": 2, "channel_policy": "as stored"},
        "labels": {"0": "background", "1": "anterior", "2": "posterior"},
        "embedding_size": None, "pretraining_method": None,
        "data": {"name": "Hippocampus", "kind": "msd", "modality": "CT"},
        "weights": {"file": "model.pt", "sha256": SHA},
    }


def _reid_card() -> dict[str, Any]:
    return {
        "schema": SCHEMA_ID, "twinview_version": "0.1.0", "task": "reid",
        "architecture": {"name": "reid_bnneck", "encoder": "resnet50", "last_stride": 1, "pooling": "gem",
                         "num_classes": 751},
        "spatial_dims": 2, "in_channels": 3, "input_size": [256, 128], "patch_size": None,
        "preprocessing": {"intensity": {"kind": "percentile", "percentiles": [1.0, 99.8]},
                          "resize": "resize_bilinear", "orientation": "", "spacing": None, "slice_axis": None,
                          "channel_policy": "repeat a single channel"},
        "labels": None, "embedding_size": 2048, "pretraining_method": None,
        "data": None, "weights": {"file": "model.pt", "sha256": SHA},
    }


CARDS = {"pretraining": _pretraining_card, "segmentation": _segmentation_card, "reid": _reid_card}


def _reason(card: dict[str, Any]) -> str:
    with pytest.raises(DataError) as err:
        validate_card(card, CARD_FILE)
    assert str(err.value).startswith(f"{CARD_FILE}: ")
    assert "\n" not in str(err.value)
    return err.value.reason


def test_packaged_schema_is_a_valid_schema() -> None:
    s = schema()
    cls = jsonschema.validators.validator_for(s)
    assert cls is jsonschema.Draft202012Validator
    cls.check_schema(s)
    s["title"] = "changed"
    assert schema()["title"] != "changed"  # callers get a copy


@pytest.mark.parametrize("task", sorted(CARDS))
def test_valid_card_per_task_passes(task: str) -> None:
    card = CARDS[task]()
    validate_card(card)
    assert card["task"] == task


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(card: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = card
        for p in parents:
            target = target[p]
        target[last] = value
    return change


@pytest.mark.parametrize(("task", "change", "expected"), [
    ("segmentation", _set("preprocessing.intensity.window", [250, -175]),
     "preprocessing.intensity.window: [250, -175] needs lo < hi"),
    ("segmentation", _set("preprocessing.intensity.window", [10, 10]), "preprocessing.intensity.window:"),
    ("reid", _set("preprocessing.intensity.percentiles", [99.8, 1.0]),
     "preprocessing.intensity.percentiles: [99.8, 1.0] needs lo < hi"),
    ("pretraining", _set("preprocessing.intensity.mean", [0.5]), "preprocessing.intensity.mean:"),
    ("pretraining", _set("preprocessing.intensity.std", [0.2] * 4), "preprocessing.intensity.std:"),
    ("pretraining", _set("input_size", [64, 64, 64]), "input_size: [64, 64, 64] needs 2 entries"),
    ("segmentation", _set("patch_size", [32, 32, 32]), "patch_size: [32, 32, 32] needs 2 entries"),
    ("segmentation", _set("spatial_dims", 3), "patch_size:"),
    ("segmentation", _set("labels", {"0": "background", "x": "liver"}), "labels: 'x'"),
    ("segmentation", _set("labels", {"0": "background", "-1": "liver"}), "labels: '-1'"),
    ("segmentation", _set("labels", {"0": "background", "01": "liver"}), "labels: '01'"),
    ("segmentation", _set("labels", {"1": "liver", "2": "tumour"}), "labels.0: missing"),
    ("segmentation", _set("labels", {"0": "background", "3": "tumour"}), "labels: label 3"),
])
def test_cross_field_rules_name_the_key(task: str, change: Callable[[dict[str, Any]], None],
                                        expected: str) -> None:
    card = CARDS[task]()
    change(card)
    assert _reason(card).startswith(expected)


@pytest.mark.parametrize(("task", "change", "expected"), [
    ("reid", _set("colour", "red"), "colour: unknown key"),
    ("reid", _set("preprocessing.extra", 1), "preprocessing.extra: unknown key"),
    ("segmentation", _set("preprocessing.intensity.percentiles", [1, 99]),
     "preprocessing.intensity.percentiles: unknown key"),
    ("segmentation", _set("preprocessing.intensity.kind", "minmax"),
     "preprocessing.intensity.kind: 'minmax'"),
    ("segmentation", _set("preprocessing.intensity", "zscore"), "preprocessing.intensity: 'zscore'"),
    ("pretraining", _set("preprocessing.intensity.std", [0.2, 0.0, 0.2]), "preprocessing.intensity.std[1]:"),
    ("pretraining", _set("preprocessing.resize", "resize_bilinear"),
     "preprocessing.shorter_side: not allowed"),
    ("pretraining", _set("preprocessing.orientation", "LPS"), "preprocessing.orientation:"),
    ("reid", _set("preprocessing.slice_axis", 3), "preprocessing.slice_axis:"),
    ("reid", _set("in_channels", 0), "in_channels:"),
    ("reid", _set("spatial_dims", 4), "spatial_dims:"),
    ("reid", _set("input_size", [256, 0]), "input_size[1]:"),
    ("reid", _set("input_size", None), "input_size: None is not of type 'array' (required for reid)"),
    ("reid", _set("task", "classification"), "task:"),
    ("reid", _set("schema", "twinview-model-card/2"), "schema:"),
    ("reid", _set("pretraining_method", "dino"), "pretraining_method:"),
    ("reid", _set("weights.sha256", "ABC"), "weights.sha256:"),
    ("reid", _set("weights.file", "encoder.pt"), "weights.file:"),
    ("segmentation", _set("data", None), "data: None is not of type 'object'"),
])
def test_schema_rules_name_the_key(task: str, change: Callable[[dict[str, Any]], None],
                                   expected: str) -> None:
    card = CARDS[task]()
    change(card)
    assert _reason(card).startswith(expected)


def test_missing_key_and_slice_axis_of_a_3d_model() -> None:
    card = _segmentation_card()
    del card["weights"]
    assert _reason(card) == "weights: missing"
    card = _segmentation_card()
    card.update(spatial_dims=3, patch_size=[32, 32, 32])
    assert _reason(card).startswith("preprocessing.slice_axis: 2 needs spatial_dims 2")


def test_write_read_round_trip(tmp_path: Path) -> None:
    card = _segmentation_card()
    path = write_card(card, tmp_path)
    assert path == tmp_path / CARD_FILE
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and text.startswith('{\n  "schema"')
    assert read_card(path) == card
    assert read_card(tmp_path) == card
    assert [p.name for p in tmp_path.iterdir()] == [CARD_FILE]  # no temporary file left


def test_write_refuses_an_invalid_card(tmp_path: Path) -> None:
    card = _reid_card()
    card["in_channels"] = 0
    with pytest.raises(DataError, match="in_channels"):
        write_card(card, tmp_path / CARD_FILE)
    assert not (tmp_path / CARD_FILE).exists()


@pytest.mark.parametrize(("content", "reason"), [
    (b'{"schema": "twinview-model-card/1", "task": ', "invalid JSON at line 1"),
    (b"", "invalid JSON"),
    (b'{"a": 1, "a": 2}', "appears twice"),
    (b'{"a": NaN}', "NaN"),
    (b'{"task": "r\xe9id"}', "not UTF-8"),
    (b"[]", r"card: \[\] is not of type 'object'"),
    (b'{"schema": "twinview-model-card/1"}', "twinview_version: missing"),
])
def test_bad_files_name_the_file(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / CARD_FILE
    path.write_bytes(content)
    with pytest.raises(DataError, match=reason) as err:
        read_card(path)
    assert err.value.path == path
    assert str(err.value).startswith(str(path))


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        read_card(tmp_path / CARD_FILE)
    assert err.value.path == tmp_path / CARD_FILE


def test_check_weights(tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights" * 300_000)  # several read chunks
    card = _reid_card()
    card["weights"]["sha256"] = file_sha256(weights)
    assert card["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    check_weights(card, tmp_path)
    weights.write_bytes(b"weights" * 300_000 + b"!")
    with pytest.raises(DataError, match="differs") as err:
        check_weights(card, tmp_path)
    assert err.value.path == weights
    weights.unlink()
    with pytest.raises(DataError, match="missing") as err:
        check_weights(card, tmp_path)
    assert err.value.path == weights


# --------------------------------------------------------------------------- old run folders


def test_intensity_from_preset_and_seg() -> None:
    assert intensity_from_preset({"intensity": "hu_window", "window": [40.0, 400.0]}) == {
        "kind": "ct_window", "window": [-160.0, 240.0]}
    assert intensity_from_preset({"intensity": "zscore_nonzero"}) == {"kind": "zscore_nonzero"}
    assert intensity_from_preset({"intensity": "percentile", "percentiles": [1.0, 99.8]}) == {
        "kind": "percentile", "percentiles": [1.0, 99.8]}
    assert intensity_from_preset({"intensity": "uint8/255", "mean": [0.5] * 3, "std": [0.25] * 3}) == {
        "kind": "mean_std", "mean": [0.5] * 3, "std": [0.25] * 3, "max_value": 255.0}
    assert intensity_from_seg({"normalize": "zscore", "ct_window": [-175.0, 250.0]}) == {
        "kind": "zscore_nonzero"}
    assert intensity_from_seg({"normalize": "ct_window", "ct_window": [-175.0, 250.0]}) == {
        "kind": "ct_window", "window": [-175.0, 250.0]}
    assert intensity_from_seg({"normalize": "percentile", "ct_window": [-175.0, 250.0]}) == {
        "kind": "percentile", "percentiles": [1.0, 99.0]}
    with pytest.raises(DataError, match="'minmax'"):
        intensity_from_seg({"normalize": "minmax"})
    with pytest.raises(DataError, match="'gamma'"):
        intensity_from_preset({"intensity": "gamma"})


_OLD_POLICY = "drop alpha; repeat a single channel; RGB to grey (ITU-R 601) if channels == 1"
_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _old_preset_metadata(preset: str, size: tuple[int, ...], dims: int) -> dict[str, Any]:
    """What ``pretrain.views.preset_metadata`` returned before the model card (commit d59195b), frozen
    here because the function now speaks the card's vocabulary; old encoder.pt files hold these dicts."""
    channels = 1 if preset in ("ct", "mri") else 3
    meta: dict[str, Any] = {
        "preset": preset, "spatial_dims": dims, "size": list(size), "channels": channels,
        "layout": "CDHW" if dims == 3 else "CHW", "channel_policy": _OLD_POLICY,
        "mean": [0.0] * channels, "std": [1.0] * channels, "range": [0.0, 1.0],
        "resize": "center_crop_then_pad" if dims == 3 else "resize_bilinear"}
    if preset == "ct":
        meta.update(intensity="hu_window", window=[40.0, 400.0])
    elif preset == "mri":
        meta.update(intensity="zscore_nonzero", range=None)
    elif preset == "microscopy":
        meta.update(intensity="percentile", percentiles=[1.0, 99.8])
    else:
        meta.update(intensity="uint8/255", mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
                    range=[-2.1179039301310043, 2.6399999999999997])
    if preset == "natural":
        meta.update(resize="shorter_side_then_center_crop", shorter_side=round(max(size) / 0.875))
    return meta


@pytest.mark.parametrize(("preset", "size", "dims", "channels", "kind"), [
    ("ct", (64, 64), 2, 1, "ct_window"),
    ("ct", (32, 32, 32), 3, 1, "ct_window"),
    ("mri", (32, 32), 2, 1, "zscore_nonzero"),
    ("mri", (32, 32, 32), 3, 1, "zscore_nonzero"),
    ("microscopy", (64, 64), 2, 3, "percentile"),
    ("reid", (128, 64), 2, 3, "mean_std"),
    ("natural", (64, 64), 2, 3, "mean_std"),
])
def test_legacy_encoder(preset: str, size: tuple[int, ...], dims: int, channels: int, kind: str) -> None:
    # as pretrain.trainer._encoder_meta wrote it into encoder.pt
    meta = {"name": "resnet50", "in_channels": channels, "spatial_dims": dims, "small_stem": True,
            "method": "byol", "preprocessing": _old_preset_metadata(preset, size, dims)}
    card = card_from_metadata(meta, "encoder", "encoder.pt", SHA)
    validate_card(card)
    json.dumps(card, allow_nan=False)
    assert card["task"] == "pretraining" and card["pretraining_method"] == "byol"
    assert card["architecture"] == {"name": "resnet50", "small_stem": True}
    assert card["embedding_size"] == 2048
    assert card["input_size"] == list(size) and card["spatial_dims"] == dims
    assert card["preprocessing"]["intensity"]["kind"] == kind
    assert card["preprocessing"]["resize"] == meta["preprocessing"]["resize"]
    if preset == "ct":
        assert card["preprocessing"]["intensity"]["window"] == [-160.0, 240.0]
    if preset == "natural":
        assert card["preprocessing"]["shorter_side"] == meta["preprocessing"]["shorter_side"] == 73
    assert card["weights"] == {"file": "encoder.pt", "sha256": SHA}


def test_legacy_payload_already_in_card_vocabulary() -> None:
    """A .pt file whose card went missing may hold metadata already in the card's vocabulary."""
    pre = {"intensity": {"kind": "ct_window", "window": [-160.0, 240.0]}, "resize": "center_crop_then_pad",
           "orientation": "", "spacing": None, "slice_axis": None, "channel_policy": "repeat"}
    meta = {"name": "resnet34", "in_channels": 1, "spatial_dims": 3, "small_stem": False, "method": "moco",
            "size": [32, 32, 32], "preprocessing": pre}
    card = card_from_metadata(meta, "encoder", "encoder.pt", SHA)
    assert card["preprocessing"] == pre and card["input_size"] == [32, 32, 32]
    assert card["embedding_size"] == 512
    seg_pre = {**pre, "resize": "sliding_window", "orientation": "RAS", "slice_axis": 2}
    meta = {**_old_seg_meta(), "preprocessing": seg_pre, "roi": [48, 48]}
    card = card_from_metadata(meta, "segmentation", "model.pt", SHA)
    assert card["preprocessing"] == seg_pre and card["patch_size"] == [48, 48]


def _old_seg_meta(**preprocessing: Any) -> dict[str, Any]:
    """As downstream.seg.train.model_metadata wrote it into model.pt (a 2D model on 3D volumes)."""
    p = {"orientation": "RAS", "spacing": None, "normalize": "zscore", "ct_window": [-175.0, 250.0],
         "slice_axis": 2, "roi": [32, 32], "image_dims": 3, **preprocessing}
    return {"arch": "flexunet", "encoder": "resnet18", "unet_channels": [32, 64, 128, 256, 512],
            "spatial_dims": 2, "in_channels": 1, "out_channels": 3,
            "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "task": "Hippocampus", "kind": "msd", "modality": "MRI", "preprocessing": p,
            "encoder_weights": ""}


def test_legacy_segmentation() -> None:
    card = card_from_metadata(_old_seg_meta(), "segmentation", "model.pt", SHA)
    assert card["architecture"] == {"name": "flexunet", "encoder": "resnet18",
                                    "unet_channels": [32, 64, 128, 256, 512], "out_channels": 3}
    assert card["patch_size"] == [32, 32] and card["input_size"] is None
    assert card["preprocessing"]["intensity"] == {"kind": "zscore_nonzero"}
    assert card["preprocessing"]["slice_axis"] == 2 and card["preprocessing"]["resize"] == "sliding_window"
    assert card["data"] == {"name": "Hippocampus", "kind": "msd", "modality": "MRI"}
    assert card["labels"]["2"] == "Posterior"

    meta = _old_seg_meta(normalize="ct_window", spacing=[1.5, 1.5, 2.0], roi=[64, 64, 64])
    meta.update(spatial_dims=3, arch="unet", modality="CT")
    card = card_from_metadata(meta, "segmentation", "model.pt", SHA)
    assert card["preprocessing"]["intensity"] == {"kind": "ct_window", "window": [-175.0, 250.0]}
    assert card["preprocessing"]["slice_axis"] is None and card["preprocessing"]["spacing"] == [1.5, 1.5, 2.0]

    meta = _old_seg_meta(normalize="percentile", orientation="", image_dims=2, roi=[64, 64])
    meta.update(in_channels=3, out_channels=2, labels={"0": "background", "1": "nucleus"}, kind="dsb2018",
                task="DSB2018 nuclei", modality="microscopy", arch="smp_unet")
    card = card_from_metadata(meta, "segmentation", "model.pt", SHA)
    assert card["preprocessing"]["intensity"] == {"kind": "percentile", "percentiles": [1.0, 99.0]}
    assert card["preprocessing"]["slice_axis"] is None and card["preprocessing"]["orientation"] == ""


def test_legacy_reid() -> None:
    # as downstream.reid.train.model_metadata wrote it into model.pt
    meta = {"encoder": "resnet18", "last_stride": 1, "pooling": "gem", "num_classes": 751, "size": [256, 128],
            "source": "reid", "encoder_weights": "",
            "preprocessing": _old_preset_metadata("reid", (256, 128), 2)}
    card = card_from_metadata(meta, "reid", "model.pt", SHA)
    assert card["architecture"] == {"name": "reid_bnneck", "encoder": "resnet18", "last_stride": 1,
                                    "pooling": "gem", "num_classes": 751}
    assert card["embedding_size"] == 512 and card["input_size"] == [256, 128]
    assert card["preprocessing"]["intensity"]["kind"] == "mean_std"
    assert len(card["preprocessing"]["intensity"]["mean"]) == card["in_channels"] == 3


def test_legacy_problems_name_the_source() -> None:
    meta = _old_seg_meta(orientation="LPS")
    with pytest.raises(DataError, match="preprocessing.orientation") as err:
        card_from_metadata(meta, "segmentation", "model.pt", SHA, source="run/model.pt")
    assert err.value.path == Path("run/model.pt")
    meta = _old_seg_meta()
    del meta["labels"]
    with pytest.raises(DataError, match="lacks 'labels'"):
        card_from_metadata(meta, "segmentation", "model.pt", SHA, source="run/model.pt")
    meta = {"name": "vit_b", "in_channels": 1, "spatial_dims": 2, "small_stem": False, "method": "moco",
            "preprocessing": {"intensity": "zscore_nonzero", "size": [32, 32], "resize": "resize_bilinear",
                              "channel_policy": "repeat"}}
    with pytest.raises(DataError, match="vit_b"):
        card_from_metadata(meta, "encoder", "encoder.pt", SHA)
    with pytest.raises(ValueError, match="kind"):
        card_from_metadata(meta, "detector", "encoder.pt", SHA)


# --------------------------------------------------------------------------- torch-free


def test_reads_a_card_without_torch_or_numpy(tmp_path: Path) -> None:
    write_card(_segmentation_card(), tmp_path)
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['numpy'] = None\n"
        "import twinview.model_card as mc\n"
        f"card = mc.read_card({str(tmp_path)!r})\n"
        "assert card['task'] == 'segmentation', card\n"
        "assert mc.schema()['$schema'].endswith('2020-12/schema')\n"
        "print('ok', card['labels']['1'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok anterior"
