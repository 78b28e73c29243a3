"""Synthetic data generators: layouts, contents, determinism, refusal to overwrite, and that the data
are not trivially solvable (intensity threshold, mean colour) while carrying the signal (one coherent
labelled structure, identity in the colour layout)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from twinview.data import synth
from twinview.data.dsb2018 import load_nuclei, read_dsb2018
from twinview.data.market1501 import read_market1501
from twinview.data.msd import read_msd
from twinview.data.synth import generate
from twinview.errors import DataError

MARKET_NAME = re.compile(r"(-1|\d{4})_c([1-6])s([1-6])_(\d{6})_(\d{2})\.jpg")
REAL_MSD_KEYS = {
    "name", "description", "reference", "licence", "release", "tensorImageSize", "modality", "labels",
    "numTraining", "numTest", "training", "test",
}  # fmt: skip


def file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def market_files(root: Path, split: str) -> list[tuple[int, int, np.ndarray]]:
    """(pid, camera, float RGB image) for every file of one split; every name must parse."""
    out = []
    for path in sorted((root / split).iterdir()):
        match = MARKET_NAME.fullmatch(path.name)
        assert match, path.name
        out.append((int(match[1]), int(match[2]), np.asarray(Image.open(path), dtype=np.float32) / 255))
    return out


# ---------------------------------------------------------------- MSD


def test_msd_layout_and_headers(synth_msd: Path) -> None:
    meta = json.loads((synth_msd / "dataset.json").read_text())
    assert set(meta) == REAL_MSD_KEYS
    assert meta["tensorImageSize"] == "3D" and meta["modality"] == {"0": "MRI"}
    assert meta["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert (meta["numTraining"], meta["numTest"]) == (12, 2) == (len(meta["training"]), len(meta["test"]))
    assert len(list((synth_msd / "imagesTr").glob("*.nii.gz"))) == 12
    assert len(list((synth_msd / "labelsTr").glob("*.nii.gz"))) == 12
    assert len(list((synth_msd / "imagesTs").glob("*.nii.gz"))) == 2
    z_spacings = set()
    for entry in meta["training"]:
        image, label = nib.load(synth_msd / entry["image"]), nib.load(synth_msd / entry["label"])
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        assert image.shape == label.shape and len(image.shape) == 3
        assert all(26 <= n <= 42 for n in image.shape)
        zooms = image.header.get_zooms()
        assert zooms[:2] == (1.0, 1.0) and 1.2 <= zooms[2] <= 3.0
        assert np.allclose(image.affine, label.affine)
        z_spacings.add(round(float(zooms[2]), 2))
        assert set(np.unique(np.asanyarray(label.dataobj))) == {0, 1, 2}
        assert (synth_msd / entry["image"]).read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime 0
    assert len(z_spacings) > 3  # slice thickness varies per case


@pytest.mark.realdata
def test_msd_json_matches_the_real_task04_file(synth_msd: Path, shared_data: Path) -> None:
    real = json.loads((shared_data / "Task04_Hippocampus" / "dataset.json").read_text())
    synthetic = json.loads((synth_msd / "dataset.json").read_text())
    assert set(synthetic) == set(real)
    for key in ("tensorImageSize", "modality", "labels"):
        assert synthetic[key] == real[key]
    assert set(synthetic["training"][0]) == set(real["training"][0])


def test_msd_reads_with_the_msd_reader(synth_msd: Path) -> None:
    task = read_msd(synth_msd)
    assert (len(task.training), len(task.test)) == (12, 2)
    assert all(r.spacing[2] > 1.1 for r in task.training)


def best_band_dice(image: np.ndarray, foreground: np.ndarray, bins: int = 64) -> float:
    """Best Dice of ``lo <= image < hi`` against the foreground over all quantile bands."""
    edges = np.quantile(image, np.linspace(0, 1, bins + 1))
    every = np.concatenate([[0], np.cumsum(np.histogram(image, edges)[0])])
    fg = np.concatenate([[0], np.cumsum(np.histogram(image[foreground], edges)[0])])
    lo, hi = np.triu_indices(bins + 1, 1)
    return float((2 * (fg[hi] - fg[lo]) / (foreground.sum() + every[hi] - every[lo])).max())


def test_msd_structures_are_coherent_but_not_thresholdable(synth_msd: Path) -> None:
    meta = json.loads((synth_msd / "dataset.json").read_text())
    dices = []
    for entry in meta["training"]:
        image = nib.load(synth_msd / entry["image"]).get_fdata()
        label = np.asanyarray(nib.load(synth_msd / entry["label"]).dataobj)
        dices.append(best_band_dice(image, label > 0))
        parts, n = ndimage.label(label > 0)
        assert np.bincount(parts.ravel())[1:].max() >= 0.95 * (label > 0).sum()  # one tube
        assert (ndimage.binary_dilation(label == 1) & (label == 2)).any()  # anterior meets posterior
        assert 0.005 < (label > 0).mean() < 0.12
    assert max(dices) < 0.9, dices


# ---------------------------------------------------------------- Market-1501


def test_market_layout_and_protocol(synth_market: Path) -> None:
    train = market_files(synth_market, "bounding_box_train")
    query = market_files(synth_market, "query")
    gallery = market_files(synth_market, "bounding_box_test")
    assert all(im.shape == (128, 64, 3) for _, _, im in train + query + gallery)
    train_ids = {p for p, _, _ in train}
    query_ids = {p for p, _, _ in query}
    assert len(train_ids) == 16 and len(query_ids) == 12 and not train_ids & query_ids
    assert {p for p, _, _ in gallery} == query_ids | {0, -1}  # distractors and junk in the gallery only
    assert min(train_ids | query_ids) > 0
    cams = {pid: {c for p, c, _ in train if p == pid} for pid in train_ids}
    assert all(len(c) >= 2 for c in cams.values()) and max(len(c) for c in cams.values()) >= 4
    pairs = [(p, c) for p, c, _ in query]
    assert len(pairs) == len(set(pairs))  # one query per identity and camera
    for pid in query_ids:
        assert {c for p, c in pairs if p == pid} == {c for p, c, _ in gallery if p == pid}
    names = [p.name for split in ("bounding_box_train", "query", "bounding_box_test") for p in
             (synth_market / split).iterdir()]  # fmt: skip
    assert len(names) == len(set(names))
    market = read_market1501(synth_market)
    assert len(market.train) == len(train) and len(market.query) == len(query)
    assert len(market.gallery) == sum(p != -1 for p, _, _ in gallery)


def rank1(query: list, gallery: list, feature) -> float:
    """Market protocol rank-1: same identity and same camera gallery images are ignored."""
    q = np.stack([feature(im) for _, _, im in query])
    g = np.stack([feature(im) for _, _, im in gallery])
    g_pid = np.array([p for p, _, _ in gallery])
    g_cam = np.array([c for _, c, _ in gallery])
    hits = 0
    for i, (pid, cam, _) in enumerate(query):
        dist = ((g - q[i]) ** 2).sum(1)
        dist[(g_pid == pid) & (g_cam == cam)] = np.inf
        hits += g_pid[dist.argmin()] == pid
    return hits / len(query)


def test_market_matching_needs_more_than_mean_colour(synth_market: Path) -> None:
    """Mean colour (of the whole crop or of the person region) finds few true matches, while the
    vertical colour layout of the person (relative to the crop's mean, to cancel the camera cast)
    finds most: identities share dominant colours and differ in parts and patterns."""
    query = market_files(synth_market, "query")
    gallery = [x for x in market_files(synth_market, "bounding_box_test") if x[0] >= 0]

    def layout(im: np.ndarray) -> np.ndarray:
        return (im.reshape(8, 16, 64, 3)[:, :, 16:48].mean((1, 2)) / (im.mean((0, 1)) + 1e-3)).ravel()

    whole = rank1(query, gallery, lambda im: im.mean((0, 1)))
    person = rank1(query, gallery, lambda im: im[16:112, 16:48].mean((0, 1)))
    assert whole < 0.3 and person < 0.3, (whole, person)
    assert rank1(query, gallery, layout) > max(whole, person) + 0.3


def test_market_patterns_survive_the_demo_resolution() -> None:
    """Stripes and checks still show at 64x32, the size the demo trains at: finer patterns blur into
    their mean colour there, and colour alone is what camera casts and colour jitter blur."""
    import dataclasses

    from twinview.data.synth import market

    camera = market._camera(np.random.default_rng(0))
    person = market._identity(np.random.default_rng(3))

    def torso_spread(pattern: str) -> float:
        identity = dataclasses.replace(person, pattern=pattern, bag="none", upper=(35, 45, 95),
                                       accent=(225, 225, 220))
        image = market._render(np.random.default_rng(1), market._Shot(1, 1, identity, "back", False), camera)
        small = np.asarray(Image.fromarray(image).resize((32, 64), Image.Resampling.BILINEAR), float)
        return float(small[15:29, 13:19].std())

    plain = torso_spread("plain")
    assert torso_spread("hstripes") > 3 * plain and torso_spread("check") > 3 * plain, plain


# ---------------------------------------------------------------- DSB2018 nuclei


def test_nuclei_layout_masks_and_styles(synth_nuclei: Path) -> None:
    samples = sorted(p for p in synth_nuclei.iterdir())
    assert len(samples) == 6
    modes, brightness, overlapping, touching, total = set(), [], 0, 0, 0
    for sample in samples:
        assert re.fullmatch(r"[0-9a-f]{64}", sample.name)
        assert sorted(p.name for p in sample.iterdir()) == ["images", "masks"]
        image = Image.open(sample / "images" / f"{sample.name}.png")
        modes.add(image.mode)
        assert image.size == (128, 128)
        brightness.append(np.asarray(image.convert("L")).mean())
        mask_files = sorted((sample / "masks").iterdir())
        assert len(mask_files) >= 5
        assert all(re.fullmatch(rf"{sample.name}_\d+\.png", p.name) for p in mask_files)
        masks = []
        for path in mask_files:
            mask = Image.open(path)
            assert mask.mode == "L" and mask.size == (128, 128)
            values = np.asarray(mask)
            assert set(np.unique(values)) == {0, 255}
            masks.append(values > 0)
        stack = np.stack(masks)
        total += len(masks)
        for i, mask in enumerate(masks):
            others = np.delete(stack, i, axis=0).any(0)
            shared = (mask & others).any()
            overlapping += shared
            touching += not shared and (ndimage.binary_dilation(mask) & others).any()
    assert modes == {"RGB", "RGBA"}
    assert min(brightness) < 60 and max(brightness) > 150  # fluorescence and brightfield styles
    assert touching > 0.1 * total and 0 < overlapping < 0.15 * total
    records = read_dsb2018(synth_nuclei)
    assert len(records) == 6
    assert load_nuclei(records[0]).image.shape == (128, 128, 3)


# ---------------------------------------------------------------- generator contract


@pytest.mark.parametrize("kind", synth.KINDS)
def test_same_seed_same_bytes_other_seed_other_data(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    first = request.getfixturevalue(f"synth_{kind}")  # seed 0, small
    generate(kind, tmp_path / "again", seed=0)
    generate(kind, tmp_path / "other", seed=1)
    reference = file_hashes(first)
    assert file_hashes(tmp_path / "again") == reference
    other = file_hashes(tmp_path / "other")
    assert set(other.values()).isdisjoint(reference.values())


def test_non_empty_output_is_refused_untouched(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        generate("nuclei", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError):
        generate("nuclei", tmp_path / "file")
    with pytest.raises(ValueError, match="unknown"):
        generate("ct", tmp_path / "new")
    with pytest.raises(ValueError, match="unknown size"):
        generate("msd", tmp_path / "new", size="huge")


def test_empty_output_folder_is_used(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    summary = generate("nuclei", tmp_path / "data", seed=3)
    assert summary["files"] == len([p for p in (tmp_path / "data").rglob("*") if p.is_file()])
    assert summary["images"] == 6 and summary["kind"] == "nuclei"
    json.dumps(summary)


def test_interrupted_run_leaves_nothing_under_the_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_then_fail(out: Path, seed: int, size: str) -> dict[str, object]:
        (out / "part.png").write_bytes(b"...")
        raise KeyboardInterrupt

    monkeypatch.setitem(synth._WRITERS, "nuclei", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        generate("nuclei", tmp_path / "data")
    assert list(tmp_path.iterdir()) == []
