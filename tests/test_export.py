"""``twinview export``: one self-contained ONNX file per run, faithful to torch, carrying its model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from downstream.export import ExportError, export_run
from downstream.reid.model import ReIDModel
from downstream.seg.config import SegModelConfig
from downstream.seg.model import build_seg_model
from engine.checkpoint import atomic_save
from pretrain.encoders import build_encoder
from pretrain.views import preset_metadata
from twinview.errors import DataError, OutputError
from twinview.model_card import ONNX_CARD_KEY, read_onnx_card, write_card_for
from twinview_cli.main import main

SEG_META = {"arch": "unet", "encoder": "resnet18", "unet_channels": [8, 16, 32], "spatial_dims": 2,
            "in_channels": 1, "out_channels": 3, "labels": {"0": "background", "1": "a", "2": "b"},
            "task": "Hippocampus", "kind": "msd", "modality": "MRI", "encoder_weights": "", "roi": [32, 32],
            "preprocessing": {"intensity": {"kind": "zscore_nonzero"}, "resize": "sliding_window",
                              "orientation": "RAS", "spacing": None, "slice_axis": 2,
                              "channel_policy": "as stored"}}


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_a_segmentation_run_exports_with_its_card_and_matches_torch(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    net = build_seg_model(SegModelConfig(arch="unet", unet_channels=[8, 16, 32]), 2, 1, 3).eval()
    run = tmp_path / "run"
    atomic_save({"model": net.state_dict(), "model_config": SEG_META}, run / "model.pt")
    write_card_for(run / "model.pt", SEG_META, "segmentation")
    out = tmp_path / "seg.onnx"
    assert main(["export", str(run), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["task"] == "segmentation" and printed["max_abs_diff"] <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "seg.onnx"]  # no .onnx.data, no temp file
    card = read_onnx_card(out)
    assert card["labels"] == SEG_META["labels"] and card["export"]["input"]["shape"] == ["batch", 1, 32, 32]
    assert card["export"]["max_abs_diff"] == printed["max_abs_diff"]
    x = np.random.default_rng(1).normal(size=(5, 1, 32, 32)).astype(np.float32)  # another batch size
    with torch.no_grad():
        np.testing.assert_allclose(run_ort(out, x), net(torch.from_numpy(x)).numpy(), atol=1e-4)
    assert main(["export", str(run), "--out", str(out)]) == 2  # an existing file needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0


def test_encoders_and_re_id_models_export_old_runs_too(tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", in_channels=3, spatial_dims=2, small_stem=False).eval()
    meta = {"name": "resnet18", "in_channels": 3, "spatial_dims": 2, "small_stem": False, "method": "moco",
            "size": [64, 32], "preprocessing": preset_metadata("reid", (64, 32))}
    atomic_save({"encoder": encoder.state_dict(), "encoder_config": meta}, tmp_path / "pre" / "encoder.pt")
    write_card_for(tmp_path / "pre" / "encoder.pt", meta, "encoder")
    done = export_run(tmp_path / "pre", tmp_path / "encoder.onnx")
    assert done.task == "pretraining" and done.card["pretraining_method"] == "moco"
    x = np.random.default_rng(2).normal(size=(3, 3, 64, 32)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(run_ort(done.path, x), encoder(torch.from_numpy(x)).numpy(), atol=1e-4)

    model = ReIDModel(7, "resnet18", last_stride=1, pooling="avg").eval()
    reid_meta = {"encoder": "resnet18", "last_stride": 1, "pooling": "avg", "num_classes": 7,
                 "size": [64, 32], "source": "reid", "encoder_weights": "",
                 "preprocessing": preset_metadata("reid", (64, 32))}
    atomic_save({"model": model.state_dict(), "model_config": reid_meta}, tmp_path / "reid" / "model.pt")
    write_card_for(tmp_path / "reid" / "model.pt", reid_meta, "reid")
    card = export_run(tmp_path / "reid" / "model.pt", tmp_path / "reid.onnx").card
    assert card["task"] == "reid" and card["export"]["output"]["shape"] == ["batch", 512]
    from downstream.reid.evaluate import load_reid_model  # the fingerprint a `reid index` folder records

    assert card["export"]["model_id"] == load_reid_model(tmp_path / "reid")[1]["model_id"]
    (tmp_path / "reid" / "model.json").unlink()  # a run from before model cards
    assert export_run(tmp_path / "reid", tmp_path / "old.onnx").card["embedding_size"] == 512


def test_bad_exports_are_one_line_errors_and_write_nothing(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import downstream.export as export

    with pytest.raises(DataError, match="no such run folder"):
        export_run(tmp_path / "missing", tmp_path / "x.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no model.pt or encoder.pt"):
        export_run(tmp_path / "empty", tmp_path / "x.onnx")
    net = build_seg_model(SegModelConfig(arch="unet", unet_channels=[8, 16, 32]), 2, 1, 3)
    atomic_save({"model": net.state_dict(), "model_config": SEG_META}, tmp_path / "run" / "model.pt")
    with pytest.raises(OutputError, match="must end in .onnx"):
        export_run(tmp_path / "run", tmp_path / "x.pt")
    monkeypatch.setitem(export.OUTPUTS, "segmentation", "logits")
    with pytest.raises(ExportError, match="differs from torch"):  # a tolerance no export can meet
        export_run(tmp_path / "run", tmp_path / "x.onnx", tolerance=1e-30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "run"]


def test_an_onnx_file_without_a_card_is_refused(tmp_path: Path) -> None:
    tensor = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["input"], ["output"])], "g",
                                   [tensor("input", onnx.TensorProto.FLOAT, [1])],
                                   [tensor("output", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "plain.onnx"))
    with pytest.raises(DataError, match="carries no twinview model card"):
        read_onnx_card(tmp_path / "plain.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    with pytest.raises(DataError, match="not a readable ONNX model"):
        read_onnx_card(tmp_path / "broken.onnx")
    model = onnx.load(str(tmp_path / "plain.onnx"))
    onnx.helper.set_model_props(model, {ONNX_CARD_KEY: json.dumps({"schema": "other"})})
    onnx.save(model, str(tmp_path / "tampered.onnx"))
    with pytest.raises(DataError, match="tampered.onnx"):
        read_onnx_card(tmp_path / "tampered.onnx")


# --------------------------------------------------------------------------- detectors


def save_tiny_detector(folder: Path, arch: str = "faster_rcnn") -> torch.nn.Module:
    """An untrained detector (ResNet-18 + FPN, 3 channels, categories 3 and 7) saved as a run in ``folder``
    with its model card; RetinaNet's classifier prior is lifted so that it detects above 0.05."""
    from downstream.det.config import DetModelConfig
    from downstream.det.evaluate import MODEL_KEYS
    from downstream.det.model import build_det_model, normalisation
    from twinview.config import to_dict

    torch.manual_seed(0)
    cfg = DetModelConfig(arch=arch)
    net = build_det_model(cfg, 3, 2)[0].eval()
    if arch == "retinanet":  # scores of about 0.5, and none for the background (as once trained)
        bias = net.head.classification_head.cls_logits.bias
        with torch.no_grad():
            bias.zero_()
            bias[0::3] = -20.0  # channels hold anchor x class (3 classes: background, 1, 2)
    mean, std = normalisation(cfg, 3)
    meta = {**{k: v for k, v in to_dict(cfg).items() if k in MODEL_KEYS}, "image_mean": mean,
            "image_std": std, "in_channels": 3, "max_value": 255.0, "category_ids": [3, 7],
            "labels": {"0": "background", "1": "cell", "2": "debris"}, "kind": "coco", "data_name": "tiny",
            "size": 64, "encoder_weights": ""}
    atomic_save({"model": net.state_dict(), "model_config": meta}, folder / "model.pt")
    write_card_for(folder / "model.pt", meta, "detection")
    return net


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_detectors_export_with_dynamic_image_sizes_and_match_torch(tmp_path: Path, arch: str) -> None:
    from downstream.export import DET_SIZES, match_detections

    net = save_tiny_detector(tmp_path / "run", arch)
    done = export_run(tmp_path / "run", tmp_path / "det.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.onnx", "run"]  # one file, no .onnx.data
    card = read_onnx_card(done.path)
    assert card == done.card and card["task"] == "detection"
    export = card["export"]
    assert export["input"]["name"] == "image" and export["input"]["shape"] == [3, "height", "width"]
    assert [o["name"] for o in export["outputs"]] == ["boxes", "labels", "scores"]
    assert export["output"] == export["outputs"][0] and export["outputs"][0]["shape"] == ["detections", 4]
    parity = export["parity"]
    assert parity["images"] == [list(s) for s in DET_SIZES] and min(parity["detections"]) > 50
    assert export["max_abs_diff"] <= 1e-4 and parity["box_max_abs_diff"] <= 1e-3
    session = ort.InferenceSession(str(done.path), providers=["CPUExecutionProvider"])
    image = torch.rand(3, 83, 117, generator=torch.Generator().manual_seed(5))  # a size never seen
    got = tuple(session.run(["boxes", "labels", "scores"], {"image": image.numpy()}))
    with torch.no_grad():
        found = net([image])[0]
    want = (found["boxes"].numpy(), found["labels"].numpy(), found["scores"].numpy())
    count, box_diff, score_diff = match_detections(want, got, 1e-4, 0.05, 300)
    assert count > 50 and box_diff <= 1e-3 and score_diff <= 1e-4, (count, box_diff, score_diff)
    assert got[0].shape[1] == 4 and got[1].dtype == np.int64 and set(got[1]) <= {1, 2}


def test_a_detector_that_does_not_export_or_match_is_a_one_line_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import downstream.export as export

    save_tiny_detector(tmp_path / "run")

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot trace this\nsecond line")

    with monkeypatch.context() as patch:
        patch.setattr(torch.onnx, "export", refuse)
        with pytest.raises(ExportError, match=r"faster_rcnn detector does not export to ONNX \(cannot trace"
                           ) as err:
            export_run(tmp_path / "run", tmp_path / "det.onnx")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(export, "match_detections", lambda *args, **kwargs: (3, 0.5, 0.0))
    with pytest.raises(ExportError, match="detections differ from torch's .boxes by 5.00e-01 px") as err:
        export_run(tmp_path / "run", tmp_path / "det.onnx")
    assert "\n" not in str(err.value) and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_detections_pair_up_despite_near_ties_at_the_cut_offs() -> None:
    from downstream.export import match_detections

    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 4, 4]], np.float32)
    want = (boxes, np.array([1, 2, 1]), np.array([0.9, 0.9, 0.05], np.float32))
    got = (boxes[[1, 0, 2]] + 1e-4, np.array([2, 1, 1]), np.array([0.9, 0.9, 0.05 - 1e-6], np.float32))
    assert match_detections(want, got, 1e-4, 0.05) == pytest.approx((3, 1e-4, 1e-6), rel=0.01)
    swapped = match_detections(want, (got[0], np.array([1, 2, 1]), got[2]), 1e-4)  # labels swapped
    assert swapped[1] > 5  # each pairs with a far box of its own label
    assert match_detections(want, (got[0], np.array([2, 2, 2]), got[2]), 1e-4)[1] == float("inf")
    assert match_detections(want, (got[0][:2], got[1][:2], got[2][:2]), 1e-4)[1] == float("inf")
    # lists full at a cap of 3: the last place may go to another near-tie, so it is left out
    ranked = (boxes, np.array([1, 2, 1]), np.array([0.9, 0.8, 0.30001], np.float32))
    other = (np.array([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40]], np.float32), ranked[1],
             np.array([0.9, 0.8, 0.3], np.float32))
    assert match_detections(ranked, other, 1e-4, 0.05, cap=3) == (2, 0.0, 0.0)
    assert match_detections(ranked, other, 1e-4, 0.05)[1] > 10  # without the cap: a far box
