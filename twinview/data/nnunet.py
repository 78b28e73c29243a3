"""nnU-Net v2 raw data sets (``nnUNet_raw/DatasetXXX_Name``): read, and write from an MSD task.

Layout: ``dataset.json`` with ``channel_names`` (``{"0": "T2", "1": "ADC"}``), ``labels`` (name ->
integer value, ``"background": 0`` required; region-based data sets give a list of values per region,
such as ``"whole tumor": [1, 2, 3]``, with ``regions_class_order``), ``numTraining`` and
``file_ending`` (``.nii.gz`` or ``.nii`` here); ``imagesTr/CASE_XXXX<ending>`` holds channel ``XXXX`` of
case ``CASE`` (one file per channel), ``labelsTr/CASE<ending>`` its label map, and ``imagesTs/`` the
unlabelled test cases in the same naming.

The label maps hold integer values; a model trains on those values as classes. A value's name is its
own entry in ``labels``; in a region-based set, nnU-Net writes the i-th region as the value
``regions_class_order[i]``, so that value takes the region's name (BraTS: 1 whole tumour, 2 tumour core,
3 enhancing tumour), and the regions (unions of values) are kept for evaluation.

:func:`scan_nnunet` collects every problem (a missing or extra channel, a label without images, a case
without a label, a ``numTraining`` that disagrees) for ``inspect``; :func:`read_nnunet` raises the first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib

from twinview.data.msd import load_dataset_json
from twinview.data.nifti import NIFTI_SUFFIXES, is_nifti, load_nifti
from twinview.errors import DataError

PathLike = str | os.PathLike[str]
DATASET_JSON = "dataset.json"
IMAGES_TR, LABELS_TR, IMAGES_TS = "imagesTr", "labelsTr", "imagesTs"
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class SegCase:
    """One case of a multi-channel segmentation set: its channel files in channel order, and its label
    map (None for unlabelled cases). A single 4D file (channels last) is one entry holding them all."""

    case_id: str
    channels: tuple[Path, ...]
    label: Path | None


@dataclass(frozen=True)
class NNUNetDataset:
    root: Path
    name: str
    channel_names: dict[int, str]
    labels: dict[int, str]  # integer value -> name
    regions: dict[str, list[int]]  # region-based sets only: region name -> the values it unites
    file_ending: str
    training: list[SegCase]
    test: list[SegCase]


def is_nnunet(path: PathLike) -> bool:
    """A folder whose dataset.json has ``channel_names`` (an MSD one has ``modality`` instead)."""
    json_path = Path(path) / DATASET_JSON
    if not json_path.is_file():
        return False
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "channel_names" in data


def read_nnunet(root: PathLike) -> NNUNetDataset:
    """The data set at ``root``; the first problem that :func:`scan_nnunet` finds is raised."""
    dataset, problems = scan_nnunet(root)
    if problems:
        raise problems[0]
    return dataset


def scan_nnunet(root: PathLike) -> tuple[NNUNetDataset, list[DataError]]:
    """The cases that are complete, and a DataError per problem (files named). An unreadable or
    malformed dataset.json raises at once: nothing can be read without it."""
    root = Path(root)
    json_path = root / DATASET_JSON
    data = load_dataset_json(json_path, "an nnU-Net raw data set")
    channel_names = _channel_names(json_path, data)
    labels, regions = _labels(json_path, data)
    ending = data.get("file_ending", ".nii.gz")
    if ending not in NIFTI_SUFFIXES:
        raise DataError(json_path, f"file_ending {ending!r} is not supported: twinview reads NIfTI "
                                   f"({', '.join(NIFTI_SUFFIXES)}); convert the images first")
    problems: list[DataError] = []
    training, broken = _cases(root / IMAGES_TR, ending, len(channel_names), problems)
    label_files = _files(root / LABELS_TR, ending)
    for case_id in sorted(set(label_files) - {c.case_id for c in training} - broken):
        problems.append(DataError(label_files[case_id], f"a label without images in {IMAGES_TR}/"))
    labelled = []
    for case in training:
        if case.case_id in label_files:
            labelled.append(SegCase(case.case_id, case.channels, label_files[case.case_id]))
        else:
            problems.append(DataError(case.channels[0], f"case {case.case_id!r} has no label "
                                                        f"{LABELS_TR}/{case.case_id}{ending}"))
    expected = data.get("numTraining")
    if isinstance(expected, int) and expected != len(label_files):
        problems.append(DataError(json_path, f"numTraining is {expected}, but {LABELS_TR}/ holds "
                                             f"{len(label_files)} label files"))
    test = []
    if (root / IMAGES_TS).is_dir():
        test = _cases(root / IMAGES_TS, ending, len(channel_names), problems)[0]
    name = str(data.get("name") or root.name)
    return NNUNetDataset(root, name, channel_names, labels, regions, ending, labelled, test), problems


def _channel_names(json_path: Path, data: dict[str, Any]) -> dict[int, str]:
    names = data.get("channel_names")
    if not isinstance(names, dict) or not names:
        raise DataError(json_path, "'channel_names' must be a non-empty object such as {\"0\": \"T2\"}")
    try:
        channels = {int(k): str(v) for k, v in names.items()}
    except ValueError:
        raise DataError(json_path, f"'channel_names' keys must be integers, got {sorted(names)}") from None
    if sorted(channels) != list(range(len(channels))):
        raise DataError(json_path, f"'channel_names' keys must be 0..{len(channels) - 1}, "
                                   f"got {sorted(channels)}")
    return dict(sorted(channels.items()))


def _labels(json_path: Path, data: dict[str, Any]) -> tuple[dict[int, str], dict[str, list[int]]]:
    """``(value -> name, region -> values)``: see the module for how region-based sets are named."""
    raw = data.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DataError(json_path, "'labels' must be a non-empty object such as {\"background\": 0}")
    entries: dict[str, list[int]] = {}
    for name, value in raw.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise DataError(json_path, f"labels[{name!r}] must be a non-negative integer or a list of them, "
                                       f"got {value!r}")
        entries[str(name)] = values
    if entries.get("background") != [0]:
        raise DataError(json_path, "'labels' needs \"background\": 0")
    order = data.get("regions_class_order")
    if order is None:
        regional = [n for n in entries if isinstance(raw[n], list)]
        if regional:
            raise DataError(json_path, f"labels[{regional[0]!r}] is a region (a list of values): "
                                       "region-based labels need 'regions_class_order'")
        names: dict[int, str] = {}
        for name, (value,) in entries.items():
            if value in names:
                raise DataError(json_path, f"labels {names[value]!r} and {name!r} share the value {value}")
            names[value] = name
        return dict(sorted(names.items())), {}
    regions = {n: sorted(vs) for n, vs in entries.items() if n != "background"}
    valid = isinstance(order, list) and all(isinstance(v, int) for v in order)
    if not valid or len(order) != len(regions):
        raise DataError(json_path, f"'regions_class_order' must list one integer per region "
                                   f"({len(regions)}), got {order!r}")
    # nnU-Net writes region i of 'labels' as the value order[i]: that value is named after it
    names = {0: "background", **{int(v): n for n, v in zip(regions, order, strict=True)}}
    return dict(sorted(names.items())), regions


def _files(folder: Path, ending: str) -> dict[str, Path]:
    """Case id -> file, for the files in ``folder`` that end in ``ending`` (macOS ``._*`` skipped)."""
    if not folder.is_dir():
        return {}
    return {p.name[: -len(ending)]: p for p in sorted(folder.iterdir())
            if p.is_file() and is_nifti(p) and p.name.endswith(ending)}


def _cases(folder: Path, ending: str, n_channels: int, problems: list[DataError]
           ) -> tuple[list[SegCase], set[str]]:
    """The cases of an ``imagesTr``-style folder whose channel files are exactly ``0..n_channels-1``, and
    the ids of the incomplete ones (each reported in ``problems``)."""
    if not folder.is_dir():
        problems.append(DataError(folder, "missing folder"))
        return [], set()
    by_case: dict[str, dict[int, Path]] = {}
    for stem, path in _files(folder, ending).items():
        match = _CHANNEL.match(stem)
        if match is None:
            problems.append(DataError(path, f"not named CASE_XXXX{ending} (XXXX: the 4-digit channel)"))
            continue
        by_case.setdefault(match["case"], {})[int(match["channel"])] = path
    cases, broken = [], set()
    for case_id, files in sorted(by_case.items()):
        missing = [c for c in range(n_channels) if c not in files]
        extra = sorted(c for c in files if c >= n_channels)
        if missing or extra:
            has = ", ".join(f"{c:04d}" for c in sorted(files))
            what = f"channel {missing[0]:04d} is missing" if missing else f"channel {extra[0]:04d} is extra"
            what += f" (has {has}; dataset.json lists {n_channels})"
            shown = files[min(files)]
            problems.append(DataError(shown, f"case {case_id!r}: {what}"))
            broken.add(case_id)
            continue
        cases.append(SegCase(case_id, tuple(files[c] for c in range(n_channels)), None))
    return cases, broken


# --------------------------------------------------------------------------- writing


def write_dataset_json(out: Path, channel_names: dict[int, str], labels: dict[int, str], num_training: int,
                       name: str, file_ending: str = ".nii.gz") -> Path:
    """An nnU-Net v2 dataset.json (labels written as name -> value)."""
    body = {"name": name, "channel_names": {str(k): v for k, v in sorted(channel_names.items())},
            "labels": {v: k for k, v in sorted(labels.items())}, "numTraining": num_training,
            "file_ending": file_ending}
    out.mkdir(parents=True, exist_ok=True)
    path = out / DATASET_JSON
    path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    return path


def copy_label(label: Path, out: Path) -> Path:
    """``label`` as ``out`` (.nii.gz): copied when it already is one, else re-saved compressed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if label.name.endswith(".nii.gz"):
        shutil.copyfile(label, out)
    else:
        data, affine = load_nifti(label)
        nib.save(nib.Nifti1Image(data, affine), out)
    return out
