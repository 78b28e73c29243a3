"""Segmentation data as it is published: nnU-Net v2 raw, per-case folders, 2D image/mask pairs.

Readers, conversion and ``inspect`` on small files written here; every bad input is an error (or an
``inspect`` problem) naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from twinview.data import case_folders, image_pairs, nnunet
from twinview.data.case_folders import CasePatterns
from twinview.data.convert import convert, read_volume_set
from twinview.data.inspect import LayoutOptions, detect_format, inspect_path
from twinview.data.msd import read_msd
from twinview.data.nifti import load_channels, load_nifti
from twinview.errors import DataError

SHAPE = (9, 8, 7)


def save(array: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 2.0, 1.0]) if affine is None else affine), path)
    return path


def two_channel_nnunet(root: Path, cases: int = 3, **extra: object) -> Path:
    """An nnU-Net raw set: channels T2 and ADC, labels 0-2, ``cases`` training cases and one test case."""
    rng = np.random.default_rng(0)
    for i in range(cases):
        for c in range(2):
            image = root / "imagesTr" / f"pros_{i:03d}_{c:04d}.nii.gz"
            save(rng.normal(size=SHAPE).astype(np.float32), image)
        save(rng.integers(0, 3, SHAPE).astype(np.uint8), root / "labelsTr" / f"pros_{i:03d}.nii.gz")
    for c in range(2):
        save(rng.normal(size=SHAPE).astype(np.float32), root / "imagesTs" / f"pros_900_{c:04d}.nii.gz")
    body = {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "PZ": 1, "TZ": 2},
            "numTraining": cases, "file_ending": ".nii.gz", **extra}
    (root / "dataset.json").write_text(json.dumps(body))
    return root


def problems_by_file(report: dict) -> dict[str, str]:
    """An inspect report's problems as file name -> reason."""
    return {Path(p["file"]).name: p["reason"] for p in report["problems"]}


# --------------------------------------------------------------------------- nnU-Net raw


def test_nnunet_cases_group_channel_files_in_order(tmp_path: Path) -> None:
    root = two_channel_nnunet(tmp_path / "Dataset005_Prostate")
    assert detect_format(root) == "nnunet"
    ds = nnunet.read_nnunet(root)
    assert ds.channel_names == {0: "T2", 1: "ADC"} and ds.labels == {0: "background", 1: "PZ", 2: "TZ"}
    assert [c.case_id for c in ds.training] == ["pros_000", "pros_001", "pros_002"]
    assert [p.name for p in ds.training[1].channels] == ["pros_001_0000.nii.gz", "pros_001_0001.nii.gz"]
    assert ds.training[1].label.name == "pros_001.nii.gz" and [c.case_id for c in ds.test] == ["pros_900"]
    image, _ = load_channels(ds.training[1].channels)
    assert image.shape == (2, *SHAPE)
    np.testing.assert_array_equal(image[1], load_nifti(ds.training[1].channels[1])[0])
    report = inspect_path(root)
    assert report["format"] == "nnunet" and report["problems"] == []
    assert report["cases"] == 3 and report["test"] == 1 and report["labels"] == [0, 1, 2]
    assert report["shape_max"] == [*SHAPE, 2] and report["channel_names"] == {"0": "T2", "1": "ADC"}


def test_region_based_labels_name_the_values_nnunet_writes() -> None:
    from twinview.data.nnunet import _labels

    data = {"labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                       "enhancing tumor": [3]}, "regions_class_order": [1, 2, 3]}
    names, regions = _labels(Path("dataset.json"), data)
    assert names == {0: "background", 1: "whole tumor", 2: "tumor core", 3: "enhancing tumor"}
    assert regions == {"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
    with pytest.raises(DataError, match="need 'regions_class_order'"):
        _labels(Path("dataset.json"), {"labels": {"background": 0, "wt": [1, 2]}})
    with pytest.raises(DataError, match="one integer per region"):
        _labels(Path("dataset.json"), {**data, "regions_class_order": [1, 2]})
    with pytest.raises(DataError, match="needs \"background\": 0"):
        _labels(Path("dataset.json"), {"labels": {"lesion": 1}})


def test_nnunet_problems_name_the_file_and_inspect_lists_them_all(tmp_path: Path) -> None:
    root = two_channel_nnunet(tmp_path / "ds", cases=5)
    (root / "imagesTr" / "pros_001_0001.nii.gz").rename(root / "imagesTr" / "pros_001_0002.nii.gz")  # a gap
    (root / "labelsTr" / "pros_002.nii.gz").unlink()  # a case without a label
    save(np.zeros(SHAPE, np.uint8), root / "labelsTr" / "ghost.nii.gz")  # a label without images
    save(np.zeros((9, 8, 6), np.float32), root / "imagesTr" / "pros_003_0001.nii.gz")  # another grid
    moved = np.diag([1.5, 1.5, 2.0, 1.0])
    moved[0, 3] = 5.0
    save(np.zeros(SHAPE, np.float32), root / "imagesTr" / "pros_004_0001.nii.gz", moved)  # another affine
    with pytest.raises(DataError, match=r"pros_001_0000.nii.gz: case 'pros_001': channel 0001 is missing"):
        nnunet.read_nnunet(root)
    report = inspect_path(root)
    reasons = problems_by_file(report)
    assert "channel 0001 is missing (has 0000, 0002; dataset.json lists 2)" in reasons["pros_001_0000.nii.gz"]
    assert "has no label" in reasons["pros_002_0000.nii.gz"]
    assert "a label without images" in reasons["ghost.nii.gz"]
    assert "differs from pros_003_0000.nii.gz's" in reasons["pros_003_0001.nii.gz"]
    assert "affine differs" in reasons["pros_004_0001.nii.gz"]
    assert report["cases"] == 1  # pros_000 only


def test_nnunet_json_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    root = two_channel_nnunet(tmp_path / "ds")
    body = json.loads((root / "dataset.json").read_text())
    for change, reason in [({"channel_names": {"0": "T2", "2": "ADC"}}, "keys must be 0..1"),
                           ({"file_ending": ".png"}, "file_ending '.png' is not supported"),
                           ({"numTraining": 7}, "numTraining is 7, but labelsTr/ holds 3")]:
        (root / "dataset.json").write_text(json.dumps({**body, **change}))
        with pytest.raises(DataError, match=reason):
            nnunet.read_nnunet(root)


def test_msd_to_nnunet_and_back_keeps_every_voxel(synth_msd: Path, tmp_path: Path) -> None:
    done = convert(synth_msd, tmp_path / "nnunet", "nnunet")
    assert done["training"] == len(read_msd(synth_msd).training)
    assert inspect_path(tmp_path / "nnunet")["problems"] == []
    convert(tmp_path / "nnunet", tmp_path / "msd", "msd")
    original, back = read_volume_set(synth_msd), read_volume_set(tmp_path / "msd")
    assert detect_format(tmp_path / "msd") == "msd" and original.labels == back.labels
    assert [c.case_id for c in back.training] == [c.case_id for c in original.training]
    for a, b in zip(original.training, back.training, strict=True):
        (ia, aa), (ib, ab) = load_nifti(a.channels[0]), load_nifti(b.channels[0])
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_allclose(aa, ab, atol=1e-5)
        np.testing.assert_array_equal(load_nifti(a.label)[0], load_nifti(b.label)[0])
    with pytest.raises(DataError, match="output folder is not empty"):
        convert(synth_msd, tmp_path / "msd", "nnunet")
    with pytest.raises(DataError, match="inside the source"):
        convert(tmp_path / "nnunet", tmp_path / "nnunet" / "out", "msd")


# --------------------------------------------------------------------------- per-case folders


def brats_like(root: Path, cases: int = 3) -> Path:
    rng = np.random.default_rng(1)
    for i in range(cases):
        case = root / f"case{i:02d}"
        for name in ("T1c", "Flair", "brainmask"):
            save(rng.normal(size=SHAPE).astype(np.float32), case / f"{name}.nii.gz")
        save(rng.integers(0, 4, SHAPE).astype(np.uint8), case / "seg.nii.gz")
    return root


def test_case_folders_are_read_by_patterns_and_inspect_names_a_missing_modality(tmp_path: Path) -> None:
    root = brats_like(tmp_path / "brats")
    assert detect_format(root) == "case_folders"
    patterns = CasePatterns(("*T1c*.nii.gz", "*Flair*.nii.gz"), "seg.nii.gz")
    cases = case_folders.read_case_folders(root, patterns)
    assert [c.case_id for c in cases] == ["case00", "case01", "case02"]
    assert [p.name for p in cases[0].channels] == ["T1c.nii.gz", "Flair.nii.gz"]
    assert cases[0].label.name == "seg.nii.gz"

    guessed = inspect_path(root)  # no patterns: guessed from the shared names, and said so
    assert guessed["patterns_guessed"] and guessed["patterns"]["label"] == "seg.nii.gz"
    assert guessed["names"] == {"Flair.nii.gz": 3, "T1c.nii.gz": 3, "brainmask.nii.gz": 3, "seg.nii.gz": 3}

    (root / "case01" / "Flair.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case01: no file matches image pattern '\*Flair\*.nii.gz'"):
        case_folders.read_case_folders(root, patterns)
    report = inspect_path(root, LayoutOptions(case_patterns=patterns))
    assert report["cases"] == 2 and report["modalities"] == ["T1c", "Flair"]
    assert not report["patterns_guessed"]
    assert [Path(p["file"]).name for p in report["problems"]] == ["case01"]
    with pytest.raises(DataError, match=r"'\*\.nii\.gz' matches 4 files"):
        case_folders.read_case_folders(root, CasePatterns(("*.nii.gz",)))


def test_msd_converted_to_case_folders_reads_back_with_the_printed_patterns(synth_msd: Path, tmp_path: Path
                                                                            ) -> None:
    done = convert(synth_msd, tmp_path / "cases", "case_folders")
    assert done["patterns"] == "image: ['MRI.nii.gz'], label: 'seg.nii.gz'"
    report = inspect_path(tmp_path / "cases")
    assert report["problems"] == [] and report["labelled"] == done["training"]
    assert report["cases"] == done["training"] + done["test"]


# --------------------------------------------------------------------------- 2D image/mask pairs


def pairs(root: Path, suffix: str = "_1stHO") -> Path:
    rng = np.random.default_rng(2)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        rgb = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"Image_0{i}L.jpg")
        mask = np.zeros((12, 10), np.uint8)
        mask[2:6, 3:7] = 255
        Image.fromarray(mask).save(root / "masks" / f"Image_0{i}L{suffix}.png")
    Image.fromarray(rng.integers(0, 60000, (12, 10), dtype=np.uint16)).save(root / "images" / "grey16.png")
    return root


def test_image_pairs_find_the_mask_suffix_and_map_values_explicitly(tmp_path: Path) -> None:
    root = pairs(tmp_path / "retina")
    assert detect_format(root) == "image_pairs"
    found = image_pairs.read_image_pairs(root)
    assert [(p.case_id, p.mask.name if p.mask else None) for p in found] == [
        ("Image_00L", "Image_00L_1stHO.png"), ("Image_01L", "Image_01L_1stHO.png"),
        ("Image_02L", "Image_02L_1stHO.png"), ("grey16", None)]
    mask = image_pairs.load_mask(found[0].mask, {0: 0, 255: 1}, {0: "background", 1: "vessel"})
    assert mask.dtype == np.int64 and set(np.unique(mask)) == {0, 1} and mask[3, 4] == 1
    with pytest.raises(DataError, match=r"Image_00L_1stHO.png: mask values \[255\] are not among the classes "
                                        r"\[0, 1\]: map them with data.mask_values"):
        image_pairs.load_mask(found[0].mask, None, {0: "background", 1: "vessel"})
    with pytest.raises(DataError, match=r"mask values \[255\] are not in data.mask_values"):
        image_pairs.load_mask(found[0].mask, {0: 0})
    report = inspect_path(root, LayoutOptions(mask_values={0: 0, 255: 1}))
    assert report["problems"] == [] and report["images"] == 4 and report["masks"] == 3
    assert report["unlabelled"] == 1 and report["mask_suffix"] == "_1stHO" and report["mask_values"] == [0, 1]
    assert report["bit_depths"] == {"8": 3, "16": 1} and report["channels"] == {"1": 1, "3": 3}


def test_a_mask_without_its_image_and_a_colour_mask_are_named(tmp_path: Path) -> None:
    root = pairs(tmp_path / "lesions", suffix="")
    Image.fromarray(np.zeros((12, 10), np.uint8)).save(root / "masks" / "Image_09L.png")
    colour = np.zeros((12, 10, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(root / "masks" / "Image_01L.png")
    palette = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "indexed.png")
    assert image_pairs.load_mask(tmp_path / "indexed.png").tolist() == [[0, 1], [2, 1]]
    with pytest.raises(DataError, match=r"Image_09L.png: no image for this mask: expected images/Image_09L"):
        image_pairs.read_image_pairs(root)
    reasons = problems_by_file(inspect_path(root))
    assert "no image for this mask" in reasons["Image_09L.png"]
    assert "a colour mask" in reasons["Image_01L.png"]


# --------------------------------------------------------------------------- the segmentation workflow


def _seg(data: Path, out: Path, *extra: str):  # noqa: ANN202 - a SegResult
    from downstream.seg.config import SegConfig
    from downstream.seg.train import run_segmentation
    from twinview.config import load_config

    return run_segmentation(load_config(SegConfig, REPO / "configs/seg/hippocampus2d.yaml", [
        f"out_dir={out}", f"data.path={data}", "data.kind=auto", "data.roi=[32,32]", "data.test_cases=2",
        "data.val_cases=0", "train.steps=4", "train.batch_size=4", "train.val_every_steps=0",
        "train.progress=false", "optim.warmup_steps=1", *extra]))


def same_weights(a: Path, b: Path) -> bool:
    first, second = (torch.load(r / "model.pt", weights_only=True)["model"] for r in (a, b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_one_task_scores_the_same_dice_from_msd_nnunet_and_case_folders(synth_msd: Path, tmp_path: Path
                                                                        ) -> None:
    from downstream.seg.predict import evaluate_run, predict

    convert(synth_msd, tmp_path / "nnunet", "nnunet")
    folders = convert(synth_msd, tmp_path / "cases", "case_folders")
    assert folders["patterns"] == "image: ['MRI.nii.gz'], label: 'seg.nii.gz'"
    msd_run = _seg(synth_msd, tmp_path / "r_msd")
    nn_run = _seg(tmp_path / "nnunet", tmp_path / "r_nnunet")
    case_run = _seg(tmp_path / "cases", tmp_path / "r_cases", "data.image=[MRI.nii.gz]",
                    "data.label=seg.nii.gz", "data.labels={0: background, 1: Anterior, 2: Posterior}")
    for other in (nn_run, case_run):  # the same patches: the same weights, so the same Dice
        assert other.summary == pytest.approx(msd_run.summary, abs=1e-6)
        assert same_weights(other.run_dir, msd_run.run_dir)
    # the model trained on the MSD copy, scored on the nnU-Net copy: the same cases, the same Dice
    on_msd, _ = evaluate_run(msd_run.run_dir, tmp_path / "e_msd", str(synth_msd), split="all")
    on_nnunet, _ = evaluate_run(msd_run.run_dir, tmp_path / "e_nnunet", str(tmp_path / "nnunet"), split="all")
    assert on_nnunet == pytest.approx(on_msd, abs=1e-6)
    rows = predict(tmp_path / "cases", case_run.run_dir, tmp_path / "p_cases", overlays=False)
    assert len(rows) == folders["training"] + folders["test"]
    with pytest.raises(DataError, match="set data.labels"):
        _seg(tmp_path / "cases", tmp_path / "r_bad", "data.image=[MRI.nii.gz]", "data.label=seg.nii.gz")


def test_image_mask_pairs_train_like_the_dsb2018_folder_they_came_from(synth_nuclei: Path, tmp_path: Path
                                                                         ) -> None:
    from downstream.seg.predict import evaluate_run, predict

    done = convert(synth_nuclei, tmp_path / "pairs", "image_pairs")
    assert done["mask_values"] == {0: 0, 255: 1} and detect_format(tmp_path / "pairs") == "image_pairs"
    assert inspect_path(tmp_path / "pairs", LayoutOptions(mask_values={0: 0, 255: 1}))["problems"] == []
    settings = ("data.roi=[64,64]", "data.test_cases=1")
    nuclei = _seg(synth_nuclei, tmp_path / "r_dsb", "data.kind=dsb2018", *settings)
    pairs = _seg(tmp_path / "pairs", tmp_path / "r_pairs", "data.labels={0: background, 1: nucleus}",
                 "data.mask_values={0: 0, 255: 1}", *settings)
    assert pairs.summary == pytest.approx(nuclei.summary, abs=1e-6)
    assert same_weights(pairs.run_dir, nuclei.run_dir) and nuclei.summary["dice_nucleus"] > 0
    rows = predict(tmp_path / "pairs", pairs.run_dir, tmp_path / "p_pairs", overlays=False)
    assert len(rows) == len(list((tmp_path / "pairs" / "images").iterdir()))  # images/ only, no masks
    again, _ = evaluate_run(pairs.run_dir, tmp_path / "e_pairs")  # the layout is read back from the run
    assert again == pytest.approx(pairs.summary, abs=1e-6)
    with pytest.raises(DataError, match=r"mask values \[255\] are not among the classes"):
        _seg(tmp_path / "pairs", tmp_path / "r_bad", "data.labels={0: background, 1: nucleus}", *settings)


def test_pretraining_reads_the_new_layouts_without_their_labels(synth_msd: Path, synth_nuclei: Path,
                                                                tmp_path: Path) -> None:
    from pretrain.config import DataConfig
    from pretrain.datasets import load_samples, resolve_kind

    convert(synth_msd, tmp_path / "nnunet", "nnunet")
    msd = load_samples(DataConfig(path=str(synth_msd), slice_axis=1))
    nn = load_samples(DataConfig(path=str(tmp_path / "nnunet"), slice_axis=1))
    assert resolve_kind(DataConfig(path=str(tmp_path / "nnunet"))) == "msd_slices"
    assert sorted(nn.names) == sorted(msd.names) and len(nn.names) > 0
    by_name = dict(zip(msd.names, msd.loaders, strict=True))
    for name, load in list(zip(nn.names, nn.loaders, strict=True))[::25]:
        np.testing.assert_array_equal(load(), by_name[name]())
    convert(synth_nuclei, tmp_path / "pairs", "image_pairs")
    pairs = load_samples(DataConfig(path=str(tmp_path / "pairs")))
    assert resolve_kind(DataConfig(path=str(tmp_path / "pairs"))) == "images"
    assert sorted(pairs.names) == sorted(p.name for p in (tmp_path / "pairs" / "images").iterdir())


def test_a_one_channel_encoder_initialises_a_multi_modal_network(tmp_path: Path) -> None:
    """The stem's kernels are tiled over the channels and scaled by 1/C: C identical channels give the
    stem exactly the one-channel activations; every other tensor loads unchanged."""
    from downstream.seg.config import SegModelConfig
    from downstream.seg.model import build_seg_model, load_pretrained_encoder, tensors_equal
    from engine.checkpoint import atomic_save
    from pretrain.encoders import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder("resnet18", in_channels=1, spatial_dims=3)
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    atomic_save({"encoder": state, "encoder_config": {"name": "resnet18", "in_channels": 1, "spatial_dims": 3,
                                                      "small_stem": False}}, tmp_path / "encoder.pt")
    cfg = SegModelConfig(encoder_weights=str(tmp_path))
    model = build_seg_model(cfg, 3, 3, 4)
    meta = load_pretrained_encoder(model, cfg, 3, 3)
    assert meta["adapted_from_channels"] == 1 and meta["in_channels"] == 3
    stem = model.encoder.conv1.weight
    assert stem.shape[1] == 3
    torch.testing.assert_close(stem, state["conv1.weight"].repeat(1, 3, 1, 1, 1) / 3)
    assert tensors_equal(model.encoder, {k: v for k, v in state.items() if k != "conv1.weight"})
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.conv1(x.repeat(1, 3, 1, 1, 1)), encoder.conv1(x))


# --------------------------------------------------------------------------- larger than memory


def test_training_from_the_disk_cache_matches_training_in_memory(synth_msd: Path, tmp_path: Path) -> None:
    """The stored cases give the same patches, so the same model and Dice; a second run reuses the
    entries, and changed preprocessing writes new ones."""
    cache = tmp_path / "cache"
    ram = _seg(synth_msd, tmp_path / "ram")
    disk = _seg(synth_msd, tmp_path / "disk", "data.cache=disk", f"data.cache_dir={cache}",
                "data.cache_ram_gb=0")
    assert disk.summary == pytest.approx(ram.summary, abs=1e-6) and same_weights(disk.run_dir, ram.run_dir)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == len(json.loads((tmp_path / "ram" / "split.json").read_text())["train"])
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")}
    _seg(synth_msd, tmp_path / "again", "data.cache=disk", f"data.cache_dir={cache}", "train.steps=1")
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")} == stamps  # read, not written again
    _seg(synth_msd, tmp_path / "other", "data.cache=disk", f"data.cache_dir={cache}", "train.steps=1",
         "data.normalize=percentile")
    assert len(list(cache.iterdir())) == 2 * len(entries)


def test_the_ram_budget_holds_the_most_recent_cases_only(synth_msd: Path, tmp_path: Path) -> None:
    from downstream.seg.config import SegDataConfig
    from downstream.seg.data import read_task
    from downstream.seg.store import CaseStore, StoredItems

    data = SegDataConfig(path=str(synth_msd), spatial_dims=3, cache="disk", cache_dir=str(tmp_path))
    task = read_task(data)
    cases = task.cases[:6]
    one = CaseStore.build(cases[:1], task, data).volume(cases[0].case_id)
    size = sum(t.numel() * t.element_size() for t in one.values())
    data.cache_ram_gb = 2.5 * size / 2**30  # room for two of these cases
    store = CaseStore.build(cases, task, data)
    items = StoredItems(store, [c.case_id for c in cases], slices=False)
    for i in [0, 1, 2, 3, 4, 5, 4]:
        item = items[i]
        assert store._ram_used <= store.ram_bytes and len(store._ram) <= 2
    assert list(store._ram) == [cases[5].case_id, cases[4].case_id]  # least recently used first
    assert torch.equal(item["image"], store.volume(cases[4].case_id)["image"])


def test_multi_modal_volumes_pretrain_on_every_channel_and_fine_tune(tmp_path: Path) -> None:
    """Two-channel nnU-Net volumes: slices carry both modalities (moved together by the views), the
    two-channel encoder pretrains, and a two-channel U-Net starts from it."""
    from downstream.recipes import pretrain
    from pretrain.config import DataConfig
    from pretrain.datasets import load_samples
    from pretrain.views import build_views

    root = two_channel_nnunet(tmp_path / "ds", cases=4)
    both = load_samples(DataConfig(path=str(root), channels=2, slice_axis=2))
    first = load_samples(DataConfig(path=str(root), channels=1, slice_axis=2))
    assert both.names == first.names and both.loaders[0]().shape == (9, 8, 2)
    np.testing.assert_array_equal(both.loaders[3]()[..., 0], first.loaders[3]())
    a, b = build_views("mri", (8, 8), channels=2)(both.loaders[0]())
    assert a.shape == b.shape == (2, 8, 8)
    pretrain(REPO / "configs/pretrain/hippocampus2d_simclr.yaml", [
        f"out_dir={tmp_path / 'simclr'}", f"data.path={root}", "data.channels=2", "data.size=[16,16]",
        "data.workers=0", "model.small_stem=false", "train.epochs=1", "train.batch_size=8",
        "train.progress=false", "train.knn_every_epochs=0"])
    run = _seg(root, tmp_path / "seg", "data.roi=[32,32]", "data.test_cases=1", "train.steps=2",
               f"model.encoder_weights={tmp_path / 'simclr'}")
    meta = torch.load(run.run_dir / "model.pt", weights_only=True)["model_config"]
    assert meta["in_channels"] == 2 and meta["pretraining_method"] == "simclr"


def test_peak_memory_stays_near_the_budget_on_a_set_larger_than_it(tmp_path: Path) -> None:
    """Two fresh processes train on 16 volumes (about 110 MB as float32 image + label in memory): from
    memory their peak RSS during training grows by the whole set, from the disk cache with a 10 MB
    budget it does not."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    root = tmp_path / "big"
    training = []
    for i in range(16):
        image = rng.normal(100, 20, (112, 112, 72)).astype(np.float32)
        save(image, root / "imagesTr" / f"v{i:02d}.nii.gz", np.eye(4))
        save((image > 120).astype(np.uint8), root / "labelsTr" / f"v{i:02d}.nii.gz", np.eye(4))
        training.append({"image": f"./imagesTr/v{i:02d}.nii.gz", "label": f"./labelsTr/v{i:02d}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "big", "modality": {"0": "MRI"},
                                                   "training": training,
                                                   "labels": {"0": "background", "1": "bright"}}))
    # the growth of the peak during training only: imports (and a fresh venv's bytecode compilation)
    # can peak higher than training, so the high-water mark is reset first (Linux clear_refs)
    code = (
        "import json, sys\n"
        "from downstream.seg.config import SegConfig\n"
        "from downstream.seg.train import run_segmentation\n"
        "from twinview.config import load_config\n"
        "def kb(key):\n"
        "    line = next(x for x in open('/proc/self/status') if x.startswith(key))\n"
        "    return int(line.split()[1])\n"
        "cfg = load_config(SegConfig, sys.argv[1], sys.argv[2:])\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kb('VmRSS')\n"
        "run_segmentation(cfg)\n"
        "print(json.dumps((kb('VmHWM') - before) / 1024))\n")
    peaks = {}
    disk = [f"data.cache_dir={tmp_path / 'cache'}", "data.cache_ram_gb=0.01"]
    for mode, extra in (("ram", []), ("disk", disk)):
        args = [str(REPO / "configs/seg/hippocampus3d.yaml"), f"out_dir={tmp_path / mode}",
                f"data.path={root}",
                "data.roi=[32,32,32]", "data.test_cases=0", "data.val_cases=0", "data.orientation=",
                "train.steps=2", "train.batch_size=2", "train.val_every_steps=0", "train.progress=false",
                "optim.warmup_steps=1", "model.arch=unet", "model.unet_channels=[4,8,16]",
                f"data.cache={mode}", *extra]
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[mode] = float(done.stdout.strip().splitlines()[-1])
    data_mb = 16 * 112 * 112 * 72 * 8 / 2**20
    assert peaks["ram"] - peaks["disk"] > 0.6 * data_mb, (peaks, data_mb)


def test_volume_pretraining_streams_from_the_disk_cache_the_same_samples(synth_msd: Path, tmp_path: Path
                                                                         ) -> None:
    """``data.cache: disk`` gives the samples, names and positions of the in-memory path, also for per-case
    folders read with their patterns; a second read reuses the entries."""
    from pretrain.config import DataConfig
    from pretrain.datasets import load_samples

    cases, store = tmp_path / "cases", str(tmp_path / "c")
    convert(synth_msd, cases, "case_folders")
    for path, extra in ((synth_msd, {}), (cases, {"image": ["MRI.nii.gz"]})):
        for kind in ("msd_slices", "msd_3d"):
            ram = load_samples(DataConfig(path=str(path), kind=kind, **extra))
            disk = load_samples(DataConfig(path=str(path), kind=kind, cache="disk", cache_dir=store, **extra))
            assert disk.names == ram.names and disk.positions == ram.positions and len(ram.names) > 0
            for a, b in list(zip(ram.loaders, disk.loaders, strict=True))[::17]:
                np.testing.assert_array_equal(a(), b())
    entries = sorted((tmp_path / "c").iterdir())
    load_samples(DataConfig(path=str(synth_msd), kind="msd_slices", cache="disk", cache_dir=store))
    assert sorted((tmp_path / "c").iterdir()) == entries


def test_the_layout_configs_read_converted_synthetic_data(synth_msd: Path, synth_nuclei: Path,
                                                          tmp_path: Path) -> None:
    from downstream.seg.config import SegConfig
    from downstream.seg.data import read_task
    from twinview.config import load_config

    convert(synth_msd, tmp_path / "nnunet", "nnunet")
    convert(synth_msd, tmp_path / "cases", "case_folders")
    convert(synth_nuclei, tmp_path / "pairs", "image_pairs")
    for name, data, extra in (
            ("nnunet", tmp_path / "nnunet", []),
            ("case_folders", tmp_path / "cases",
             ["data.image=[MRI.nii.gz]", "data.label=seg.nii.gz", "data.labels={0: bg, 1: a, 2: p}"]),
            ("image_pairs", tmp_path / "pairs", [])):
        cfg = load_config(SegConfig, REPO / f"configs/seg/{name}.yaml", [f"data.path={data}", *extra])
        task = read_task(cfg.data)
        assert task.kind == name and len(task.cases) > 0 and task.in_channels in (1, 3)


def test_a_run_from_the_disk_cache_resumes_exactly(synth_msd: Path, tmp_path: Path,
                                                   killed_after_checkpoint: Callable) -> None:
    from downstream.seg.config import SegConfig
    from downstream.seg.train import run_segmentation
    from twinview.config import load_config

    disk = ("data.cache=disk", f"data.cache_dir={tmp_path / 'cache'}", "data.cache_ram_gb=0",
            "train.ckpt_every_steps=2", "data.test_cases=0")
    full = _seg(synth_msd, tmp_path / "full", *disk)
    with killed_after_checkpoint(2):
        _seg(synth_msd, tmp_path / "cut", *disk)
    cfg = load_config(SegConfig, tmp_path / "cut" / "config.yaml")
    resumed = run_segmentation(cfg, resume=tmp_path / "cut")
    assert same_weights(full.run_dir, resumed.run_dir)
