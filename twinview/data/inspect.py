"""Detect a data folder's layout and check every file in it.

``inspect_path`` opens every file fully (headers and pixel/voxel data) and returns a JSON-serialisable
report. A bad file becomes an entry of ``"problems"`` (``{"file", "reason"}``) and inspection goes on;
only a path whose layout cannot be read at all (missing, empty, unknown layout, unreadable
dataset.json) raises DataError. Counts cover the files that read cleanly. Keys per format:

- all: ``format``, ``path``, ``problems``
- market1501: ``splits`` (per split: ``images``, ``ids``, ``cameras``, ``junk``, ``distractors``;
  ``images`` counts every readable, well-named crop, junk and distractors included; ``ids`` excludes them)
  and ``unmatched_queries`` (queries without a gallery crop of the same id from another camera: the
  standard evaluation skips them; not a problem)
- msd: ``name``, ``modality``, ``label_names``, ``volumes``, ``labelled``, ``labels`` (values found in
  the label volumes), ``shape_min``, ``shape_max``, ``channels``, ``spacing``
- nifti: ``volumes``, ``shape_min``, ``shape_max``, ``channels``, ``spacing``
- dicom: ``series``, ``slices``, ``modalities``, ``series_details`` (folder, modality, shape, spacing)
- images: ``images``, ``size_min``, ``size_max`` (``[height, width]``), ``channels``, ``bit_depths``
- dsb2018: ``images``, ``instances``, ``unlabelled``, ``size_min``, ``size_max``
- nnunet (nnU-Net v2 raw): ``name``, ``channel_names``, ``label_names``, ``regions``, ``cases``
  (complete labelled training cases), ``test``, ``labels``, ``shape_min``, ``shape_max``, ``spacing``
- case_folders: ``cases``, ``labelled``, ``patterns`` (``image``, ``label``), ``patterns_guessed``
  (true when none were given: then ``names`` lists each file name shared across cases, the case id
  replaced by ``*``, with how many cases have it), ``modalities`` (the channel names), ``labels``,
  ``shape_min``, ``shape_max``, ``spacing``. A case lacking a modality is a problem.
- image_pairs: ``images``, ``masks``, ``unlabelled``, ``mask_suffix``, ``mask_values`` (stored values
  found, or the classes when a mapping is given), ``size_min``, ``size_max``, ``channels``,
  ``bit_depths``. A mask without an image, or with a value the mapping lacks, is a problem.
- coco (a COCO JSON file, or a folder holding exactly one at its top): ``file``, ``image_root`` and
  :func:`~twinview.data.coco.coco_summary`'s keys (``images``, ``boxes``, ``boxes_per_image``,
  ``categories``, ``box_size``, ``clipped``, ``dropped``, ``images_without_boxes``). Missing or unreadable
  image files and images whose size differs from the JSON's are problems; clipped and dropped boxes are
  only counted. A JSON that cannot be read as COCO at all raises.

``spacing`` is ``{"min", "max", "median"}``, each a list of three voxel sizes in mm, per axis; shapes
and sizes are elementwise minima and maxima. Volume shapes keep every axis: with any 4D volume (channels
last) they have four entries (a 3D volume counts as one channel there); ``channels`` counts the volumes
per channel number (``{"1": 3, "4": 1}``). They are null (``channels`` empty) when no file read cleanly.
"""

from __future__ import annotations

import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from twinview.data import (
    case_folders,
    coco,
    dicom,
    dsb2018,
    image_pairs,
    images,
    market1501,
    msd,
    nifti,
    nnunet,
)
from twinview.data.case_folders import CasePatterns
from twinview.data.nnunet import SegCase
from twinview.data.records import ImageRecord, VolumeRecord
from twinview.errors import DataError, display_path, missing_path

T = TypeVar("T")
PathLike = str | os.PathLike[str]
Report = dict[str, Any]
FORMATS = ("market1501", "nnunet", "msd", "case_folders", "image_pairs", "nifti", "dicom", "images",
           "dsb2018", "coco")


@dataclass(frozen=True)
class LayoutOptions:
    """What file names alone do not settle: per-case folders' patterns, 2D masks' suffix and values."""

    case_patterns: CasePatterns | None = None
    mask_suffix: str | None = None  # None: found from the names
    mask_values: dict[int, int] | None = None  # stored mask value -> class


def detect_format(path: PathLike) -> str:
    """One of :data:`FORMATS`; DataError for a missing path, an empty folder or an unknown layout."""
    path = Path(path)
    if not path.exists():
        raise missing_path(path)
    if path.is_file():
        return _file_format(path)
    if not any(path.iterdir()):
        raise DataError(path, "empty folder")
    if nnunet.is_nnunet(path):
        return "nnunet"
    if (path / msd.DATASET_JSON).is_file():
        return "msd"
    if any((path / split).is_dir() for split in market1501.SPLITS):
        return "market1501"
    if image_pairs.is_image_pairs(path):
        return "image_pairs"
    if dsb2018.is_dsb2018(path):
        return "dsb2018"
    if coco.coco_files(path):
        return "coco"
    if case_folders.is_case_folders(path):
        return "case_folders"
    if nifti.nifti_files(path):
        return "nifti"
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if any(dicom.is_dicom(p) for p in files if not images.is_image(p)):
        return "dicom"
    if any(images.is_image(p) for p in files):
        return "images"
    raise DataError(
        path, "unknown layout: not MSD, nnU-Net, per-case folders, image/mask pairs, Market-1501, DSB2018 or "
              "COCO, and no NIfTI, DICOM or image files"
    )


def resolve_layout(path: PathLike, kind: str, kinds: Mapping[str, str], purpose: str) -> str:
    """``kind`` as given or, for ``auto``, the entry of ``kinds`` for the layout :func:`detect_format`
    finds; a layout not in ``kinds`` is a DataError saying it cannot serve ``purpose``."""
    if kind != "auto":
        return kind
    fmt = detect_format(path)
    if fmt not in kinds:
        raise DataError(path, f"layout {fmt!r} cannot be used for {purpose}")
    return kinds[fmt]


def _file_format(path: Path) -> str:
    if nifti.is_nifti(path):
        return "nifti"
    if images.is_image(path):
        return "images"
    if dicom.is_dicom(path):
        return "dicom"
    if coco.is_coco_json(path):
        return "coco"
    raise DataError(path, "unknown file type: not NIfTI, DICOM, a PNG/JPEG/TIFF image or a COCO JSON")


def inspect_path(path: PathLike, options: LayoutOptions | None = None) -> Report:
    """Detect the format of ``path``, open every file and report counts and problems (see module doc)."""
    fmt = detect_format(path)
    options = options or LayoutOptions()
    if fmt == "case_folders":
        report = _inspect_case_folders(Path(path), options.case_patterns)
    elif fmt == "image_pairs":
        report = _inspect_image_pairs(Path(path), options)
    else:
        report = _INSPECTORS[fmt](Path(path))
    return {"format": fmt, "path": display_path(path), **report}


def _progress(items: Sequence[T], desc: str) -> Iterable[T]:
    """``items`` with a progress bar on stderr, shown only when stderr is a terminal."""
    return tqdm(items, desc=desc, file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)


def _problem(path: PathLike, reason: str) -> dict[str, str]:
    return {"file": display_path(path), "reason": reason}


def _from_error(err: DataError) -> dict[str, str]:
    return _problem(err.path if err.path is not None else "", err.reason)


def _count_read(paths: Sequence[Path], load: Callable[[Path], object], problems: list[dict[str, str]]) -> int:
    """Call ``load`` on every path, adding a problem for each DataError; how many read cleanly."""
    count = 0
    for path in paths:
        try:
            load(path)
        except DataError as err:
            problems.append(_from_error(err))
        else:
            count += 1
    return count


def _shape_range(shapes: list[tuple[int, ...]], dims: int = 3) -> tuple[list[int] | None, list[int] | None]:
    """Elementwise min and max over the first ``dims`` axes (missing axes count as 1)."""
    if not shapes:
        return None, None
    spatial = np.array([tuple(s[:dims]) + (1,) * (dims - len(s[:dims])) for s in shapes])
    return spatial.min(axis=0).tolist(), spatial.max(axis=0).tolist()


def _volume_shapes(shapes: list[tuple[int, ...]]) -> Report:
    """``shape_min``, ``shape_max`` over every axis (at least three; 3D shapes padded with one channel
    when 4D ones are present) and ``channels``: how many volumes have each channel count."""
    dims = max([3, *(len(s) for s in shapes)])
    shape_min, shape_max = _shape_range(shapes, dims)
    channels = Counter(int(np.prod(s[3:])) if len(s) > 3 else 1 for s in shapes)
    return {"shape_min": shape_min, "shape_max": shape_max,
            "channels": {str(k): n for k, n in sorted(channels.items())}}


def _spacing_stats(spacings: list[tuple[float, float, float]]) -> dict[str, list[float]] | None:
    if not spacings:
        return None
    values = np.array(spacings)
    return {
        "min": values.min(axis=0).tolist(),
        "max": values.max(axis=0).tolist(),
        "median": np.median(values, axis=0).tolist(),
    }


def _inspect_market(root: Path) -> Report:
    problems: list[dict[str, str]] = []
    splits, crops = {}, {}
    for split in market1501.SPLITS:
        folder = root / split
        try:
            files = market1501.split_files(folder)
        except DataError as err:
            problems.append(_from_error(err))
            files = []
        else:
            if not files:
                problems.append(_problem(folder, "no images"))
        crops[split] = _market_crops(files, split, problems)
        splits[split] = _market_summary(crops[split])
    return {
        "splits": splits,
        "unmatched_queries": _unmatched_queries(crops[market1501.QUERY], crops[market1501.GALLERY]),
        "problems": problems,
    }


def _market_crops(files: list[Path], split: str, problems: list[dict[str, str]]) -> list[tuple[int, int]]:
    """``(pid, camid)`` of each well-named crop that the protocol accepts and that decodes."""
    crops = []
    for path in _progress(files, split):
        try:
            pid, camid, _, _ = market1501.parse_market_name(path)
            market1501.person_record(path, split)
            images.load_image(path)
        except DataError as err:
            problems.append(_from_error(err))
            continue
        crops.append((pid, camid))
    return crops


def _market_summary(crops: list[tuple[int, int]]) -> Report:
    pids = [pid for pid, _ in crops]
    return {
        "images": len(crops),
        "ids": len({p for p in pids if p not in (market1501.JUNK, market1501.DISTRACTOR)}),
        "cameras": len({camid for _, camid in crops}),
        "junk": pids.count(market1501.JUNK),
        "distractors": pids.count(market1501.DISTRACTOR),
    }


def _unmatched_queries(query: list[tuple[int, int]], gallery: list[tuple[int, int]]) -> int:
    """Queries with no gallery crop of the same person from another camera (evaluation skips them)."""
    cameras: dict[int, set[int]] = defaultdict(set)
    for pid, camid in gallery:
        cameras[pid].add(camid)
    return sum(not (cameras[pid] - {camid}) for pid, camid in query if pid > market1501.DISTRACTOR)


def _inspect_msd(root: Path) -> Report:
    index = msd.read_dataset_json(root)
    problems: list[dict[str, str]] = []
    records, found = [], set()
    for image, label in _progress(index.training, "training"):
        try:
            record, label_array = _msd_case(image, label)
        except DataError as err:
            problems.append(_from_error(err))
            continue
        values = {int(v) for v in np.unique(label_array)}
        unknown = sorted(values - set(index.labels))
        if unknown:
            problems.append(
                _problem(label, f"label values {unknown} not in dataset.json labels {sorted(index.labels)}")
            )
            continue
        found |= values
        records.append(record)
    labelled = len(records)
    records += _nifti_records(index.test, problems, msd.listed_file)
    return {
        "name": index.name,
        "modality": index.modality,
        "label_names": {str(k): v for k, v in sorted(index.labels.items())},
        "volumes": len(records),
        "labelled": labelled,
        "labels": sorted(found),
        **_volume_shapes([r.shape for r in records]),
        "spacing": _spacing_stats([r.spacing for r in records]),
        "problems": problems,
    }


def _msd_case(image: Path, label: Path) -> tuple[VolumeRecord, np.ndarray]:
    """The record of one training case and its label array, after the shape and affine checks."""
    record = nifti.volume_record(msd.listed_file(image), msd.listed_file(label))
    _, label_array = nifti.check_pair(image, label)
    if not np.array_equal(label_array, np.round(label_array)):
        raise DataError(label, "non-integer label values")
    return record, label_array


def _volume_cases(cases: Sequence[SegCase], problems: list[dict[str, str]], labels: set[int] | None
                  ) -> tuple[list[tuple[tuple[int, ...], tuple[float, float, float]]], set[int], int]:
    """Open every channel (one grid per case) and label of ``cases``: ``(shape, spacing)`` per case that
    reads cleanly, the label values found, and how many of those cases are labelled. A label value not
    in ``labels`` (when given) is a problem."""
    read, found, labelled = [], set(), 0
    for case in _progress(cases, "cases"):
        try:
            image, affine = nifti.load_channels(case.channels)
            if case.label is not None:
                label = nifti.load_label(case.label, image.shape[1:], affine)
                values = {int(v) for v in np.unique(label)}
                if not np.array_equal(label, np.round(label)):
                    raise DataError(case.label, "non-integer label values")
                if labels is not None and values - labels:
                    raise DataError(case.label, f"label values {sorted(values - labels)} not among the "
                                                f"labels {sorted(labels)}")
                found |= values
                labelled += 1
        except DataError as err:
            problems.append(_from_error(err))
            continue
        shape = (*image.shape[1:], image.shape[0]) if image.shape[0] > 1 else image.shape[1:]  # channels last
        read.append((shape, nifti.volume_record(case.channels[0]).spacing))
    return read, found, labelled


def _inspect_nnunet(root: Path) -> Report:
    dataset, errors = nnunet.scan_nnunet(root)
    problems = [_from_error(e) for e in errors]
    read, found, _ = _volume_cases(dataset.training, problems, set(dataset.labels))
    test, _, _ = _volume_cases(dataset.test, problems, None)
    return {
        "name": dataset.name,
        "channel_names": {str(k): v for k, v in dataset.channel_names.items()},
        "label_names": {str(k): v for k, v in dataset.labels.items()},
        "regions": dataset.regions,
        "cases": len(read),
        "test": len(test),
        "labels": sorted(found),
        **_volume_shapes([shape for shape, _ in read + test]),
        "spacing": _spacing_stats([spacing for _, spacing in read + test]),
        "problems": problems,
    }


def _inspect_case_folders(root: Path, patterns: CasePatterns | None) -> Report:
    guessed, names = patterns is None, {}
    if patterns is None:
        patterns, names = case_folders.guess_patterns(root)
        if patterns is None:
            raise DataError(root, "per-case folders, but no file name is shared by half the cases: give "
                                  "the patterns (--image PATTERN ... --label PATTERN)")
    cases, errors = case_folders.scan_case_folders(root, patterns)
    problems = [_from_error(e) for e in errors]
    read, found, labelled = _volume_cases(cases, problems, None)
    return {
        "cases": len(read),
        "labelled": labelled,
        "patterns": {"image": list(patterns.image), "label": patterns.label},
        "patterns_guessed": guessed,
        **({"names": names} if guessed else {}),
        "modalities": patterns.modality_names(),
        "labels": sorted(found),
        **_volume_shapes([shape for shape, _ in read]),
        "spacing": _spacing_stats([spacing for _, spacing in read]),
        "problems": problems,
    }


def _inspect_image_pairs(root: Path, options: LayoutOptions) -> Report:
    pairs, suffix, errors = image_pairs.scan_image_pairs(root, options.mask_suffix)
    problems = [_from_error(e) for e in errors]
    records, values, masks = [], set(), 0
    for pair in _progress(pairs, "pairs"):
        try:
            record = images.image_record(pair.image)
            images.load_image(pair.image)
            if pair.mask is not None:
                mask = image_pairs.load_mask(pair.mask, options.mask_values)
                if mask.shape != (record.height, record.width):
                    raise DataError(pair.mask, f"mask is {mask.shape[0]}x{mask.shape[1]}, its image "
                                               f"{record.height}x{record.width} (height x width)")
                values |= {int(v) for v in np.unique(mask)}
                masks += 1
        except DataError as err:
            problems.append(_from_error(err))
            continue
        records.append(record)
    summary = _image_summary(records)
    return {"images": summary.pop("images"), "masks": masks, "unlabelled": sum(p.mask is None for p in pairs),
            "mask_suffix": suffix, "mask_values": sorted(values), **summary, "problems": problems}


def _nifti_records(
    paths: list[Path], problems: list[dict[str, str]], check: Callable[[Path], Path]
) -> list[VolumeRecord]:
    """Records of the volumes that pass ``check`` and read fully; the others become problems."""
    records = []
    for path in _progress(paths, "volumes"):
        try:
            record = nifti.volume_record(check(path))
            nifti.load_nifti(path)
        except DataError as err:
            problems.append(_from_error(err))
            continue
        records.append(record)
    return records


def _inspect_nifti(path: Path) -> Report:
    files = [path] if path.is_file() else nifti.nifti_files(path)
    problems: list[dict[str, str]] = []
    records = _nifti_records(files, problems, Path)
    return {
        "volumes": len(records),
        **_volume_shapes([r.shape for r in records]),
        "spacing": _spacing_stats([r.spacing for r in records]),
        "problems": problems,
    }


def _inspect_dicom(root: Path) -> Report:
    problems: list[dict[str, str]] = []
    by_uid: dict[str, list[dicom.SliceHeader]] = defaultdict(list)
    for path in _progress(dicom.dicom_files(root), "headers"):
        try:
            header = dicom.read_slice_header(path)
        except DataError as err:
            problems.append(_from_error(err))
            continue
        by_uid[header.series_uid].append(header)
    series = []
    for slices in _progress(list(by_uid.values()), "series"):
        try:
            record = dicom.series_record(slices)
        except DataError as err:
            problems.append(_from_error(err))
            continue
        slices_read = _count_read(record.files, partial(dicom.load_slice, shape=record.shape[:2]), problems)
        if slices_read == len(record.files):
            series.append(record)
    return {
        "series": len(series),
        "slices": sum(len(s.files) for s in series),
        "modalities": sorted({s.modality for s in series}),
        "series_details": [
            {
                "folder": display_path(s.folder),
                "modality": s.modality,
                "shape": list(s.shape),
                "spacing": list(s.spacing),
            }
            for s in series
        ],
        "problems": problems,
    }


def _inspect_images(root: Path) -> Report:
    problems: list[dict[str, str]] = []
    records = []
    for path in _progress(images.list_image_files(root), "images"):
        try:
            record = images.image_record(path)
            images.load_image(path)
        except DataError as err:
            problems.append(_from_error(err))
            continue
        records.append(record)
    return {**_image_summary(records), "problems": problems}


def _image_summary(records: Sequence[ImageRecord]) -> Report:
    """``images``, ``size_min``, ``size_max``, ``channels`` and ``bit_depths`` of the images read."""
    size_min, size_max = _shape_range([(r.height, r.width) for r in records], dims=2)
    return {
        "images": len(records),
        "size_min": size_min,
        "size_max": size_max,
        "channels": {str(k): n for k, n in sorted(Counter(r.channels for r in records).items())},
        "bit_depths": {str(k): n for k, n in sorted(Counter(r.bit_depth for r in records).items())},
    }


def _inspect_dsb2018(root: Path) -> Report:
    problems: list[dict[str, str]] = []
    sizes, instances, unlabelled = [], 0, 0
    for sample in _progress(dsb2018.sample_dirs(root), "samples"):
        try:
            record = dsb2018.nuclei_record(sample)
            shape = dsb2018.load_rgb(record.image).shape[:2]
        except DataError as err:
            problems.append(_from_error(err))
            continue
        sizes.append(shape)
        instances += _count_read(record.masks, partial(dsb2018.load_mask, shape=shape), problems)
        unlabelled += not record.masks
    size_min, size_max = _shape_range(sizes, dims=2)
    return {
        "images": len(sizes),
        "instances": instances,
        "unlabelled": unlabelled,
        "size_min": size_min,
        "size_max": size_max,
        "problems": problems,
    }


def _inspect_coco(path: Path) -> Report:
    if path.is_dir():
        files = coco.coco_files(path)
        if len(files) > 1:
            names = ", ".join(p.name for p in files)
            raise DataError(path, f"{len(files)} COCO files ({names}); inspect one of them")
        path = files[0]
    scanned, root, missing = coco.scan_coco(path)
    problems = [_problem(p, "image file missing") for p in missing]
    readable = []
    for image in _progress(scanned.images, "images"):
        try:
            height, width = images.load_image(image.path).shape[:2]
        except DataError as err:
            problems.append(_from_error(err))
            continue
        if (height, width) != (image.height, image.width):
            problems.append(_problem(image.path, f"image is {height}x{width} (height x width), the JSON says "
                                                 f"{image.height}x{image.width}"))
            continue
        readable.append(image)
    det_set = coco.DetSet(readable, scanned.categories, path, scanned.clipped, scanned.dropped)
    return {"file": display_path(path), "image_root": display_path(root), **coco.coco_summary(det_set),
            "problems": problems}


_INSPECTORS: dict[str, Callable[[Path], Report]] = {
    "market1501": _inspect_market,
    "msd": _inspect_msd,
    "nnunet": _inspect_nnunet,
    "nifti": _inspect_nifti,
    "dicom": _inspect_dicom,
    "images": _inspect_images,
    "dsb2018": _inspect_dsb2018,
    "coco": _inspect_coco,
}
