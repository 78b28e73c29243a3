"""The readers and inspect on good, hand-built input in each standard layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from reader_builders import (
    AXIAL,
    CORONAL,
    MARKET_NAMES,
    label_volume,
    rgb,
    square,
    volume,
    write_dicom_series,
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
from twinview.data.market1501 import parse_market_name, read_market1501, relabel
from twinview.data.msd import read_msd
from twinview.data.nifti import check_pair, load_nifti, nifti_header, read_nifti_folder


def test_nifti_folder_pairs_labels_and_reads_headers(tmp_path: Path) -> None:
    write_nifti(tmp_path / "img" / "b.nii.gz", volume(), (0.5, 0.6, 2.0))
    write_nifti(tmp_path / "img" / "a.nii", volume((3, 4, 5)))
    write_nifti(tmp_path / "lab" / "a.nii.gz", label_volume((3, 4, 5)))
    write_nifti(tmp_path / "lab" / "b.nii.gz", label_volume(), (0.5, 0.6, 2.0))
    records = read_nifti_folder(tmp_path / "img", tmp_path / "lab")
    assert [r.case_id for r in records] == ["a", "b"]
    assert records[0].label == tmp_path / "lab" / "a.nii.gz"
    assert records[1].shape == (6, 5, 4)
    assert records[1].spacing == pytest.approx((0.5, 0.6, 2.0))
    assert nifti_header(records[1].image) == ((6, 5, 4), pytest.approx((0.5, 0.6, 2.0)))
    assert [r.label for r in read_nifti_folder(tmp_path / "img")] == [None, None]


def test_load_nifti_and_check_pair(tmp_path: Path) -> None:
    image = write_nifti(tmp_path / "i.nii.gz", volume(), (1.0, 2.0, 3.0))
    label = write_nifti(tmp_path / "l.nii.gz", label_volume(), (1.0, 2.0, 3.0))
    array, affine = load_nifti(image)
    np.testing.assert_array_equal(array, volume())
    np.testing.assert_allclose(affine, np.diag([1.0, 2.0, 3.0, 1.0]))
    _, labels = check_pair(image, label)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2}


def test_read_msd_follows_dataset_json(tmp_path: Path) -> None:
    data = read_msd(write_msd(tmp_path / "Task"))
    assert (data.name, data.modality, data.labels) == ("Toy", {"0": "MRI"}, {0: "background", 1: "a", 2: "b"})
    assert [r.case_id for r in data.training] == ["case_000", "case_001"]
    assert data.training[0].label == tmp_path / "Task" / "labelsTr" / "case_000.nii.gz"
    assert data.training[0].spacing == pytest.approx((1.0, 1.5, 2.0))
    assert [(r.case_id, r.label) for r in data.test] == [("case_100", None)]


@pytest.mark.parametrize("orientation", [AXIAL, CORONAL], ids=["axial", "coronal"])
def test_dicom_series_sorted_along_normal(tmp_path: Path, orientation: tuple[float, ...]) -> None:
    uid = write_dicom_series(tmp_path, slices=5, orientation=orientation, step=2.5)
    (tmp_path / "notes.txt").write_text("not DICOM")
    [record] = read_dicom_series(tmp_path)
    assert (record.series_uid, record.modality, record.shape) == (uid, "MR", (3, 2, 5))
    assert record.spacing == pytest.approx((0.5, 0.7, 2.5))
    volume_, affine = load_dicom_series(record)
    assert volume_.dtype == np.float32 and volume_.shape == (3, 2, 5)
    np.testing.assert_allclose(volume_[0, 0, :], [2 * 10 * k - 100 for k in range(5)])
    normal = np.cross(orientation[:3], orientation[3:])
    lps = (
        np.array([5.0, -3.0, 7.0]) + 1 * 0.5 * np.array(orientation[3:]) + 1 * 0.7 * np.array(orientation[:3])
    )
    lps = lps + 3 * 2.5 * normal
    np.testing.assert_allclose(affine @ [1, 1, 3, 1], [-lps[0], -lps[1], lps[2], 1.0], atol=1e-6)


def test_dicom_series_falls_back_to_instance_number(tmp_path: Path) -> None:
    write_dicom_series(tmp_path, slices=4, order_by="instance")
    [record] = read_dicom_series(tmp_path)
    assert record.spacing == pytest.approx((0.5, 0.7, 2.5))  # SliceThickness
    volume_, affine = load_dicom_series(record)
    np.testing.assert_allclose(volume_[1, 1, :], [-100, -80, -60, -40])
    np.testing.assert_allclose(affine, np.diag([0.5, 0.7, 2.5, 1.0]))


def test_dicom_groups_two_series(tmp_path: Path) -> None:
    uids = {write_dicom_series(tmp_path / "a", slices=2), write_dicom_series(tmp_path / "b", slices=3)}
    records = read_dicom_series(tmp_path)
    assert {r.series_uid for r in records} == uids
    assert sorted(r.shape[2] for r in records) == [2, 3]


def test_image_folder_grey_rgb_8_and_16_bit(tmp_path: Path) -> None:
    grey16 = (np.arange(12, dtype=np.uint16) * 5000).reshape(3, 4)
    write_image(tmp_path / "a_grey16.png", grey16)
    write_image(tmp_path / "b_grey8.png", grey16.astype(np.uint8))
    write_image(tmp_path / "sub" / "c_rgb.jpg", rgb())
    write_image(tmp_path / "sub" / "d_rgba.png", np.dstack([rgb(), np.full((8, 4), 7, np.uint8)]))
    write_image(tmp_path / "sub" / "e_grey16.tif", grey16)
    (tmp_path / "f.txt").write_text("ignored")
    records = read_image_folder(tmp_path)
    assert [r.path.name for r in records] == [
        "a_grey16.png",
        "b_grey8.png",
        "c_rgb.jpg",
        "d_rgba.png",
        "e_grey16.tif",
    ]
    assert [(r.channels, r.bit_depth) for r in records] == [(1, 16), (1, 8), (3, 8), (3, 8), (1, 16)]
    assert (records[0].height, records[0].width) == (3, 4)
    loaded = load_image(tmp_path / "a_grey16.png")
    assert loaded.dtype == np.uint16 and loaded.shape == (3, 4, 1)
    np.testing.assert_array_equal(loaded[..., 0], grey16)
    np.testing.assert_array_equal(load_image(tmp_path / "sub" / "e_grey16.tif")[..., 0], grey16)
    rgba = load_image(tmp_path / "sub" / "d_rgba.png")
    assert rgba.dtype == np.uint8 and rgba.shape == (8, 4, 3)
    np.testing.assert_array_equal(rgba, rgb())


def test_palette_image_converted_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    rgb_image = np.zeros((2, 2, 3), np.uint8)
    rgb_image[0, 0] = (255, 0, 0)
    from PIL import Image

    Image.fromarray(rgb_image).convert("P").save(path)
    [record] = read_image_folder(tmp_path)
    assert record.channels == 3
    np.testing.assert_array_equal(load_image(path), rgb_image)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("0002_c1s1_000451_03.jpg", (2, 1, 1, 451)),
        ("1501_c6s4_001877_02.jpg", (1501, 6, 4, 1877)),
        ("0000_c3s2_000017_01.jpg", (0, 3, 2, 17)),
        ("-1_c5s3_065537_05.jpg", (-1, 5, 3, 65537)),
    ],
)
def test_parse_market_name(name: str, expected: tuple[int, int, int, int]) -> None:
    assert parse_market_name(Path("x") / name) == expected


def test_read_market1501_standard_protocol(tmp_path: Path) -> None:
    data = read_market1501(write_market(tmp_path))
    assert [(r.pid, r.camid) for r in data.train] == [(2, 1), (2, 2), (7, 3)]  # no junk, no distractor
    assert [r.pid for r in data.query] == [3, 5]
    assert sorted(r.pid for r in data.gallery) == [0, 3, 3, 5]  # distractor kept, junk dropped
    assert {r.split for r in data.gallery} == {"bounding_box_test"}
    assert data.train[2].sequence == 3 and data.train[2].frame == 77419
    assert relabel(data.train) == {2: 0, 7: 1}


def test_dsb2018_instances_semantic_and_boxes(tmp_path: Path) -> None:
    shape = (10, 12)
    first = square(shape, top=1, left=2, height=3, width=4)  # rows 1-3, cols 2-5
    second = square(shape, top=3, left=5, height=2, width=2)  # overlaps first at (3, 5)
    image = np.dstack([rgb(*shape), np.full(shape, 255, np.uint8)])  # RGBA: alpha dropped
    write_dsb_sample(tmp_path / "stage1_train", "s1", image, [first, second])
    write_dsb_sample(tmp_path / "stage1_test", "s2", rgb(*shape), [])
    (tmp_path / "stage1_train_labels.csv").write_text("ignored")
    records = read_dsb2018(tmp_path)
    assert [(r.sample_id, len(r.masks)) for r in records] == [("s2", 0), ("s1", 2)]
    assert read_dsb2018(tmp_path / "stage1_train") == [records[1]]
    sample = load_nuclei(records[1])
    assert sample.image.shape == (10, 12, 3) and sample.image.dtype == np.uint8
    np.testing.assert_array_equal(sample.image, image[..., :3])
    expected = np.zeros(shape, np.int32)
    expected[first] = 1
    expected[second] = 2  # the later mask wins where they overlap
    np.testing.assert_array_equal(sample.instances, expected)
    np.testing.assert_array_equal(sample.semantic, (first | second).astype(np.uint8))
    np.testing.assert_array_equal(sample.boxes, [[2, 1, 6, 4], [5, 3, 7, 5]])
    assert sample.boxes.dtype == np.float32
    empty = load_nuclei(records[0])
    assert empty.boxes.shape == (0, 4) and not empty.instances.any()


def test_detect_format_for_each_layout(tmp_path: Path) -> None:
    write_msd(tmp_path / "msd")
    write_market(tmp_path / "market")
    write_dsb_sample(tmp_path / "dsb", "s", rgb(), [square((8, 4), 0, 0, 2, 2)])
    write_nifti(tmp_path / "nii" / "a.nii.gz", volume())
    write_dicom_series(tmp_path / "dcm", slices=2)
    write_image(tmp_path / "img" / "deep" / "a.png", rgb())
    expected = {"msd": "msd", "market": "market1501", "dsb": "dsb2018", "nii": "nifti", "dcm": "dicom"}
    for folder, fmt in {**expected, "img": "images"}.items():
        assert detect_format(tmp_path / folder) == fmt
    assert detect_format(tmp_path / "nii" / "a.nii.gz") == "nifti"


def _inspect(path: Path) -> dict:
    report = inspect_path(path)
    assert json.loads(json.dumps(report)) == report
    assert report["problems"] == []
    return report


def test_inspect_msd(tmp_path: Path) -> None:
    report = _inspect(write_msd(tmp_path / "Task", cases=3))
    assert report["format"] == "msd" and report["path"] == str(tmp_path / "Task")
    assert (report["volumes"], report["labelled"], report["labels"]) == (4, 3, [0, 1, 2])
    assert report["shape_min"] == report["shape_max"] == [6, 5, 4]
    assert report["spacing"]["median"] == [1.0, 1.5, 2.0]


def test_inspect_nifti_folder(tmp_path: Path) -> None:
    write_nifti(tmp_path / "a.nii.gz", volume((4, 5, 6)), (1.0, 1.0, 3.0))
    write_nifti(tmp_path / "b.nii", volume((8, 3, 6)), (1.0, 1.0, 5.0))
    report = _inspect(tmp_path)
    assert report["volumes"] == 2
    assert (report["shape_min"], report["shape_max"]) == ([4, 3, 6], [8, 5, 6])
    assert report["spacing"] == {"min": [1.0, 1.0, 3.0], "max": [1.0, 1.0, 5.0], "median": [1.0, 1.0, 4.0]}


def test_inspect_market(tmp_path: Path) -> None:
    report = _inspect(write_market(tmp_path))
    splits = report["splits"]
    assert splits["bounding_box_train"] == {"images": 5, "ids": 2, "cameras": 4, "junk": 1, "distractors": 1}
    assert splits["query"] == {"images": 2, "ids": 2, "cameras": 2, "junk": 0, "distractors": 0}
    assert splits["bounding_box_test"]["distractors"] == 1 and splits["bounding_box_test"]["ids"] == 2
    assert report["unmatched_queries"] == 0
    names = {**MARKET_NAMES, "bounding_box_test": ["0003_c1s1_000561_01.jpg", "0005_c6s2_003002_01.jpg"]}
    assert _inspect(write_market(tmp_path / "same_camera", names))["unmatched_queries"] == 1


def test_inspect_dicom(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "a", slices=3)
    write_dicom_series(tmp_path / "b", slices=2, order_by="instance")
    report = _inspect(tmp_path)
    assert (report["series"], report["slices"], report["modalities"]) == (2, 5, ["MR"])
    assert sorted(s["shape"] for s in report["series_details"]) == [[3, 2, 2], [3, 2, 3]]


def test_inspect_images(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", np.zeros((5, 7), np.uint16))
    write_image(tmp_path / "b.jpg", rgb(9, 3))
    report = _inspect(tmp_path)
    assert report["images"] == 2
    assert (report["size_min"], report["size_max"]) == ([5, 3], [9, 7])
    assert (report["channels"], report["bit_depths"]) == ({"1": 1, "3": 1}, {"16": 1, "8": 1})


def test_inspect_dsb2018(tmp_path: Path) -> None:
    masks = [square((8, 4), 0, 0, 2, 2), square((8, 4), 4, 1, 3, 3)]
    write_dsb_sample(tmp_path, "s1", rgb(), masks)
    write_dsb_sample(tmp_path, "s2", rgb(), masks[:1])
    report = _inspect(tmp_path)
    assert (report["images"], report["instances"], report["unlabelled"]) == (2, 3, 0)
