"""The readers and inspect on the real data in ``../shared/data`` (read-only), against independent counts.

The expected numbers are recounted here from file names and dataset.json, not taken from the readers.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from twinview.data.dsb2018 import load_nuclei, read_dsb2018
from twinview.data.inspect import inspect_path
from twinview.data.market1501 import read_market1501, relabel
from twinview.data.msd import read_msd

pytestmark = pytest.mark.realdata

MARKET, MSD, DSB = "Market-1501-mini", "Task04_Hippocampus", "dsb2018-nuclei"


@pytest.fixture(scope="module")
def reports(shared_data: Path) -> dict[str, dict]:
    return {name: inspect_path(shared_data / name) for name in (MARKET, MSD, DSB)}


def _market_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".jpg")


def _pid_camera(name: str) -> tuple[int, int]:
    match = re.match(r"(-?\d+)_c(\d)s", name)
    assert match, name
    return int(match[1]), int(match[2])


def test_market_counts(shared_data: Path, reports: dict[str, dict]) -> None:
    report = reports[MARKET]
    assert report["format"] == "market1501" and report["problems"] == []
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        crops = [_pid_camera(n) for n in _market_names(shared_data / MARKET / split)]
        expected = {
            "images": len(crops),
            "ids": len({pid for pid, _ in crops if pid > 0}),
            "cameras": len({cam for _, cam in crops}),
            "junk": sum(pid == -1 for pid, _ in crops),
            "distractors": sum(pid == 0 for pid, _ in crops),
        }
        assert report["splits"][split] == expected
    assert report["splits"]["bounding_box_train"] == {
        "images": 7579,
        "ids": 450,
        "cameras": 6,
        "junk": 0,
        "distractors": 0,
    }
    assert (report["splits"]["query"]["images"], report["splits"]["query"]["ids"]) == (882, 200)
    assert (
        report["splits"]["bounding_box_test"]["images"],
        report["splits"]["bounding_box_test"]["ids"],
    ) == (2901, 199)


def test_market_unmatched_queries(shared_data: Path, reports: dict[str, dict]) -> None:
    gallery = defaultdict(set)
    for name in _market_names(shared_data / MARKET / "bounding_box_test"):
        pid, cam = _pid_camera(name)
        gallery[pid].add(cam)
    queries = [_pid_camera(n) for n in _market_names(shared_data / MARKET / "query")]
    expected = sum(not (gallery[pid] - {cam}) for pid, cam in queries)
    assert reports[MARKET]["unmatched_queries"] == expected == 13


def test_market_reader(shared_data: Path) -> None:
    data = read_market1501(shared_data / MARKET)
    assert (len(data.train), len(data.query), len(data.gallery)) == (7579, 882, 2901)
    assert sorted(relabel(data.train).values()) == list(range(450))
    assert {r.camid for r in data.query} == set(range(1, 7))


def test_msd_counts(shared_data: Path, reports: dict[str, dict]) -> None:
    dataset = json.loads((shared_data / MSD / "dataset.json").read_text())
    report = reports[MSD]
    assert report["format"] == "msd" and report["problems"] == []
    assert report["volumes"] == report["labelled"] == len(dataset["training"]) == 220
    assert report["labels"] == sorted(int(k) for k in dataset["labels"]) == [0, 1, 2]
    assert all(lo <= hi for lo, hi in zip(report["shape_min"], report["shape_max"], strict=True))
    data = read_msd(shared_data / MSD)
    assert len(data.training) == 220 and data.test == []
    assert data.labels == {0: "background", 1: "Anterior", 2: "Posterior"}


def test_dsb_counts(shared_data: Path, reports: dict[str, dict]) -> None:
    root = shared_data / DSB / "stage1_test"
    masks = list(root.glob("*/masks/*.png"))
    report = reports[DSB]
    assert report["format"] == "dsb2018" and report["problems"] == []
    assert report["images"] == len(list(root.glob("*/images/*.png"))) == 50
    assert report["instances"] == len(masks) == 3347
    records = read_dsb2018(shared_data / DSB)
    assert read_dsb2018(root) == records
    sample = load_nuclei(records[0])
    assert sample.boxes.shape == (len(records[0].masks), 4)
    assert np.array_equal(sample.semantic, (sample.instances > 0).astype(np.uint8))
    assert (sample.boxes[:, 2:] > sample.boxes[:, :2]).all()
