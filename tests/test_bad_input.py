"""Bad input: every reader raises DataError naming the file and the reason; inspect lists problems.

Each inspect test also checks that nothing below the input folder was created, removed or modified.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from reader_builders import (
    CORONAL,
    SECRET_ID,
    SECRET_NAME,
    label_volume,
    rgb,
    snapshot,
    square,
    volume,
    write_dicom_series,
    write_dicom_slice,
    write_dsb_sample,
    write_image,
    write_market,
    write_msd,
    write_nifti,
)

from twinview.data.dicom import load_dicom_series, read_dicom_series
from twinview.data.dsb2018 import load_nuclei, read_dsb2018
from twinview.data.images import load_image, read_image_folder
from twinview.data.inspect import detect_format, inspect_path
from twinview.data.market1501 import parse_market_name, read_market1501
from twinview.data.msd import read_msd
from twinview.data.nifti import check_pair, load_nifti, read_nifti_folder
from twinview.data.person_folder import read_person_folder
from twinview.errors import DataError

NON_UTF8 = b"caf\xe9"  # Latin-1 "café": not valid UTF-8
READABLE = "caf\\xe9"  # how errors and reports show it


def _raises(call: Callable[[], object], path: Path | str, reason: str) -> DataError:
    """Assert that ``call`` raises a DataError whose message names ``path`` and contains ``reason``."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    message.encode("utf-8")  # printable as UTF-8, also for non-UTF-8 file names
    assert str(path) in message and reason in message, message
    return info.value


def _inspect_unchanged(path: Path) -> dict:
    """inspect_path on ``path``: JSON-serialisable, and the folder is left exactly as it was."""
    before = snapshot(path)
    report = inspect_path(path)
    assert snapshot(path) == before
    json.dumps(report, ensure_ascii=False).encode("utf-8")
    return report


def _problem_files(report: dict) -> dict[str, str]:
    return {Path(p["file"]).name: p["reason"] for p in report["problems"]}


def _truncate(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


# --- empty, missing and unknown input --------------------------------------------------------------


@pytest.mark.parametrize(
    ("reader", "reason"),
    [
        (read_nifti_folder, "no NIfTI files"),
        (read_msd, "missing dataset.json"),
        (read_dicom_series, "no DICOM files"),
        (read_image_folder, "no images"),
        (read_person_folder, "no images"),
        (read_market1501, "missing split folder"),
        (read_dsb2018, "no DSB2018 samples"),
        (detect_format, "empty folder"),
        (inspect_path, "empty folder"),
    ],
)
def test_empty_folder(tmp_path: Path, reader: Callable[[Path], object], reason: str) -> None:
    _raises(lambda: reader(tmp_path), tmp_path, reason)
    assert list(tmp_path.iterdir()) == []


def test_unknown_layout_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "table.csv").write_text("a,b\n")
    _raises(lambda: inspect_path(tmp_path), tmp_path, "unknown layout")
    _raises(lambda: detect_format(tmp_path / "notes.txt"), "notes.txt", "unknown file type")
    _raises(lambda: inspect_path(tmp_path / "absent"), "absent", "no such file or folder")
    _raises(lambda: read_image_folder(tmp_path / "absent"), "absent", "no such file or folder")


# --- NIfTI and MSD ----------------------------------------------------------------------------------


def test_truncated_nifti(tmp_path: Path) -> None:
    good = write_nifti(tmp_path / "good.nii.gz", volume((20, 20, 20)))
    bad = _truncate(write_nifti(tmp_path / "bad.nii.gz", volume((20, 20, 20))), -500)
    header_only = _truncate(write_nifti(tmp_path / "tiny.nii.gz", volume()), 30)
    _raises(lambda: load_nifti(bad), "bad.nii.gz", "truncated or corrupt NIfTI")
    _raises(lambda: load_nifti(header_only), "tiny.nii.gz", "not a readable NIfTI file")
    load_nifti(good)
    report = _inspect_unchanged(tmp_path)
    assert report["volumes"] == 1
    problems = _problem_files(report)
    assert set(problems) == {"bad.nii.gz", "tiny.nii.gz"}
    assert "truncated or corrupt NIfTI" in problems["bad.nii.gz"]


def test_missing_label_names_the_image(tmp_path: Path) -> None:
    write_nifti(tmp_path / "img" / "a.nii.gz", volume())
    write_nifti(tmp_path / "img" / "b.nii.gz", volume())
    write_nifti(tmp_path / "lab" / "a.nii.gz", label_volume())
    _raises(lambda: read_nifti_folder(tmp_path / "img", tmp_path / "lab"), "b.nii.gz", "no label file")


def test_shape_and_affine_mismatch_name_the_label(tmp_path: Path) -> None:
    image = write_nifti(tmp_path / "i.nii.gz", volume())
    small = write_nifti(tmp_path / "small.nii.gz", label_volume((6, 5, 3)))
    shifted = write_nifti(tmp_path / "shifted.nii.gz", label_volume(), (1.0, 1.0, 1.01))
    _raises(lambda: check_pair(image, small), "small.nii.gz", "label shape (6, 5, 3) differs from image")
    _raises(lambda: check_pair(image, shifted), "shifted.nii.gz", "label affine differs")


def _broken_msd(root: Path) -> Path:
    """An MSD task with 6 cases: 2 good, then shape mismatch, affine mismatch, unknown label, missing file."""
    write_msd(root, cases=6)
    write_nifti(root / "labelsTr" / "case_002.nii.gz", label_volume((6, 5, 3)))
    write_nifti(root / "labelsTr" / "case_003.nii.gz", label_volume(), (1.0, 1.5, 2.5))
    write_nifti(root / "labelsTr" / "case_004.nii.gz", label_volume(values=(0, 1, 7)), (1.0, 1.5, 2.0))
    (root / "labelsTr" / "case_005.nii.gz").unlink()
    (root / "imagesTs" / "case_100.nii.gz").unlink()
    return root


def test_msd_bad_cases_are_problems(tmp_path: Path) -> None:
    root = _broken_msd(tmp_path / "Task")
    _raises(lambda: read_msd(root), "case_005.nii.gz", "listed in dataset.json but not found")
    report = _inspect_unchanged(root)
    assert (report["volumes"], report["labelled"], report["labels"]) == (2, 2, [0, 1, 2])
    assert [p["file"] for p in report["problems"]] == [
        str(root / "labelsTr" / f"case_00{i}.nii.gz") for i in (2, 3, 4, 5)
    ] + [str(root / "imagesTs" / "case_100.nii.gz")]
    reasons = [p["reason"] for p in report["problems"]]
    assert "label shape" in reasons[0] and "label affine" in reasons[1]
    assert reasons[2] == "label values [7] not in dataset.json labels [0, 1, 2]"
    assert reasons[3] == reasons[4] == "listed in dataset.json but not found"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "top level must be an object"),
        ('{"training": [["a", "b"]]}', "training[0]: expected an object"),
        ('{"training": [{"image": "./imagesTr/a.nii.gz"}]}', "training[0].label: expected a file path"),
        ('{"labels": {"zero": "background"}}', "'labels' keys must be integers"),
    ],
)
def test_invalid_dataset_json(tmp_path: Path, text: str, reason: str) -> None:
    (tmp_path / "dataset.json").write_text(text)
    _raises(lambda: read_msd(tmp_path), "dataset.json", reason)
    _raises(lambda: inspect_path(tmp_path), "dataset.json", reason)


# --- DICOM ------------------------------------------------------------------------------------------


def test_corrupt_dicom(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "ok", slices=2)
    # An undefined-length sequence that never ends.
    explicit_le = b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\0"
    sequence = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\0" * 20
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + explicit_le + sequence)
    (tmp_path / "readme").write_text("no DICM marker: skipped")
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")  # an index, not a slice: skipped
    _raises(lambda: read_dicom_series(tmp_path), "broken.dcm", "corrupt DICOM")
    report = _inspect_unchanged(tmp_path)
    assert report["series"] == 1 and list(_problem_files(report)) == ["broken.dcm"]
    cut = _truncate(sorted((tmp_path / "ok").rglob("IM*"))[0], 300)
    (tmp_path / "broken.dcm").unlink()
    _raises(
        lambda: read_dicom_series(tmp_path), cut.name, "missing SeriesInstanceUID (not an image slice, or a"
    )


def test_truncated_dicom_pixels(tmp_path: Path) -> None:
    write_dicom_series(tmp_path, slices=3)
    victim = sorted(tmp_path.rglob("IM*"))[0]
    _truncate(victim, -4)
    [record] = read_dicom_series(tmp_path)
    _raises(lambda: load_dicom_series(record), victim.name, "cannot decode pixel data")
    assert list(_problem_files(_inspect_unchanged(tmp_path))) == [victim.name]


def test_inconsistent_dicom_series(tmp_path: Path) -> None:
    pixels = np.zeros((2, 2), np.uint16)
    write_dicom_slice(tmp_path / "a", "1.2.3", pixels, (0.0, 0.0, 0.0))
    write_dicom_slice(tmp_path / "b", "1.2.3", pixels, (0.0, 0.0, 0.0))
    _raises(lambda: read_dicom_series(tmp_path), "b", "two slices at the same position")
    write_dicom_slice(tmp_path / "b", "1.2.3", pixels, (0.0, 0.0, 1.0), orientation=CORONAL)
    _raises(lambda: read_dicom_series(tmp_path), "b", "slice orientation differs")
    write_dicom_slice(tmp_path / "b", "1.2.3", np.zeros((3, 2), np.uint16), (0.0, 0.0, 1.0))
    _raises(lambda: read_dicom_series(tmp_path), "b", "slice size 3x2 differs from 2x2")
    assert _problem_files(_inspect_unchanged(tmp_path)) == {"b": "slice size 3x2 differs from 2x2"}


def test_dicom_patient_tags_never_leak(tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog) -> None:
    caplog.set_level(logging.DEBUG)
    write_dicom_series(tmp_path, slices=4)  # files alternate between sub0/ and sub1/
    header_cut = sorted((tmp_path / "sub0").iterdir())[0]
    data = header_cut.read_bytes()
    header_cut.write_bytes(data[: data.index(SECRET_ID.encode()) + len(SECRET_ID)])  # cut after patient tags
    _truncate(sorted((tmp_path / "sub1").iterdir())[0], -4)  # pixel data cut
    records = read_dicom_series(tmp_path / "sub1")
    texts = [repr(records), json.dumps(inspect_path(tmp_path))]
    texts.append(
        str(_raises(lambda: read_dicom_series(tmp_path), header_cut.name, "missing SeriesInstanceUID"))
    )
    texts.append(str(_raises(lambda: load_dicom_series(records[0]), "sub1", "cannot decode pixel data")))
    captured = capsys.readouterr()
    texts += [captured.out, captured.err, caplog.text]
    assert SECRET_NAME.encode() in (tmp_path / "sub1" / "IM0001").read_bytes()  # the secret is in the files
    for text in texts:
        assert "SECRET" not in text and "19010203" not in text, text


# --- 2D images --------------------------------------------------------------------------------------


def test_unreadable_and_truncated_images(tmp_path: Path) -> None:
    write_image(tmp_path / "good.png", rgb())
    (tmp_path / "garbage.png").write_bytes(b"this is not a PNG")
    _truncate(write_image(tmp_path / "cut.png", rgb(64, 64)), 200)
    _truncate(write_image(tmp_path / "cut.jpg", rgb(64, 64)), 300)
    _raises(lambda: load_image(tmp_path / "garbage.png"), "garbage.png", "not a readable image")
    _raises(lambda: read_image_folder(tmp_path / "garbage.png"), "garbage.png", "not a readable image")
    for name in ("cut.png", "cut.jpg"):
        _raises(lambda name=name: load_image(tmp_path / name), name, "unreadable or truncated image")
    report = _inspect_unchanged(tmp_path)
    assert report["images"] == 1
    assert set(_problem_files(report)) == {"garbage.png", "cut.png", "cut.jpg"}


def test_non_utf8_file_names(tmp_path: Path) -> None:
    folder = os.fsencode(tmp_path)
    good = Path(os.fsdecode(os.path.join(folder, NON_UTF8 + b"_good.png")))
    write_image(good, rgb())
    bad = Path(os.fsdecode(os.path.join(folder, NON_UTF8 + b".png")))
    bad.write_bytes(b"broken")
    _raises(lambda: load_image(bad), f"{READABLE}.png", "not a readable image")
    assert load_image(good).shape == (8, 4, 3)
    report = _inspect_unchanged(tmp_path)
    assert report["images"] == 1
    assert report["problems"] == [
        {"file": f"{tmp_path}/{READABLE}.png", "reason": "not a readable image (PNG, JPEG or TIFF)"}
    ]
    nifti = Path(os.fsdecode(os.path.join(folder, NON_UTF8 + b".nii.gz")))
    _truncate(write_nifti(nifti, volume((20, 20, 20))), -500)
    _raises(lambda: load_nifti(nifti), f"{READABLE}.nii.gz", "truncated or corrupt NIfTI")
    _raises(lambda: parse_market_name(good), f"{READABLE}_good.png", "name does not match")


# --- Market-1501 ------------------------------------------------------------------------------------


def test_market_bad_names_and_files(tmp_path: Path) -> None:
    write_market(tmp_path)
    write_image(tmp_path / "query" / "0003_c1_000551.jpg", rgb())
    (tmp_path / "bounding_box_test" / "0005_c1s1_000123_01.jpg").write_bytes(b"broken jpeg")
    _raises(
        lambda: read_market1501(tmp_path), "0003_c1_000551.jpg", "name does not match PPPP_cCsS_FFFFFF_BB.jpg"
    )
    report = _inspect_unchanged(tmp_path)
    problems = _problem_files(report)
    assert problems == {
        "0003_c1_000551.jpg": "name does not match PPPP_cCsS_FFFFFF_BB.jpg",
        "0005_c1s1_000123_01.jpg": "not a readable image (PNG, JPEG or TIFF)",
    }
    assert report["splits"]["query"]["images"] == 2


@pytest.mark.parametrize(
    "name", ["1_c1s1_000001_01.jpg", "0001_c0s1_000001_01.jpg", "0001_c1s1_00001_01.jpg"]
)
def test_market_name_does_not_parse(name: str) -> None:
    _raises(lambda: parse_market_name(name), name, "name does not match")


def test_market_missing_and_empty_splits(tmp_path: Path) -> None:
    write_market(tmp_path)
    for path in (tmp_path / "query").iterdir():
        if path.suffix == ".jpg":
            path.unlink()
    _raises(lambda: read_market1501(tmp_path), "query", "no images")
    assert _problem_files(_inspect_unchanged(tmp_path)) == {"query": "no images"}
    (tmp_path / "query" / "Thumbs.db").unlink()
    (tmp_path / "query").rmdir()
    _raises(lambda: read_market1501(tmp_path), "query", "missing split folder")
    assert _problem_files(_inspect_unchanged(tmp_path)) == {"query": "missing split folder"}


def test_market_distractor_query_is_an_error(tmp_path: Path) -> None:
    write_market(tmp_path)
    write_image(tmp_path / "query" / "0000_c1s1_000001_01.jpg", rgb())
    _raises(lambda: read_market1501(tmp_path), "0000_c1s1_000001_01.jpg", "distractor (pid 0000) in query")
    assert list(_problem_files(_inspect_unchanged(tmp_path))) == ["0000_c1s1_000001_01.jpg"]


# --- DSB2018 ----------------------------------------------------------------------------------------


def test_dsb_mask_shape_mismatch_and_empty_mask(tmp_path: Path) -> None:
    write_dsb_sample(tmp_path, "good", rgb(), [square((8, 4), 0, 0, 2, 2)])
    write_dsb_sample(tmp_path, "wrong", rgb(), [square((8, 5), 0, 0, 2, 2)])
    write_dsb_sample(tmp_path, "empty", rgb(), [np.zeros((8, 4), bool)])
    records = {r.sample_id: r for r in read_dsb2018(tmp_path)}
    _raises(lambda: load_nuclei(records["wrong"]), "mask_00.png", "mask size 8x5 differs from image 8x4")
    _raises(lambda: load_nuclei(records["empty"]), "mask_00.png", "empty mask")
    report = _inspect_unchanged(tmp_path)
    assert (report["images"], report["instances"]) == (3, 1)
    assert [Path(p["file"]).parts[-3] for p in report["problems"]] == ["empty", "wrong"]


def test_dsb_missing_image(tmp_path: Path) -> None:
    write_dsb_sample(tmp_path, "good", rgb(), [square((8, 4), 0, 0, 2, 2)])
    (tmp_path / "noimage" / "images").mkdir(parents=True)
    _raises(lambda: read_dsb2018(tmp_path), "noimage.png", "missing sample image")
    report = _inspect_unchanged(tmp_path)
    assert report["images"] == 1 and _problem_files(report) == {"noimage.png": "missing sample image"}
