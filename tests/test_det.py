"""Detection: detectors on twinview encoders, COCO metrics, and tiny train/resume/eval/predict runs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from downstream.det.config import DetConfig, DetModelConfig
from downstream.det.model import backbone_body, build_det_model
from engine.checkpoint import atomic_save
from pretrain.encoders import build_encoder
from twinview.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def _targets() -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[4.0, 6.0, 20.0, 18.0], [30.0, 30.0, 40.0, 44.0]]),
             "labels": torch.tensor([1, 1])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
@pytest.mark.parametrize(("norm", "channels"), [("frozen", 3), ("bn", 1), ("gn", 3), ("bn", 3)])
def test_detectors_build_and_train_a_step(arch: str, norm: str, channels: int) -> None:
    torch.manual_seed(0)
    cfg = DetModelConfig(arch=arch, norm=norm, trainable_layers=3)
    model, encoder_meta = build_det_model(cfg, channels, 2)
    assert encoder_meta is None
    body = backbone_body(model)
    assert body.conv1.in_channels == channels
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    norms = {type(m).__name__ for name, m in body.named_modules() if name.startswith("layer3.0.bn")}
    assert norms == {"frozen": {"FrozenBatchNorm2d"}, "bn": {"BatchNorm2d"}, "gn": {"GroupNorm"}}[norm]
    assert type(body.bn1).__name__ == "FrozenBatchNorm2d" or norm == "gn"  # the frozen stem keeps its stats
    assert len(model.transform.image_mean) == channels
    model.train()
    losses = model([torch.rand(channels, 64, 64), torch.rand(channels, 64, 96)], _targets())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_fpn_width_and_box_sampling_reach_the_detector(arch: str) -> None:
    model, _ = build_det_model(DetModelConfig(arch=arch, fpn_channels=64, box_batch_size_per_image=32), 3, 1)
    features = model.backbone(torch.rand(1, 3, 64, 64))
    assert len(features) == 5 and {f.shape[1] for f in features.values()} == {64}
    if arch == "faster_rcnn":
        assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 32
        assert model.roi_heads.box_head.fc6.in_features == 64 * 7 * 7
        default, _ = build_det_model(DetModelConfig(arch=arch), 3, 1)
        assert default.roi_heads.fg_bg_sampler.batch_size_per_image == 512  # torchvision's
        assert default.backbone.out_channels == 256


@pytest.mark.parametrize("norm", ["frozen", "bn", "gn"])
def test_encoder_weights_land_in_the_backbone_body(tmp_path: Path, norm: str) -> None:
    torch.manual_seed(1)
    encoder = build_encoder("resnet18", in_channels=1, spatial_dims=2)
    for m in encoder.modules():  # statistics that differ from a fresh BatchNorm's
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    meta = {"name": "resnet18", "in_channels": 1, "spatial_dims": 2, "small_stem": False, "method": "simclr"}
    atomic_save({"encoder": state, "encoder_config": meta}, tmp_path / "encoder.pt")
    cfg = DetModelConfig(encoder_weights=str(tmp_path), norm=norm)
    model, loaded = build_det_model(cfg, 1, 1)
    assert loaded is not None and loaded["method"] == "simclr"
    own = backbone_body(model).state_dict()
    compared = 0
    for key, value in state.items():
        if key.endswith("num_batches_tracked") or key not in own:  # GroupNorm keeps no statistics
            assert key.endswith("num_batches_tracked") or norm == "gn" and "running_" in key
            continue
        assert torch.equal(own[key], value), key
        compared += 1
    assert compared == (60 if norm == "gn" else 100)  # ResNet-18: 20 convolutions, 20 norms
    fresh, _ = build_det_model(DetModelConfig(norm=norm), 1, 1)
    assert not torch.equal(backbone_body(fresh).conv1.weight, state["conv1.weight"])
    with pytest.raises(ConfigError, match="in_channels: encoder has 1, model needs 3"):
        build_det_model(cfg, 3, 1)


def test_bad_config_values_are_one_line_errors() -> None:
    from downstream.det.train import check_config

    def error(*overrides: str) -> str:
        with pytest.raises(ConfigError) as info:
            check_config(load_config(DetConfig, REPO / "configs/det/nuclei.yaml", list(overrides)))
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "model.norm: 'batch' is not one of ['frozen', 'bn', 'gn']" in error("model.norm=batch")
    assert "model.trainable_layers: 6 is not in [0, 5]" in error("model.trainable_layers=6")
    assert "model.anchor_sizes [8, 16]: give 5 sizes" in error("model.anchor_sizes=[8,16]")
    assert "must increase" in error("model.anchor_sizes=[8,16,64,32,128]")
    assert "model.image_mean [0.5] needs one value per channel" in error("model.image_mean=[0.5]")
    assert "data.label_fraction: 0.0 is not in (0, 1]" in error("data.label_fraction=0")
    assert "data.path is empty" in error("data.path=")


def test_pycocotools_agrees_with_torchmetrics() -> None:
    from torchmetrics.detection import MeanAveragePrecision

    from downstream.det.evaluate import coco_ground_truth, coco_metrics
    from twinview.data.coco import DetImage

    rng = np.random.default_rng(0)
    images, preds, targets, results = [], [], [], []
    for image_id in (1, 2, 3):
        xy = rng.uniform(0, 80, (6, 2))
        wh = rng.uniform(4, 60, (6, 2))  # small and medium boxes
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        labels = rng.integers(1, 3, 6) * 2  # category ids 2 and 4
        images.append(DetImage(image_id, Path(f"{image_id}.png"), 160, 160, boxes, labels))
        found = boxes[:5] + rng.normal(0, 3, (5, 4)).astype(np.float32)  # one missed, jittered
        found = np.concatenate([found, [[100, 100, 120, 130]]]).astype(np.float32)  # one false positive
        scores = rng.uniform(0.1, 1, 6).astype(np.float32)
        found_labels = np.concatenate([labels[:5], [2]])
        preds.append({"boxes": torch.from_numpy(found), "scores": torch.from_numpy(scores),
                      "labels": torch.from_numpy(found_labels)})
        targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)})
        for box, score, label in zip(found, scores, found_labels, strict=True):
            results.append({"image_id": image_id, "category_id": int(label), "score": float(score),
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]),
                                     float(box[3] - box[1])]})
    ours = coco_metrics(coco_ground_truth(images, {2: "a", 4: "b"}), results)
    metric = MeanAveragePrecision(iou_type="bbox")
    metric.update(preds, targets)
    theirs = metric.compute()
    for key, name in (("AP", "map"), ("AP50", "map_50"), ("AP75", "map_75"), ("AP_small", "map_small")):
        assert ours[key] == pytest.approx(float(theirs[name]), abs=1e-3), key
    assert 0.2 < ours["AP50"] < 1.0
    nothing = coco_metrics(coco_ground_truth(images, {2: "a", 4: "b"}), [])
    assert nothing["AP"] == 0.0 and nothing["AP_large"] == 0.0


# --------------------------------------------------------------------------- end to end


def _tiny(nuclei: Path, out: Path, *extra: str) -> DetConfig:
    return load_config(DetConfig, REPO / "configs/det/nuclei.yaml", [
        f"out_dir={out}", f"data.path={nuclei}", "data.size=64", "data.test_cases=2", "data.val_cases=1",
        "train.steps=4", "train.batch_size=1", "train.ckpt_every_steps=2", "train.log_every_steps=1",
        "train.progress=false", "train.amp=fp32", "optim.warmup_steps=1", *extra])


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One CPU thread: with two, the detector's training steps were not bitwise reproducible within one
    process on an AMX Xeon once another test had run a detector; the loop's resume is what is checked."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_train_resume_eval_predict(tmp_path: Path, synth_nuclei: Path, killed_after_checkpoint: Callable,
                                   capsys: pytest.CaptureFixture, one_thread: None) -> None:
    from downstream.det.train import run_detection
    from twinview.model_card import check_weights, read_card
    from twinview_cli.main import main

    # uninterrupted, validating: 3 training images of batch 1, so the step-2 checkpoint is mid-epoch
    full = run_detection(_tiny(synth_nuclei, tmp_path / "full", "train.val_every_steps=2"))
    run = full.run_dir
    assert full.steps == 4 and set(full.test) >= {"AP", "AP50", "AP75", "AP_small"}
    assert all(0.0 <= full.test[k] <= 1.0 for k in ("AP", "AP50", "AP75", "AP_small"))
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss_classifier", "loss_objectness", "val_ap50"} <= set(header)
    card = read_card(run / "model.json")
    check_weights(card, run)
    assert card["task"] == "detection" and card["labels"] == {"0": "background", "1": "nucleus"}
    assert card["architecture"]["category_ids"] == [1] and card["preprocessing"]["resize"] == "pad_to_32"
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["best"]["metric"] == "val_ap50" and best["best"]["step"] in (2, 4)
    split = json.loads((run / "split.json").read_text())
    assert len(split["test"]) == 2 and len(split["val"]) == 1 and len(split["train"]) == 3

    # killed right after the mid-epoch checkpoint, then resumed: the same weights as uninterrupted
    with killed_after_checkpoint(2):
        run_detection(_tiny(synth_nuclei, tmp_path / "cut", "train.val_every_steps=2"))
    resumed = run_detection(_tiny(synth_nuclei, tmp_path / "cut", "train.val_every_steps=2"),
                            resume=tmp_path / "cut")
    a = torch.load(full.model_path, weights_only=True)["model"]
    b = torch.load(resumed.model_path, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.test == full.test

    # eval on the run's test split, and on all images of a COCO file
    assert main(["det", "eval", str(run), "--out", str(tmp_path / "eval")]) == 0
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert written["images"] == 2 and written["AP50"] == pytest.approx(full.test["AP50"])
    from twinview.data.coco import dsb2018_coco, write_coco

    shutil.copytree(synth_nuclei, tmp_path / "nuclei")
    coco = write_coco(dsb2018_coco(tmp_path / "nuclei"), tmp_path / "nuclei" / "nuclei.json")
    assert main(["det", "eval", str(run), "--data", str(coco), "--out", str(tmp_path / "eval_all")]) == 0
    assert json.loads((tmp_path / "eval_all" / "eval.json").read_text())["images"] == 6

    # predict: COCO results and drawn boxes, for plain images and for a COCO file (true boxes drawn)
    capsys.readouterr()
    images = sorted(synth_nuclei.glob("*/images/*.png"))
    assert main(["det", "predict", str(run), str(images[0]), "--out", str(tmp_path / "pred"),
                 "--min-score", "0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    results = json.loads((tmp_path / "pred" / "results.json").read_text())
    assert summary["detections"] == len(results) > 0
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"} and results[0]["category_id"] == 1
    assert (tmp_path / "pred" / "boxes" / f"{images[0].stem}.png").stat().st_size > 0
    assert main(["det", "predict", str(run), str(coco), "--out", str(tmp_path / "pred_coco")]) == 0
    assert len(list((tmp_path / "pred_coco" / "boxes").glob("*.png"))) == 6
    ids = {i["id"] for i in json.loads((tmp_path / "pred_coco" / "images.json").read_text())["images"]}
    assert ids == {1, 2, 3, 4, 5, 6}


def test_cli_prints_the_resolved_config(capsys: pytest.CaptureFixture) -> None:
    import yaml

    from twinview_cli.main import main

    assert main(["det", "train", "--config", str(REPO / "configs/det/nuclei.yaml"), "--set",
                 "model.arch=retinanet", "--label-fraction", "0.25", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["arch"] == "retinanet" and printed["model"]["norm"] == "bn"
    assert printed["data"]["label_fraction"] == 0.25
    assert printed["data"]["kind"] == "dsb2018" and printed["model"]["anchor_sizes"] == [8, 16, 32, 64, 128]
    assert main(["det", "train", "--config", str(REPO / "configs/det/nuclei.yaml"), "--set",
                 "model.norm=batch", "--print-config"]) == 2
    assert "model.norm" in capsys.readouterr().err


def test_background_detections_are_dropped_before_scoring() -> None:
    """RetinaNet scores class 0 like any class; a label-0 detection must not become the last category."""
    import torch

    from downstream.det.evaluate import detect, results_of

    class Stub(torch.nn.Module):
        def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            return [{"boxes": torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 6]]),
                     "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}]

    found = detect(Stub(), torch.zeros(3, 8, 8), torch.device("cpu"))
    assert found["labels"].tolist() == [1] and found["boxes"].tolist() == [[1, 1, 5, 6]]
    assert [r["category_id"] for r in results_of(7, found, [5])] == [5]
