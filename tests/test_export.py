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
