"""DICOM series, read with pydicom.

Layout: DICOM files (with the 128-byte preamble and ``DICM`` marker; any name, with or without
``.dcm``) anywhere below a root folder; slices are grouped by SeriesInstanceUID, whatever folders they
sit in. Files without the ``DICM`` marker and ``DICOMDIR`` index files are skipped; a file with the
marker that cannot be parsed is a DataError.

Privacy: every read passes ``specific_tags`` to ``pydicom.dcmread``: headers are read with the geometry
and series tags only, pixels with the pixel-description tags and the pixel data only. pydicom skips the
value bytes of any other element without decoding it, so patient tags (PatientName, PatientID,
PatientBirthDate, ...) are never loaded, stored, logged or put into errors; the datasets that twinview
holds have no such element.
"""

from __future__ import annotations

import os
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from twinview.data.records import DicomSeriesRecord
from twinview.errors import DataError, display_path

PathLike = str | os.PathLike[str]

_HEADER_TAGS = [
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "InstanceNumber",
    "SliceThickness",
]
# What ``Dataset.pixel_array`` and the rescale need: the pixel description, the pixel data (native or
# encapsulated, with its offset tables) and the modality rescale; the file meta (transfer syntax) is
# always read.
_PIXEL_TAGS = [
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
]
_READ_ERRORS = (
    InvalidDicomError,
    OSError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    zlib.error,
)
_DECODE_ERRORS = (*_READ_ERRORS, RuntimeError, NotImplementedError)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SliceHeader:
    """The geometry of one slice file (no patient tags)."""

    path: Path
    series_uid: str
    modality: str
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) in mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row and column direction cosines
    position: tuple[float, float, float] | None  # ImagePositionPatient in mm (LPS)
    instance: int | None
    thickness: float | None


def is_dicom(path: PathLike) -> bool:
    """Whether the file has the ``DICM`` marker after the 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as exc:
        raise DataError(path, f"cannot read file: {exc.strerror}") from exc
    return head[128:132] == b"DICM"


def dicom_files(root: PathLike) -> list[Path]:
    """The DICOM files below ``root`` (or ``root`` itself when it is a DICOM file), sorted by path."""
    root = Path(root)
    if root.is_file():
        candidates = [root]
    elif root.is_dir():
        candidates = sorted(p for p in root.rglob("*") if p.is_file())
    else:
        raise DataError(root, "no such file or folder")
    files = [p for p in candidates if p.name.upper() != "DICOMDIR" and is_dicom(p)]
    if not files:
        raise DataError(root, "no DICOM files (with a DICM marker)")
    return files


def read_dicom_series(root: PathLike) -> list[DicomSeriesRecord]:
    """One record per series below ``root``, slices sorted along the slice normal."""
    return group_series([read_slice_header(path) for path in dicom_files(root)])


def read_dataset(path: PathLike, tags: list[str], pixels: bool = True) -> Dataset:
    """The elements ``tags`` of one file (and its file meta), nothing else: the one way twinview reads a
    DICOM file. Without ``pixels`` reading stops before the pixel data."""
    return pydicom.dcmread(path, stop_before_pixels=not pixels, specific_tags=tags)


def read_slice_header(path: PathLike) -> SliceHeader:
    """The series and geometry tags of one file, pixel data not read."""
    path = Path(path)
    try:
        ds = read_dataset(path, _HEADER_TAGS, pixels=False)
        return _slice_header(path, ds)
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(path, f"corrupt DICOM: {display_path(str(exc))}") from exc


def _slice_header(path: Path, ds: Dataset) -> SliceHeader:
    for keyword in ("SeriesInstanceUID", "Rows", "Columns"):
        if keyword not in ds:
            raise DataError(path, f"missing {keyword} (not an image slice, or a truncated file)")
    spacing = ds.get("PixelSpacing") or (1.0, 1.0)
    orientation = ds.get("ImageOrientationPatient")
    position = ds.get("ImagePositionPatient")
    instance = ds.get("InstanceNumber")
    thickness = ds.get("SliceThickness")
    return SliceHeader(
        path=path,
        series_uid=str(ds.SeriesInstanceUID),
        modality=str(ds.get("Modality", "")),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        orientation=tuple(float(v) for v in orientation) if orientation else None,
        position=tuple(float(v) for v in position) if position else None,
        instance=int(instance) if instance not in (None, "") else None,
        thickness=float(thickness) if thickness not in (None, "") else None,
    )


def group_series(headers: list[SliceHeader]) -> list[DicomSeriesRecord]:
    """Group slice headers by SeriesInstanceUID (in order of first appearance) into series records."""
    by_uid: dict[str, list[SliceHeader]] = defaultdict(list)
    for header in headers:
        by_uid[header.series_uid].append(header)
    return [series_record(slices) for slices in by_uid.values()]


def series_record(slices: list[SliceHeader]) -> DicomSeriesRecord:
    """A series record from the slices of one series; DataError on inconsistent slices."""
    first = slices[0]
    for s in slices:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise DataError(
                s.path, f"slice size {s.rows}x{s.columns} differs from {first.rows}x{first.columns}"
            )
        if _differ(s.orientation, first.orientation):
            raise DataError(s.path, "slice orientation differs from the first slice of its series")
    ordered, slice_spacing = _sort_slices(slices)
    return DicomSeriesRecord(
        series_uid=first.series_uid,
        folder=Path(os.path.commonpath([s.path.parent for s in slices])),
        files=tuple(s.path for s in ordered),
        modality=first.modality,
        shape=(first.rows, first.columns, len(slices)),
        spacing=(*first.pixel_spacing, slice_spacing),
    )


def _differ(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> bool:
    if a is None or b is None:
        return a is not b
    return not np.allclose(a, b, atol=1e-4)


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    return np.cross(orientation[:3], orientation[3:6])


def _sort_slices(slices: list[SliceHeader]) -> tuple[list[SliceHeader], float]:
    """Slices sorted by position along the normal (else InstanceNumber), and the slice spacing in mm."""
    fallback = slices[0].thickness or 1.0
    if all(s.orientation and s.position for s in slices):
        normal = _normal(slices[0].orientation)
        ordered = sorted(slices, key=lambda s: float(np.dot(s.position, normal)))
        distances = [float(np.dot(s.position, normal)) for s in ordered]
        return ordered, (_spacing(ordered, distances) if len(ordered) > 1 else fallback)
    if all(s.instance is not None for s in slices):
        return sorted(slices, key=lambda s: s.instance), fallback
    raise DataError(
        slices[0].path, "cannot order slices: no ImagePositionPatient/Orientation or InstanceNumber"
    )


def _spacing(ordered: list[SliceHeader], distances: list[float]) -> float:
    steps = np.diff(distances)
    for step, s, distance in zip(steps, ordered[1:], distances[1:], strict=True):
        if step < 1e-4:
            raise DataError(s.path, f"two slices at the same position ({distance:.3f} mm along the normal)")
    return float(np.median(steps))


def load_dicom_series(record: DicomSeriesRecord) -> tuple[np.ndarray, np.ndarray]:
    """``(volume, affine)``: float32 (rows, columns, slices) with RescaleSlope/Intercept applied.

    The affine maps (row, column, slice) indices to RAS+ millimetres (like NIfTI); without orientation
    tags it is a diagonal of the spacing.
    """
    volume = np.stack([load_slice(path, record.shape[:2]) for path in record.files], axis=-1)
    return volume, _affine(record)


def load_slice(path: PathLike, shape: tuple[int, int]) -> np.ndarray:
    """One slice's pixels as float32 with RescaleSlope/Intercept applied; DataError unless ``shape``."""
    try:
        ds = read_dataset(path, _PIXEL_TAGS)
        pixels = ds.pixel_array
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except _DECODE_ERRORS as exc:
        raise DataError(path, f"cannot decode pixel data: {display_path(str(exc))}") from exc
    if pixels.shape != shape:
        raise DataError(path, f"pixel data shape {pixels.shape} differs from series shape {shape}")
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _affine(record: DicomSeriesRecord) -> np.ndarray:
    first = read_slice_header(record.files[0])
    last = read_slice_header(record.files[-1])
    row_spacing, column_spacing, slice_spacing = record.spacing
    if first.orientation is None or first.position is None or last.position is None:
        return np.diag([row_spacing, column_spacing, slice_spacing, 1.0])
    row_direction = np.array(first.orientation[:3])  # along a row: increasing column index
    column_direction = np.array(first.orientation[3:6])  # along a column: increasing row index
    n = len(record.files)
    if n > 1:
        step = (np.array(last.position) - np.array(first.position)) / (n - 1)
    else:
        step = _normal(first.orientation) * slice_spacing
    lps = np.eye(4)
    lps[:3, 0] = column_direction * row_spacing
    lps[:3, 1] = row_direction * column_spacing
    lps[:3, 2] = step
    lps[:3, 3] = first.position
    return _LPS_TO_RAS @ lps
