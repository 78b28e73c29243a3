"""Segmentation and re-ID end to end on the real data in ``../shared/data`` (slow; skipped without it)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.reader_builders import snapshot

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.realdata]


def test_hippocampus_segmentation_learns(tmp_path: Path, shared_data: Path) -> None:
    """A short 2D FlexibleUNet run on all labelled hippocampus volumes segments held-out cases."""
    from downstream.seg.config import SegConfig
    from downstream.seg.predict import predict
    from downstream.seg.train import run_segmentation
    from twinview.config import load_config

    data = shared_data / "Task04_Hippocampus"
    before = snapshot(data)
    cfg = load_config(SegConfig, REPO / "configs/seg/hippocampus2d.yaml", [
        f"out_dir={tmp_path / 'run'}", f"data.path={data}", "data.test_cases=6", "data.val_cases=2",
        "train.steps=120", "train.batch_size=16", "train.val_every_steps=60", "train.progress=false"])
    result = run_segmentation(cfg)
    assert result.summary["cases"] == 6
    assert result.summary["dice_mean"] > 0.5, result.summary  # untrained: about 0.1
    # empty masks would score the image diagonal, about 70 mm; a first run measured 10.4 mm
    assert result.summary["hd95_mean"] < 20.0, result.summary
    split = json.loads((result.run_dir / "split.json").read_text())
    case = data / "imagesTr" / f"{split['test'][0]}.nii.gz"
    rows = predict(case, result.run_dir, tmp_path / "pred")
    mask = nib.load(rows[0]["mask"])
    image = nib.load(str(case))
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    assert 0.5 < rows[0]["volume_ml_Anterior"] + rows[0]["volume_ml_Posterior"] < 10.0  # a hippocampus, in mL
    assert snapshot(data) == before


def test_market_reid_two_epochs_beat_random_features(tmp_path: Path, shared_data: Path) -> None:
    """Two epochs of the strong-baseline head on Market-1501-mini beat the untrained network.

    One epoch scored rank-1 0.242 on the CI machine, against a bound of 0.25 that it passed here
    (CPU kernels differ between machines); two epochs leave a margin. The untrained network is scored
    in the same process.
    """
    import torch

    from downstream.reid.config import ReIDConfig, ReIDEvalConfig
    from downstream.reid.evaluate import evaluate_market, untrained_reid_model
    from downstream.reid.train import run_reid
    from twinview.config import load_config

    data = shared_data / "Market-1501-mini"
    untrained, meta = untrained_reid_model([64, 32])
    baseline = evaluate_market(untrained, meta, data, ReIDEvalConfig(), tmp_path / "untrained",
                               torch.device("cpu"), progress=False)
    cfg = load_config(ReIDConfig, REPO / "configs/reid/market.yaml", [
        f"out_dir={tmp_path / 'run'}", f"data.path={data}", "data.size=[64,32]", "train.epochs=2",
        "optim.warmup_epochs=0", "train.progress=false"])
    result = run_reid(cfg)
    assert result.metrics["queries"] == 882 and result.metrics["skipped_queries"] == 13
    assert baseline["rank1"] < 0.2, baseline  # random features: about 0.15
    assert result.metrics["rank1"] > 0.25, result.metrics
    assert result.metrics["rank1"] > baseline["rank1"] + 0.08, (result.metrics, baseline)
    assert result.metrics["mAP"] > baseline["mAP"] + 0.04, (result.metrics, baseline)
    assert (result.run_dir / "top10.png").exists() and (result.run_dir / "cmc_curve.png").exists()


def test_nuclei_detection_runs_end_to_end(tmp_path: Path, shared_data: Path) -> None:
    """DSB2018 nuclei to COCO boxes, a short Faster R-CNN run, and COCO AP on the 10 held-out images.

    Thirty CPU steps are far from a trained detector; the test holds the plumbing on real images (every
    box read, losses falling, AP measured on the fixed test images) and leaves the data untouched."""
    from downstream.det.config import DetConfig
    from downstream.det.train import run_detection
    from twinview.config import load_config
    from twinview.data.coco import dsb2018_coco

    data = shared_data / "dsb2018-nuclei"
    before = snapshot(data)
    det_set = dsb2018_coco(data)
    assert len(det_set.images) == 50 and sum(len(i.boxes) for i in det_set.images) == 3347
    cfg = load_config(DetConfig, REPO / "configs/det/nuclei.yaml", [
        f"out_dir={tmp_path / 'run'}", f"data.path={data}", "data.size=128", "train.steps=30",
        "train.batch_size=2", "train.val_every_steps=0", "optim.warmup_steps=3", "train.progress=false"])
    result = run_detection(cfg)
    rows = (result.run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [float(r.split(",")[header.index("loss")]) for r in rows[1:]]
    assert len(losses) >= 3 and losses[-1] < losses[0], losses
    scores = json.loads((result.run_dir / "eval.json").read_text())
    assert scores["images"] == 10 and 0.0 <= scores["AP50"] <= 1.0 and 0.0 <= scores["AP"] <= scores["AP50"]
    assert snapshot(data) == before


def test_market_csv_gallery_scores_like_the_market_folder(tmp_path: Path, shared_data: Path) -> None:
    """Query and gallery given as CSV files (with cameras) score exactly as the Market-1501 folder."""
    import torch

    from downstream.reid.config import ReIDEvalConfig
    from downstream.reid.evaluate import evaluate_market, evaluate_records, untrained_reid_model
    from twinview.data.market1501 import read_market1501
    from twinview.data.person_folder import read_person_csv

    data = shared_data / "Market-1501-mini"
    market = read_market1501(data)
    for name, records in (("query", market.query), ("gallery", market.gallery)):
        rows = [f"{r.path},{r.pid},{r.camid}" for r in records]
        (tmp_path / f"{name}.csv").write_text("path,person_id,camera\n" + "\n".join(rows) + "\n")
    model, meta = untrained_reid_model([64, 32])
    folder = evaluate_market(model, meta, data, ReIDEvalConfig(), tmp_path / "folder", torch.device("cpu"),
                             progress=False)
    csv = evaluate_records(model, meta, read_person_csv(tmp_path / "query.csv", "query"),
                           read_person_csv(tmp_path / "gallery.csv"), ReIDEvalConfig(), tmp_path / "csv",
                           torch.device("cpu"), progress=False)
    assert folder["queries"] == csv["queries"] == 882
    assert folder["rank1"] == csv["rank1"] and folder["mAP"] == csv["mAP"]


def test_market_clusters_are_purer_than_chance(shared_data: Path) -> None:
    """The label-free path's clustering on real crops: even random-init features (colour, layout) group
    crops of one person far more often than clusters of the same sizes drawn at random."""
    import torch

    from downstream.reid.cluster import cluster_features, purity
    from downstream.reid.evaluate import extract, untrained_reid_model
    from twinview.data.market1501 import read_market1501

    train = read_market1501(shared_data / "Market-1501-mini").train
    model, meta = untrained_reid_model([64, 32])
    feats = extract(model, [r.path for r in train], meta["size"], torch.device("cpu"), flip=False)
    found = cluster_features(feats, eps=0.5, min_samples=4, k1=30, k2=6)
    truth = np.array([r.pid for r in train])
    shuffled = found.labels.copy()
    keep = shuffled >= 0
    shuffled[keep] = np.random.default_rng(0).permutation(shuffled[keep])
    assert found.clusters >= 16, found.clusters
    assert purity(found.labels, truth) > 2 * purity(shuffled, truth), (purity(found.labels, truth),
                                                                        purity(shuffled, truth))


def test_nuclei_as_image_mask_pairs_run_the_whole_workflow(tmp_path: Path, shared_data: Path) -> None:
    """DSB2018 written as images/ + masks/ (0/255 PNGs): inspect, pretrain without labels, fine-tune
    with 5 labelled images (the same Dice as from the DSB2018 folder), predict and evaluate."""
    from downstream.recipes import pretrain
    from downstream.seg.config import SegConfig
    from downstream.seg.predict import evaluate_run, predict
    from downstream.seg.train import run_segmentation
    from twinview.config import load_config
    from twinview.data.convert import convert
    from twinview.data.inspect import LayoutOptions, inspect_path

    data = shared_data / "dsb2018-nuclei"
    before = snapshot(data)
    pairs = tmp_path / "pairs"
    done = convert(data, pairs, "image_pairs")
    report = inspect_path(pairs, LayoutOptions(mask_values=done["mask_values"]))
    assert report["problems"] == [] and report["masks"] == done["training"] == 50
    assert report["mask_values"] == [0, 1]
    pretrain(REPO / "configs/pretrain/nuclei_simclr.yaml", [
        f"out_dir={tmp_path / 'simclr'}", f"data.path={pairs}", "data.kind=auto", "train.epochs=2",
        "train.batch_size=16", "train.progress=false", "optim.warmup_epochs=1"])
    cfg = load_config(SegConfig, REPO / "configs/seg/image_pairs.yaml", [
        f"out_dir={tmp_path / 'seg'}", f"data.path={pairs}", "data.label_cases=5", "train.steps=80",
        "train.batch_size=8", "train.val_every_steps=40", "train.progress=false",
        f"model.encoder_weights={tmp_path / 'simclr'}"])
    result = run_segmentation(cfg)
    assert result.summary["cases"] == 10 and result.summary["dice_nucleus"] > 0.5, result.summary
    original = run_segmentation(load_config(SegConfig, REPO / "configs/seg/dsb2018.yaml", [
        f"out_dir={tmp_path / 'seg_dsb'}", f"data.path={data}", "data.label_cases=5", "train.steps=80",
        "train.batch_size=8", "train.val_every_steps=40", "train.progress=false",
        f"model.encoder_weights={tmp_path / 'simclr'}"]))
    assert original.summary == pytest.approx(result.summary, abs=1e-6)  # the same images and masks
    rows = predict(pairs, result.run_dir, tmp_path / "pred", overlays=False)
    assert len(rows) == 50 and all(Path(r["mask"]).suffix == ".png" for r in rows)
    again, _ = evaluate_run(result.run_dir, tmp_path / "eval")
    assert again["dice_nucleus"] == pytest.approx(result.summary["dice_nucleus"], abs=1e-6)
    assert snapshot(data) == before
