"""COCO detection sets: reading, writing, DSB2018 conversion, summary, inspection and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reader_builders import rgb, write_dsb_sample, write_image

from twinview.data.coco import DetImage, DetSet, coco_summary, dsb2018_coco, read_coco, write_coco
from twinview.data.dsb2018 import load_nuclei, read_dsb2018
from twinview.data.inspect import detect_format, inspect_path
from twinview.errors import DataError
from twinview_cli.main import main


def write_set(root: Path, annotations: list[dict[str, Any]], *,
              sizes: dict[int, tuple[int, int]] | None = None, name: str = "set.json") -> Path:
    """Images ``images/<id>.png`` (``{id: (height, width)}``, default two of 20x30) and a COCO JSON."""
    sizes = sizes or {1: (20, 30), 2: (20, 30)}
    for image_id, (height, width) in sizes.items():
        write_image(root / "images" / f"{image_id}.png", rgb(height, width, image_id))
    data = {
        "images": [{"id": i, "file_name": f"images/{i}.png", "width": w, "height": h}
                   for i, (h, w) in sizes.items()],
        "annotations": [{"id": k, "iscrowd": 0, **ann} for k, ann in enumerate(annotations, start=1)],
        "categories": [{"id": 1, "name": "cell"}, {"id": 3, "name": "debris"}],
    }
    (root / name).write_text(json.dumps(data))
    return root / name


def ann(image_id: int, bbox: list[float], category: int = 1, **extra: Any) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": category, "bbox": bbox, **extra}


def test_read_converts_xywh_to_xyxy_and_keeps_background_images(tmp_path: Path) -> None:
    path = write_set(tmp_path, [ann(1, [2, 3, 4, 5]), ann(1, [10.5, 0, 0.25, 7], 3)])
    det_set = read_coco(path)
    assert det_set.categories == {1: "cell", 3: "debris"}
    assert det_set.source == path and (det_set.clipped, det_set.dropped) == (0, 0)
    first, background = det_set.images
    assert (first.id, first.path, first.width, first.height) == (1, tmp_path / "images" / "1.png", 30, 20)
    np.testing.assert_array_equal(first.boxes, [[2, 3, 6, 8], [10.5, 0, 10.75, 7]])
    assert first.boxes.dtype == np.float32 and first.labels.dtype == np.int64
    np.testing.assert_array_equal(first.labels, [1, 3])
    assert background.boxes.shape == (0, 4) and background.labels.shape == (0,)


def test_write_then_read_round_trips_boxes_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 100, (50, 2, 2)).astype(np.float32)
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1) + 0.1], axis=1).astype(np.float32)
    labels = rng.integers(1, 3, 50).astype(np.int64)
    for i in (7, 9):
        write_image(tmp_path / "data" / "sub" / f"{i}.png", rgb(120, 110, i))
    det_set = DetSet([DetImage(7, tmp_path / "data" / "sub" / "7.png", 110, 120, boxes, labels),
                      DetImage(9, tmp_path / "data" / "sub" / "9.png", 110, 120, np.zeros((0, 4), np.float32),
                               np.zeros(0, np.int64))], {1: "a", 2: "b"}, tmp_path)
    out = write_coco(det_set, tmp_path / "out" / "set.json", image_root=tmp_path / "data")
    data = json.loads(out.read_text())
    assert [image["file_name"] for image in data["images"]] == ["sub/7.png", "sub/9.png"]
    assert {"id", "image_id", "category_id", "bbox", "area", "iscrowd"} <= set(data["annotations"][0])
    back = read_coco(out, image_root=tmp_path / "data")
    assert back.categories == det_set.categories
    for written, read in zip(det_set.images, back.images, strict=True):
        assert (read.id, read.path, read.width, read.height) == (written.id, written.path, 110, 120)
        np.testing.assert_array_equal(read.boxes, written.boxes)
        np.testing.assert_array_equal(read.labels, written.labels)
    # by default file names are relative to the JSON's folder, where read_coco looks first
    again = read_coco(write_coco(back, tmp_path / "elsewhere" / "set.json"))
    assert [image.path.resolve() for image in again.images] == [image.path.resolve() for image in back.images]


def test_image_root_defaults_to_the_json_folder_then_its_images_folder(tmp_path: Path) -> None:
    path = write_set(tmp_path, [ann(1, [0, 0, 2, 2])])
    data = json.loads(path.read_text())
    for image in data["images"]:
        image["file_name"] = image["file_name"].removeprefix("images/")
    path.write_text(json.dumps(data))
    assert [image.path for image in read_coco(path).images] == [tmp_path / "images" / "1.png",
                                                                tmp_path / "images" / "2.png"]


def test_boxes_outside_are_clipped_and_empty_ones_dropped_with_one_warning(tmp_path: Path) -> None:
    path = write_set(tmp_path, [ann(1, [-2, 5, 6, 4]), ann(1, [25, 15, 10, 10]), ann(1, [3, 3, 0, 5]),
                                ann(2, [40, 0, 5, 5]), ann(2, [1, 1, 2, 2]), ann(2, [5, 5, 3, 3], iscrowd=1)])
    with pytest.warns(UserWarning, match=r"set\.json: 2 box\(es\) clipped .* 2 zero-area box\(es\) dropped"):
        det_set = read_coco(path)
    assert (det_set.clipped, det_set.dropped) == (2, 2)
    np.testing.assert_array_equal(det_set.images[0].boxes, [[0, 5, 4, 9], [25, 15, 30, 20]])
    np.testing.assert_array_equal(det_set.images[1].boxes, [[1, 1, 3, 3]])  # the crowd region is not a box


def test_an_unknown_category_is_an_error_naming_file_and_id(tmp_path: Path) -> None:
    path = write_set(tmp_path, [ann(1, [0, 0, 2, 2]), ann(2, [0, 0, 2, 2], category=7)])
    with pytest.raises(DataError, match=r"set\.json: annotations\[1\]: category id 7 is not in 'categories'"):
        read_coco(path)


def test_missing_image_files_are_one_error_naming_the_first_few(tmp_path: Path) -> None:
    path = write_set(tmp_path, [], sizes={i: (4, 4) for i in range(1, 10)})
    for i in (2, 3, 4, 5, 6, 7, 9):
        (tmp_path / "images" / f"{i}.png").unlink()
    with pytest.raises(DataError) as err:
        read_coco(path)
    message = str(err.value)
    assert message.startswith(f"{path}: 7 image file(s) missing: ")
    assert "images/2.png" in message and "images/6.png" in message and "and 2 more" in message
    assert "images/7.png" not in message and "images/1.png" not in message and "\n" not in message


@pytest.mark.parametrize("text, reason", [
    ("{\"images\": [", "invalid JSON"),
    ("[]", "expected a JSON object"),
    ("{\"images\": [], \"categories\": []}", "missing key(s) 'annotations'"),
    ("{\"images\": [{\"id\": 1, \"width\": 3, \"height\": 3}], \"annotations\": [], \"categories\": []}",
     "images[0]: missing key 'file_name'"),
    ("{\"images\": [], \"annotations\": [{\"image_id\": 1, \"category_id\": 1, \"bbox\": [0, 0, 1, 1]}], "
     "\"categories\": [{\"id\": 1, \"name\": \"a\"}]}", "annotations[0]: image id 1 is not in 'images'"),
    ("{\"images\": [], \"annotations\": [{\"image_id\": 1, \"category_id\": 1, \"bbox\": [0, 0, 1]}], "
     "\"categories\": []}", "annotations[0]: 'bbox' must be four finite numbers"),
    ("{\"images\": [], \"annotations\": [], \"categories\": [{\"id\": 1, \"name\": \"a\"}, "
     "{\"id\": 1, \"name\": \"b\"}]}", "categories[1]: category id 1 appears twice"),
    ("{\"images\": [{\"id\": 1, \"file_name\": \"a.png\", \"width\": 3, \"height\": 3}, "
     "{\"id\": 1, \"file_name\": \"b.png\", \"width\": 3, \"height\": 3}], \"annotations\": [], "
     "\"categories\": []}", "image id 1 appears twice in 'images'"),
])
def test_malformed_json_is_an_error_naming_the_file(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match="^" + str(path).replace(".", r"\.") + ": .*") as err:
        read_coco(path)
    assert reason in str(err.value)


def test_dsb2018_masks_become_boxes(synth_nuclei: Path) -> None:
    det_set = dsb2018_coco(synth_nuclei)
    records = read_dsb2018(synth_nuclei)
    assert det_set.categories == {1: "nucleus"}
    assert [image.id for image in det_set.images] == list(range(1, len(records) + 1))
    for image, record in zip(det_set.images, records, strict=True):
        sample = load_nuclei(record)
        assert image.path == record.image and (image.height, image.width) == sample.image.shape[:2]
        assert len(image.boxes) == len(record.masks) > 0
        np.testing.assert_array_equal(image.boxes, sample.boxes)
        np.testing.assert_array_equal(image.labels, np.ones(len(record.masks)))


def test_dsb2018_samples_without_masks_are_background(tmp_path: Path) -> None:
    square = np.zeros((8, 6), bool)
    square[1:3, 2:5] = True
    write_dsb_sample(tmp_path, "a", rgb(8, 6), [square])
    write_dsb_sample(tmp_path, "b", rgb(8, 6), [])
    det_set = dsb2018_coco(tmp_path)
    np.testing.assert_array_equal(det_set.images[0].boxes, [[2, 1, 5, 3]])
    assert det_set.images[1].boxes.shape == (0, 4)


def test_summary_counts_a_hand_made_set(tmp_path: Path) -> None:
    def image(i: int, boxes: list[list[float]], labels: list[int]) -> DetImage:
        return DetImage(i, tmp_path / f"{i}.png", 50, 50, np.array(boxes, np.float32).reshape(-1, 4),
                        np.array(labels, np.int64))

    det_set = DetSet([image(1, [[0, 0, 2, 2], [0, 0, 4, 4], [0, 0, 3, 12]], [1, 1, 2]),
                      image(2, [[10, 10, 20, 20]], [1]), image(3, [], [])],
                     {1: "cell", 2: "debris", 5: "unused"}, tmp_path, clipped=4, dropped=1)
    assert coco_summary(det_set) == {
        "images": 3,
        "boxes": 4,
        "boxes_per_image": {"min": 0, "median": 1.0, "max": 3},
        "categories": {"1": {"name": "cell", "boxes": 3}, "2": {"name": "debris", "boxes": 1},
                       "5": {"name": "unused", "boxes": 0}},
        "box_size": {"min": 2.0, "median": 5.0, "max": 10.0},
        "clipped": 4,
        "dropped": 1,
        "images_without_boxes": 1,
    }
    assert coco_summary(DetSet([image(1, [], [])], {}, tmp_path))["box_size"] is None


def test_inspect_reports_a_coco_folder_and_file_with_problems(tmp_path: Path) -> None:
    path = write_set(tmp_path, [ann(1, [0, 0, 2, 2]), ann(2, [25, 0, 10, 5], 3)],
                     sizes={1: (20, 30), 2: (20, 30), 3: (10, 10), 4: (10, 10)})
    (tmp_path / "images" / "3.png").unlink()
    write_image(tmp_path / "images" / "4.png", rgb(11, 10))  # differs from the JSON's 10x10
    assert detect_format(tmp_path) == detect_format(path) == "coco"
    for target in (tmp_path, path):
        report = inspect_path(target)
        assert report["format"] == "coco" and report["file"] == str(path)
        assert report["image_root"] == str(tmp_path)
        counts = ("images", "boxes", "clipped", "dropped", "images_without_boxes")
        assert [report[key] for key in counts] == [2, 2, 1, 0, 0]
        assert report["categories"]["3"] == {"name": "debris", "boxes": 1}
        assert report["problems"] == [
            {"file": str(tmp_path / "images" / "3.png"), "reason": "image file missing"},
            {"file": str(tmp_path / "images" / "4.png"),
             "reason": "image is 11x10 (height x width), the JSON says 10x10"},
        ]


def test_inspect_refuses_a_folder_with_several_coco_files(tmp_path: Path) -> None:
    write_set(tmp_path, [], name="train.json")
    write_set(tmp_path, [], name="val.json")
    with pytest.raises(DataError, match=r"2 COCO files \(train\.json, val\.json\); inspect one of them"):
        inspect_path(tmp_path)
    assert inspect_path(tmp_path / "val.json")["images"] == 2


def test_cli_converts_dsb2018_and_inspects_the_json(synth_nuclei: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "coco" / "nuclei.json"
    assert main(["data", "coco", str(synth_nuclei), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    det_set = read_coco(out)
    expected = dsb2018_coco(synth_nuclei)
    assert printed["out"] == str(out) and printed["boxes"] == sum(len(i.boxes) for i in expected.images)
    assert [image.path.resolve() for image in det_set.images] == [i.path.resolve() for i in expected.images]
    for read, made in zip(det_set.images, expected.images, strict=True):
        np.testing.assert_array_equal(read.boxes, made.boxes)
    assert main(["data", "inspect", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "coco"


def test_cli_coco_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["data", "coco", "--help"])
    assert done.value.code == 0 and "DSB2018" in capsys.readouterr().out


def test_cli_coco_errors_are_one_line(tmp_path: Path, synth_nuclei: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "coco", str(synth_nuclei), "--out", str(tmp_path / "x.txt")]) == 2
    assert capsys.readouterr().err.strip().endswith("x.txt: the output must be a .json file path")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "coco", str(empty), "--out", str(tmp_path / "x.json")]) == 2
    assert "no DSB2018 samples" in capsys.readouterr().err
    copy = tmp_path / "nuclei"
    shutil.copytree(synth_nuclei, copy)
    next(copy.glob("*/masks/*.png")).write_bytes(b"not a png")
    assert main(["data", "coco", str(copy), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable image" in err and not (tmp_path / "x.json").exists()
