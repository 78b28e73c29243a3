"""The apps' runtime: numpy + onnxruntime only, held to MONAI's sliding windows and to the torch models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import monai.transforms as mt
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from PIL import Image

from apps.runtime import (
    OnnxModel,
    detect,
    detection_pixels,
    embed,
    normalise_intensity,
    segment,
    sliding_window,
)
from conftest import REPO
from downstream.export import export_run
from engine.checkpoint import atomic_save
from twinview.errors import DataError


@pytest.mark.parametrize(("shape", "window", "overlap"), [((2, 3, 37, 50), (32, 32), 0.25),
                                                          ((1, 2, 20, 41, 9), (16, 16, 16), 0.5)])
def test_sliding_windows_match_monai(shape: tuple[int, ...], window: tuple[int, ...], overlap: float) -> None:
    torch.manual_seed(0)
    conv = (torch.nn.Conv2d if len(window) == 2 else torch.nn.Conv3d)(shape[1], 4, 3, padding=1).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        want = sliding_window_inference(x, window, 3, conv, overlap, mode="gaussian").numpy()
        got = sliding_window(x.numpy(), window, lambda b: conv(torch.from_numpy(b)).numpy(), overlap, 3)
    assert got.shape == want.shape == (shape[0], 4, *shape[2:])  # padded where smaller, cropped back
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_intensity_steps_match_the_training_transforms() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(50, 300, size=(2, 12, 10)).astype(np.float32)
    x[:, :3] = 0  # background for the non-zero z-score
    cases = [({"kind": "ct_window", "window": [-175.0, 250.0]},
              mt.ScaleIntensityRange(a_min=-175.0, a_max=250.0, b_min=0.0, b_max=1.0, clip=True)),
             ({"kind": "zscore_nonzero"}, mt.NormalizeIntensity(nonzero=True, channel_wise=True)),
             ({"kind": "percentile", "percentiles": [1.0, 99.0]},
              mt.ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True,
                                                channel_wise=True))]
    for intensity, transform in cases:
        want = np.asarray(transform(torch.from_numpy(x)))
        got = normalise_intensity(x, intensity)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=intensity["kind"])


def test_a_volume_is_segmented_like_predict_logits(tmp_path: Path) -> None:
    from test_export import SEG_META

    from downstream.seg.config import SegModelConfig
    from downstream.seg.inference import predict_logits
    from downstream.seg.model import build_seg_model
    from twinview.model_card import write_card_for

    torch.manual_seed(0)
    net = build_seg_model(SegModelConfig(arch="unet", unet_channels=[8, 16, 32]), 2, 1, 3).eval()
    atomic_save({"model": net.state_dict(), "model_config": SEG_META}, tmp_path / "run" / "model.pt")
    write_card_for(tmp_path / "run" / "model.pt", SEG_META, "segmentation")
    model = OnnxModel(export_run(tmp_path / "run", tmp_path / "seg.onnx").path)
    volume = np.random.default_rng(1).normal(size=(1, 30, 41, 7)).astype(np.float32)
    want = predict_logits(net, torch.from_numpy(volume), 2, [32, 32], 2).numpy()
    got = segment(model, volume)
    assert got.shape == want.shape == (3, 30, 41, 7)
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(DataError, match="does not embed"):
        embed(model, [np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(DataError, match="takes 1 channel"):
        segment(model, np.zeros((2, 30, 41, 7), np.float32))
    with pytest.raises(DataError, match="a segmentation model does not detect"):
        detect(model, np.zeros((8, 8), np.uint8))


def test_crops_are_embedded_like_the_re_id_evaluation(tmp_path: Path) -> None:
    from downstream.reid.evaluate import extract
    from downstream.reid.model import ReIDModel
    from pretrain.views import preset_metadata
    from twinview.model_card import write_card_for

    torch.manual_seed(0)
    net = ReIDModel(4, "resnet18", last_stride=1, pooling="avg").eval()
    meta = {"encoder": "resnet18", "last_stride": 1, "pooling": "avg", "num_classes": 4, "size": [64, 32],
            "source": "reid", "encoder_weights": "", "preprocessing": preset_metadata("reid", (64, 32))}
    atomic_save({"model": net.state_dict(), "model_config": meta}, tmp_path / "run" / "model.pt")
    write_card_for(tmp_path / "run" / "model.pt", meta, "reid")
    model = OnnxModel(export_run(tmp_path / "run", tmp_path / "reid.onnx").path)
    rng = np.random.default_rng(2)
    paths = []
    for i, (h, w) in enumerate([(128, 64), (100, 47), (64, 32)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    want = extract(net, paths, [64, 32], torch.device("cpu"), flip=False)
    got = embed(model, [np.asarray(Image.open(p)) for p in paths])
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_every_module_of_the_apps_runs_where_torch_cannot_be_imported() -> None:
    """As on a machine without torch: an import hook refuses torch, torchvision and MONAI; every module of
    ``apps/`` is imported and both pages are run (they then ask for a model)."""
    modules = sorted(p.stem for p in (REPO / "apps").glob("*.py") if p.stem != "__init__")
    assert {"runtime", "gallery", "volumes", "retrieval_app", "segmentation_app"} <= set(modules)
    code = f"""
import importlib, importlib.abc, os, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "monai"):
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, NoTorch())
for name in ("TWINVIEW_RETRIEVAL_MODEL", "TWINVIEW_SEGMENTATION_MODEL", "TWINVIEW_GALLERY"):
    os.environ.pop(name, None)
from streamlit.testing.v1 import AppTest
for module in {modules!r}:
    if module.endswith("_app"):
        at = AppTest.from_file(f"apps/{{module}}.py", default_timeout=60).run()
        assert not at.exception and "make demo" in at.info[0].value, (module, at.exception)
    else:
        importlib.import_module(f"apps.{{module}}")
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "monai")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stderr[-2000:]


def test_a_3d_u_net_exports_at_its_patch_and_slides_like_monai(tmp_path: Path) -> None:
    from test_export import SEG_META

    from downstream.seg.config import SegModelConfig
    from downstream.seg.model import build_seg_model
    from twinview.model_card import write_card_for

    torch.manual_seed(0)
    net = build_seg_model(SegModelConfig(arch="unet", unet_channels=[4, 8, 16]), 3, 1, 3).eval()
    meta = {**SEG_META, "spatial_dims": 3, "roi": [16, 16, 16], "unet_channels": [4, 8, 16],
            "preprocessing": {**SEG_META["preprocessing"], "slice_axis": None}}
    atomic_save({"model": net.state_dict(), "model_config": meta}, tmp_path / "run" / "model.pt")
    write_card_for(tmp_path / "run" / "model.pt", meta, "segmentation")
    model = OnnxModel(export_run(tmp_path / "run", tmp_path / "seg3d.onnx").path)
    assert model.card["export"]["input"]["shape"] == ["batch", 1, 16, 16, 16]
    volume = np.random.default_rng(3).normal(size=(1, 23, 30, 12)).astype(np.float32)  # one axis < patch
    with torch.no_grad():
        want = sliding_window_inference(torch.from_numpy(volume)[None], [16, 16, 16], 4, net, 0.25,
                                        mode="gaussian")[0].numpy()
    got = segment(model, volume, overlap=0.25, sw_batch_size=4)
    assert got.shape == want.shape == (3, 23, 30, 12)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_network_that_does_not_export_is_a_one_line_error(tmp_path: Path) -> None:
    """MONAI's 3D ResNet pads its shortcuts with zeros shaped by the batch, which the exporter rejects."""
    from test_export import SEG_META

    from downstream.export import ExportError
    from downstream.seg.config import SegModelConfig
    from downstream.seg.model import build_seg_model
    from twinview.model_card import write_card_for

    net = build_seg_model(SegModelConfig(arch="flexunet"), 3, 1, 3).eval()
    meta = {**SEG_META, "arch": "flexunet", "unet_channels": [32, 64, 128, 256, 512], "spatial_dims": 3,
            "roi": [32, 32, 32], "preprocessing": {**SEG_META["preprocessing"], "slice_axis": None}}
    atomic_save({"model": net.state_dict(), "model_config": meta}, tmp_path / "run" / "model.pt")
    write_card_for(tmp_path / "run" / "model.pt", meta, "segmentation")
    with pytest.raises(ExportError, match="3D flexunet does not export to ONNX") as err:
        export_run(tmp_path / "run", tmp_path / "seg3d.onnx")
    assert "\n" not in str(err.value) and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_image_is_detected_like_the_torch_detector(tmp_path: Path) -> None:
    from test_export import save_tiny_detector

    from downstream.det.data import load_det_image, to_tensor
    from downstream.export import match_detections

    net = save_tiny_detector(tmp_path / "run")
    model = OnnxModel(export_run(tmp_path / "run", tmp_path / "det.onnx").path)
    rng = np.random.default_rng(4)
    for name, pixels in [("rgb.png", rng.integers(0, 256, (70, 94, 3), dtype=np.uint8)),
                         ("grey.png", rng.integers(0, 256, (57, 66), dtype=np.uint8))]:
        Image.fromarray(pixels).save(tmp_path / name)
        read = np.asarray(Image.open(tmp_path / name))  # as an app reads an upload
        image = load_det_image(tmp_path / name, 3, 255.0)  # as `twinview det predict` reads the file
        np.testing.assert_array_equal(detection_pixels(model, read), np.moveaxis(image, -1, 0))
        with torch.no_grad():
            found = net([to_tensor(image)])[0]
        ids = np.array([3, 7])[found["labels"].numpy() - 1]
        want = (found["boxes"].numpy(), ids, found["scores"].numpy())
        boxes, labels, scores = detect(model, read)
        assert boxes.dtype == scores.dtype == np.float32 and labels.dtype == np.int64
        assert boxes.shape == (len(labels), 4) and set(labels) <= {3, 7}  # the card's category ids
        count, box_diff, score_diff = match_detections(want, (boxes, labels, scores), 1e-4, 0.05, 300)
        assert count > 50 and box_diff <= 1e-3 and score_diff <= 1e-4, (name, count, box_diff, score_diff)
        high = detect(model, read, score_threshold=0.5)
        assert len(high[2]) == int((scores >= 0.5).sum()) and (high[2] >= 0.5).all()
    with pytest.raises(DataError, match=r"1 or 3 channels is needed, got shape \(8, 8, 5\)"):
        detect(model, np.zeros((8, 8, 5), np.uint8))
    grey_model = type("Grey", (), {"card": {"in_channels": 1,
                                            "preprocessing": {"intensity": {"max_value": 255.0}}}})
    rgba = rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_allclose(detection_pixels(grey_model, rgba),  # RGB averaged, alpha dropped
                               np.moveaxis(load_det_image(tmp_path / "rgba.png", 1, 255.0), -1, 0), atol=1e-6)
