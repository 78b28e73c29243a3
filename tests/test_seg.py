"""Segmentation: splits, metrics, encoder loading, bad input, and tiny end-to-end runs on synthetic data."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from downstream.seg.config import SegConfig, SegDataConfig, SegModelConfig
from downstream.seg.data import PatchDataset, load_case, make_split, read_task, train_transform
from downstream.seg.metrics import case_metrics
from downstream.seg.model import build_seg_model, load_pretrained_encoder, tensors_equal
from engine.checkpoint import atomic_save
from pretrain.encoders import build_encoder
from tests.reader_builders import snapshot, write_nifti
from twinview.config import ConfigError, load_config
from twinview.errors import DataError
from twinview.run_folder import RunFolderError

REPO = Path(__file__).resolve().parents[1]
LABELS = {0: "background", 1: "anterior", 2: "posterior"}


# --------------------------------------------------------------------------- splits


def test_split_is_fixed_and_label_subsets_are_nested() -> None:
    ids = [f"case_{i:03d}" for i in range(50)]
    cfg = SegDataConfig(test_cases=10, val_cases=5, split_seed=3)
    subsets = []
    for fraction in (0.05, 0.1, 0.25, 1.0):
        cfg.label_fraction = fraction
        split = make_split(ids, cfg, seed=1)
        assert len(split["test"]) == 10 and len(split["val"]) == 5 and len(split["pool"]) == 35
        assert not set(split["train"]) & (set(split["test"]) | set(split["val"]))
        subsets.append(set(split["train"]))
    assert [len(s) for s in subsets] == [2, 4, 9, 35]  # round(f * 35), at least 1
    assert subsets[0] < subsets[1] < subsets[2] < subsets[3]
    other_seed = make_split(ids, SegDataConfig(test_cases=10, val_cases=5, split_seed=3, label_fraction=0.25),
                            2)
    assert other_seed["test"] == split["test"]  # the test cases do not depend on the training seed
    assert set(other_seed["train"]) != subsets[2]
    cfg.label_fraction = 1.0
    for count in (1, 2, 4):  # counts nest with each other and with the fractions of the same seed
        cfg.label_cases = count
        counted = set(make_split(ids, cfg, seed=1)["train"])
        assert len(counted) == count and counted <= subsets[1]
        assert counted >= subsets[0] or count == 1 and counted < subsets[0]
    cfg.label_cases = 36
    with pytest.raises(ConfigError, match="label_cases 36: only 35 training cases"):
        make_split(ids, cfg, seed=1)


def test_split_errors_and_split_file(tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(6)]
    with pytest.raises(ConfigError, match="leaves no training cases"):
        make_split(ids, SegDataConfig(test_cases=4, val_cases=2), 0)
    with pytest.raises(ConfigError, match="label_fraction"):
        make_split(ids, SegDataConfig(test_cases=1, val_cases=1, label_fraction=0.0), 0)
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"test": ["c0", "c5"], "val": ["c2"]}))
    split = make_split(ids, SegDataConfig(split_file=str(split_file)), 0)
    assert split["test"] == ["c0", "c5"] and split["pool"] == ["c1", "c3", "c4"]
    split_file.write_text(json.dumps({"test": ["nope"], "val": []}))
    with pytest.raises(DataError, match="split.json: cases not in"):
        make_split(ids, SegDataConfig(split_file=str(split_file)), 0)


# --------------------------------------------------------------------------- metrics


def test_metrics_by_hand_with_anisotropic_spacing() -> None:
    truth = np.zeros((10, 10, 10), dtype=np.int64)
    truth[2:6, 2:6, 2:6] = 1
    pred = np.zeros_like(truth)
    pred[2:6, 2:6, 3:7] = 1  # shifted by one voxel along axis 2 (2 mm)
    row = case_metrics(pred, truth, LABELS, spacing=(1.0, 1.0, 2.0))
    assert row["dice_anterior"] == pytest.approx(2 * 48 / 128)  # overlap 4*4*3 of 64 + 64
    assert row["hd95_anterior"] == pytest.approx(2.0)  # one voxel along the 2 mm axis
    assert row["volume_ml_true_anterior"] == pytest.approx(64 * 2.0 / 1000)
    # posterior: empty in both -> Dice 1, HD95 0 (not NaN)
    assert row["dice_posterior"] == 1.0 and row["hd95_posterior"] == 0.0
    assert row["dice_mean"] == pytest.approx((0.75 + 1.0) / 2)


def test_metrics_one_side_empty_is_worst_case_not_nan() -> None:
    truth = np.zeros((8, 8, 4), dtype=np.int64)
    truth[1:3, 1:3, 1:3] = 2
    pred = np.zeros_like(truth)
    row = case_metrics(pred, truth, LABELS, spacing=(1.0, 1.0, 3.0))
    diagonal = float(np.linalg.norm([8.0, 8.0, 12.0]))
    assert row["dice_posterior"] == 0.0 and row["hd95_posterior"] == pytest.approx(diagonal)
    row = case_metrics(truth, pred, LABELS, spacing=(1.0, 1.0, 3.0))  # false positive only
    assert row["dice_posterior"] == 0.0 and row["hd95_posterior"] == pytest.approx(diagonal)
    assert all(np.isfinite(v) for v in row.values())
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(pred, truth, LABELS, spacing=(1.0, 1.0))


# --------------------------------------------------------------------------- encoder loading


@pytest.mark.parametrize(("arch", "dims", "channels"),
                         [("flexunet", 2, 1), ("flexunet", 3, 1), ("smp_unet", 2, 3)])
def test_pretrained_encoder_loads_every_tensor(tmp_path: Path, arch: str, dims: int, channels: int) -> None:
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", in_channels=channels, spatial_dims=dims)
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    meta = {"name": "resnet18", "in_channels": channels, "spatial_dims": dims, "small_stem": False}
    atomic_save({"encoder": state, "encoder_config": meta}, tmp_path / "encoder.pt")
    cfg = SegModelConfig(arch=arch, encoder="resnet18", encoder_weights=str(tmp_path))
    model = build_seg_model(cfg, dims, channels, 3)
    assert not tensors_equal(model.encoder, state)
    load_pretrained_encoder(model, cfg, dims, channels)
    assert tensors_equal(model.encoder, state)
    assert len(state) > 100


def test_encoder_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    encoder = build_encoder("resnet18", in_channels=1, spatial_dims=2, small_stem=True)
    meta = {"name": "resnet18", "in_channels": 1, "spatial_dims": 2, "small_stem": True}
    atomic_save({"encoder": encoder.state_dict(), "encoder_config": meta}, tmp_path / "encoder.pt")
    cfg = SegModelConfig(encoder_weights=str(tmp_path / "encoder.pt"))
    with pytest.raises(ConfigError, match="small_stem: encoder has True"):
        load_pretrained_encoder(build_seg_model(cfg, 2, 1, 3), cfg, 2, 1)
    with pytest.raises(ConfigError, match="spatial_dims: encoder has 2, model needs 3"):
        load_pretrained_encoder(build_seg_model(cfg, 3, 1, 3), cfg, 3, 1)
    with pytest.raises(ConfigError, match="no encoder weights here"):
        missing = SegModelConfig(encoder_weights=str(tmp_path / "nothing"))
        load_pretrained_encoder(build_seg_model(missing, 2, 1, 3), missing, 2, 1)


# --------------------------------------------------------------------------- bad input


def _msd(root: Path, shapes: list[tuple[int, ...]], labels: list[np.ndarray] | None = None,
         label_affines: list[np.ndarray] | None = None, channels: int = 1) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    rng = np.random.default_rng(0)
    for i, shape in enumerate(shapes):
        name = f"case_{i:03d}.nii.gz"
        image = rng.normal(100, 20, shape).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / name))
        label = labels[i] if labels else (rng.random(shape[:3]) > 0.7).astype(np.uint8)
        affine = label_affines[i] if label_affines else np.eye(4)
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    modality = {str(c): "MRI" for c in range(channels)}
    (root / "dataset.json").write_text(json.dumps({
        "name": "Toy", "modality": modality, "labels": {"0": "background", "1": "structure"},
        "training": training, "test": []}))
    return root


def test_bad_cases_are_errors_that_name_the_file(tmp_path: Path) -> None:
    bad_values = np.zeros((8, 8, 8), dtype=np.uint8)
    bad_values[2, 2, 2] = 5
    shifted = np.eye(4)
    shifted[0, 3] = 4.0
    root = _msd(tmp_path / "toy", [(8, 8, 8)] * 3,
                labels=[np.zeros((8, 8, 8), np.uint8), bad_values, np.zeros((8, 8, 8), np.uint8)],
                label_affines=[np.eye(4), np.eye(4), shifted])
    before = snapshot(root)
    task = read_task(SegDataConfig(path=str(root)))
    assert load_case(task.cases[0], task)["image"].shape == (1, 8, 8, 8)
    with pytest.raises(DataError, match=r"labelsTr/case_001.nii.gz: label values \[5\] are not among"):
        load_case(task.cases[1], task)
    with pytest.raises(DataError, match=r"labelsTr/case_002.nii.gz: label affine differs"):
        load_case(task.cases[2], task)
    # shape mismatch
    write_nifti(root / "labelsTr" / "case_000.nii.gz", np.zeros((8, 8, 7), np.uint8))
    with pytest.raises(DataError, match=r"case_000.nii.gz: label shape \(8, 8, 7\) differs"):
        load_case(task.cases[0], task)
    # a 2D image where the task (and a 3D model) needs volumes
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)),
             str(root / "imagesTr" / "case_000.nii.gz"))
    with pytest.raises(DataError, match=r"imagesTr/case_000.nii.gz: 2D image"):
        load_case(task.cases[0], task, with_label=False)
    # wrong channel count: two channels for a one-modality task
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)),
             str(root / "imagesTr" / "case_000.nii.gz"))
    with pytest.raises(DataError, match=r"case_000.nii.gz: 2 channels; the task Toy has 1"):
        load_case(task.cases[0], task, with_label=False)
    changed = snapshot(root)
    assert set(changed) == set(before)  # nothing deleted or added by the reader


def test_volume_smaller_than_the_patch_is_padded() -> None:
    image = torch.randn(1, 10, 12, 9)
    label = torch.zeros(1, 10, 12, 9)
    label[0, 3:6, 4:8, 2:5] = 1
    ds = PatchDataset([{"image": image, "label": label}], train_transform([32, 32, 32], 0.67), seed=0,
                      length=3)
    x, y = ds[1]
    assert x.shape == (1, 32, 32, 32) and y.shape == (1, 32, 32, 32)
    assert y.sum() > 0  # the structure is kept
    assert torch.equal(ds[1][0], x)  # seeded per item


def test_flips_stay_off_the_axes_left_out() -> None:
    """``flip_axes=[0]`` mirrors rows but never columns (anterior/posterior keep their side)."""
    image = torch.randn(1, 64, 64)
    label = torch.zeros(1, 64, 64)
    label[0, 4:14, 4:14] = 1  # top left
    def centroids(flip_axes: list[int] | None) -> list[tuple[float, float]]:
        ds = PatchDataset([{"image": image, "label": label}], train_transform([64, 64], 1.0, flip_axes),
                          seed=0, length=40)
        out = []
        for i in range(40):
            rows, cols = torch.nonzero(ds[i][1][0], as_tuple=True)
            out.append((rows.float().mean().item(), cols.float().mean().item()))
        return out

    kept = centroids([0])
    assert all(col < 32 for _, col in kept)  # never mirrored left-right in the patch's axis 1
    assert any(row > 32 for row, _ in kept) and any(row < 32 for row, _ in kept)  # axis 0 is mirrored
    assert any(col > 32 for _, col in centroids(None))  # default: every axis


@pytest.mark.parametrize("dims", [2, 3])
def test_flexunet_head_sees_normalised_not_rectified_features(dims: int) -> None:
    """The head's input keeps both signs: a rectified last layer let runs end with empty masks."""
    torch.manual_seed(0)
    model = build_seg_model(SegModelConfig(arch="flexunet"), dims, 1, 3)
    seen = {}
    model.segmentation_head.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    model(torch.randn(2, 1, *([32] * dims)))
    x = seen["x"]
    assert (x < 0).float().mean() > 0.3 and (x > 0).float().mean() > 0.3
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1.0) < 0.1  # batch-normalised


def test_config_checks(tmp_path: Path, synth_msd: Path, synth_nuclei: Path) -> None:
    from downstream.seg.train import check_config

    cfg = load_config(SegConfig, None, [f"data.path={synth_msd}", "data.spatial_dims=2", "data.roi=[48,48]"])
    with pytest.raises(ConfigError, match="divisible by 32"):
        check_config(cfg, read_task(cfg.data))
    cfg = load_config(SegConfig, None,
                      [f"data.path={synth_msd}", "data.spatial_dims=2", "data.roi=[32,32,32]"])
    with pytest.raises(ConfigError, match="needs 2 sizes"):
        check_config(cfg, read_task(cfg.data))
    cfg = load_config(SegConfig, None, [f"data.path={synth_nuclei}", "data.spatial_dims=3"])
    with pytest.raises(ConfigError, match="has 2D images; set data.spatial_dims=2"):
        check_config(cfg, read_task(cfg.data))
    cfg = load_config(SegConfig, None, [f"data.path={synth_msd}", "data.spatial_dims=2", "data.roi=[32,32]",
                                        "data.flip_axes=[0,2]"])
    with pytest.raises(ConfigError, match=r"data.flip_axes \[0, 2\]: a 2D patch has axes 0-1"):
        check_config(cfg, read_task(cfg.data))


# --------------------------------------------------------------------------- end to end


def _tiny(synth_msd: Path, out: Path, *extra: str) -> SegConfig:
    return load_config(SegConfig, REPO / "configs/seg/hippocampus2d.yaml", [
        f"out_dir={out}", f"data.path={synth_msd}", "data.roi=[64,64]", "data.test_cases=2",
        "data.val_cases=1", "train.steps=6", "train.batch_size=4", "train.val_every_steps=3",
        "train.ckpt_every_steps=3", "train.progress=false", "optim.warmup_steps=2", *extra])


def test_train_predict_eval_2d_end_to_end(tmp_path: Path, synth_msd: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    from twinview_cli.main import main

    before = snapshot(synth_msd)
    run = tmp_path / "run"
    assert main(["seg", "train", "--config", str(REPO / "configs/seg/hippocampus2d.yaml"),
                 "--label-fraction", "0.5", "--set", f"out_dir={run}", "--set", f"data.path={synth_msd}",
                 "--set", "data.test_cases=2", "--set", "data.val_cases=1", "--set", "train.steps=6",
                 "--set", "train.batch_size=4", "--set", "train.val_every_steps=3", "--set",
                 "train.progress=false", "--set", "optim.warmup_steps=2"]) == 0
    printed = capsys.readouterr().out
    assert "| anterior |" in printed.lower() and "| mean |" in printed
    split = json.loads((run / "split.json").read_text())
    assert len(split["test"]) == 2 and len(split["train"]) == round(0.5 * 9)
    summary = json.loads((run / "summary.json").read_text())["test"]
    assert 0.0 <= summary["dice_mean"] <= 1.0 and np.isfinite(summary["hd95_mean"])
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) >= 3
    assert (run / "loss_curve.png").stat().st_size > 0 and (run / "config.yaml").exists()
    assert sorted(p.name for p in (run / "overlays").iterdir()) == sorted(f"{c}.png" for c in split["test"])
    payload = torch.load(run / "model.pt", weights_only=True)
    assert payload["model_config"]["preprocessing"]["intensity"] == {"kind": "zscore_nonzero"}
    from downstream.seg.evaluate import load_model
    from twinview.model_card import check_weights, read_card

    card = read_card(run / "model.json")
    check_weights(card, run)
    assert card["task"] == "segmentation" and card["labels"]["1"].lower() == "anterior"
    assert card["patch_size"] == [64, 64] and card["preprocessing"]["slice_axis"] == 2
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["best"]["metric"] == "val_dice" and best["best"]["step"] in (3, 6)
    assert load_model(run / "best.pt")[1] == payload["model_config"]  # best.pt loads like model.pt

    # predict on the unlabelled test images: masks with the input's affine and shape, plus volumes
    pred_dir = tmp_path / "pred"
    assert main(["seg", "predict", str(synth_msd / "imagesTs"), "--model", str(run),
                 "--out", str(pred_dir)]) == 0
    for source in sorted((synth_msd / "imagesTs").iterdir()):
        mask = nib.load(str(pred_dir / source.name.replace(".nii.gz", "_mask.nii.gz")))
        image = nib.load(str(source))
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
    volumes = (pred_dir / "volumes.csv").read_text().splitlines()
    assert volumes[0].startswith("case,input,mask,volume_ml_") and len(volumes) == 3
    assert (pred_dir / "overlays").is_dir()

    # eval on the run's test split: table printed, CSV written
    eval_dir = tmp_path / "eval"
    assert main(["seg", "eval", "--model", str(run), "--out", str(eval_dir)]) == 0
    printed = capsys.readouterr().out
    assert "HD95 (mm)" in printed
    per_case = (eval_dir / "metrics.csv").read_text().splitlines()
    assert len(per_case) == 3 and "hd95_" in per_case[0]
    assert snapshot(synth_msd) == before  # inputs untouched


def test_final_weights_best_keeps_the_validation_best_step(tmp_path: Path, synth_msd: Path) -> None:
    from downstream.seg.train import check_config, run_segmentation

    with pytest.raises(ConfigError, match="final_weights=best picks the step best on the val cases"):
        cfg = _tiny(synth_msd, tmp_path / "x", "train.final_weights=best", "train.val_every_steps=0")
        check_config(cfg, read_task(cfg.data))
    run = tmp_path / "run"
    run_segmentation(_tiny(synth_msd, run, "train.final_weights=best", "train.val_every_steps=2",
                           "data.test_cases=0"))
    best = torch.load(run / "best.pt", weights_only=True)
    final = torch.load(run / "model.pt", weights_only=True)
    assert final["model_config"]["selected_step"] == best["best"]["step"]
    assert all(torch.equal(final["model"][k], v) for k, v in best["model"].items())


def test_prediction_follows_the_input_orientation(tmp_path: Path, synth_msd: Path) -> None:
    """A volume stored flipped (other axis codes) gets the same mask, flipped back into its own grid."""
    from downstream.seg.predict import predict
    from downstream.seg.train import run_segmentation

    run = tmp_path / "run"
    run_segmentation(_tiny(synth_msd, run, "train.steps=2", "train.val_every_steps=0", "data.test_cases=0"))
    source = sorted((synth_msd / "imagesTs").iterdir())[0]
    image = nib.load(str(source))
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = image.shape[0] - 1
    flipped_dir = tmp_path / "flipped"
    flipped_dir.mkdir()
    data = np.asarray(image.dataobj)[::-1].copy()
    nib.save(nib.Nifti1Image(data, image.affine @ flip), str(flipped_dir / source.name))
    predict(source, run, tmp_path / "a", overlays=False)
    predict(flipped_dir / source.name, run, tmp_path / "b", overlays=False)
    mask_name = source.name.replace(".nii.gz", "_mask.nii.gz")
    a = np.asarray(nib.load(str(tmp_path / "a" / mask_name)).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "b" / mask_name)).dataobj)
    assert not np.array_equal(data, np.asarray(image.dataobj))  # the stored voxels really differ
    assert np.array_equal(a, b[::-1])

    # a DICOM series: the mask is written as NIfTI on the series' own grid; no patient tag leaks
    from tests.reader_builders import SECRET_ID, SECRET_NAME, write_dicom_series
    from twinview.data.dicom import load_dicom_series, read_dicom_series

    write_dicom_series(tmp_path / "dicom" / "series", slices=5)
    rows = predict(tmp_path / "dicom", run, tmp_path / "c", overlays=True)
    assert len(rows) == 1
    written = nib.load(rows[0]["mask"])
    volume, affine = load_dicom_series(read_dicom_series(tmp_path / "dicom")[0])
    assert written.shape == volume.shape and np.allclose(written.affine, affine)
    outputs = " ".join(p.name for p in (tmp_path / "c").rglob("*"))
    outputs += (tmp_path / "c" / "volumes.csv").read_text()
    assert SECRET_NAME not in outputs and SECRET_ID not in outputs


def test_resume_after_interruption_matches_uninterrupted(tmp_path: Path, synth_msd: Path,
                                                         killed_after_checkpoint: Callable) -> None:
    from downstream.seg.train import run_segmentation

    extra = ("model.arch=unet", "model.unet_channels=[8,16,32]", "train.val_every_steps=0",
             "data.test_cases=0", "data.roi=[32,32]", "train.steps=6")
    full = run_segmentation(_tiny(synth_msd, tmp_path / "full", *extra))
    with killed_after_checkpoint(3):  # killed right after the step-3 checkpoint
        run_segmentation(_tiny(synth_msd, tmp_path / "cut", *extra))
    assert not (tmp_path / "cut" / "model.pt").exists()
    with pytest.raises(RunFolderError, match="--resume"):
        run_segmentation(_tiny(synth_msd, tmp_path / "cut", *extra))
    resumed = run_segmentation(_tiny(synth_msd, tmp_path / "cut", *extra), resume=tmp_path / "cut")
    a = torch.load(full.model_path, weights_only=True)["model"]
    b = torch.load(resumed.model_path, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_3d_flexunet_and_2d_nuclei_runs(tmp_path: Path, synth_msd: Path, synth_nuclei: Path) -> None:
    from downstream.seg.predict import predict
    from downstream.seg.train import run_segmentation

    cfg = load_config(SegConfig, REPO / "configs/seg/hippocampus3d.yaml", [
        f"out_dir={tmp_path / 'r3d'}", f"data.path={synth_msd}", "data.roi=[32,32,32]", "data.test_cases=1",
        "data.val_cases=0", "train.steps=2", "train.batch_size=2", "train.progress=false",
        "train.val_every_steps=0", "optim.warmup_steps=1"])
    result = run_segmentation(cfg)
    assert 0.0 <= result.summary["dice_mean"] <= 1.0
    out = predict(synth_msd / "imagesTs", result.run_dir, tmp_path / "p3d", overlays=False)
    assert len(out) == 2 and all(Path(r["mask"]).exists() for r in out)

    shutil.copytree(synth_nuclei, tmp_path / "nuclei")
    cfg = load_config(SegConfig, REPO / "configs/seg/dsb2018.yaml", [
        f"out_dir={tmp_path / 'r2d'}", f"data.path={tmp_path / 'nuclei'}", "data.roi=[64,64]",
        "data.test_cases=1", "data.val_cases=1", "train.steps=2", "train.batch_size=2",
        "train.progress=false", "train.val_every_steps=2", "optim.warmup_steps=1"])
    result = run_segmentation(cfg)
    assert 0.0 <= result.summary["dice_nucleus"] <= 1.0
    images = sorted((tmp_path / "nuclei").glob("*/images/*.png"))[:1]
    rows = predict(images[0], result.run_dir, tmp_path / "p2d", overlays=True)
    assert Path(rows[0]["mask"]).suffix == ".png" and "volume_px_nucleus" in rows[0]


@pytest.mark.slow
def test_torchrun_fine_tunes_with_two_processes(tmp_path: Path, synth_msd: Path) -> None:
    """Fine-tuning runs under torchrun like pretraining: one writer, every step once, best.pt kept."""
    import csv
    import subprocess
    import sys

    from engine.checkpoint import list_checkpoints, load_checkpoint

    run = tmp_path / "ddp"
    overrides = [f"out_dir={run}", f"data.path={synth_msd}", "data.roi=[32,32]", "data.test_cases=2",
                 "data.val_cases=1", "train.steps=4", "train.batch_size=4", "train.val_every_steps=2",
                 "train.ckpt_every_steps=2", "train.log_every_steps=1", "train.progress=false",
                 "optim.warmup_steps=1", "train.amp=fp32",
                 "model.arch=unet", "model.unet_channels=[8,16,32]"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "twinview_cli", "seg", "train", "--config", str(REPO / "configs/seg/hippocampus2d.yaml"),
           *[a for o in overrides for a in ("--set", o)]]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert load_checkpoint(run / "best.pt")["best"]["metric"] == "val_dice"
    assert (run / "model.json").exists() and (run / "summary.json").exists()
