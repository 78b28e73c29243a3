"""Typed records that the readers return: one per file (or series, or sample), paths plus metadata.

Records hold no pixel data; loaders in each reader module open the files. They are frozen
dataclasses, so they can be hashed, compared and written to JSON with ``dataclasses.asdict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class VolumeRecord:
    """A 3D (or 4D, channels last) volume in NIfTI, with its optional label volume.

    ``spacing`` is the voxel size in millimetres along the first three array axes and ``shape``
    the array shape, both read from the image header.
    """

    case_id: str
    image: Path
    label: Path | None
    shape: tuple[int, ...]
    spacing: tuple[float, float, float]


@dataclass(frozen=True)
class DicomSeriesRecord:
    """One DICOM series: its slice files sorted along the slice normal (no patient tags are kept)."""

    series_uid: str
    folder: Path
    files: tuple[Path, ...]
    modality: str
    shape: tuple[int, int, int]  # (rows, columns, slices)
    spacing: tuple[float, float, float]  # (row spacing, column spacing, slice spacing) in mm


@dataclass(frozen=True)
class ImageRecord:
    """A 2D image file (PNG/JPEG/TIFF) for unlabelled pretraining."""

    path: Path
    height: int
    width: int
    channels: int  # 1 (grey) or 3 (RGB); alpha is dropped by the loader
    bit_depth: int  # 8 or 16


@dataclass(frozen=True)
class PersonRecord:
    """A pedestrian crop, from a Market-1501 name ``PPPP_cCsS_FFFFFF_BB.jpg`` or a user's folder or CSV.

    Market-1501: ``pid`` is the person id (0 for distractors); ``camid`` is the camera (1-based, as in
    the name); ``sequence`` and ``frame`` come from ``sS_FFFFFF``. Other sources
    (:mod:`twinview.data.person_folder`) have no sequence or frame (None), and ``pid`` / ``camid`` are
    None where the source does not give them.
    """

    path: Path
    pid: int | None
    camid: int | None
    sequence: int | None
    frame: int | None
    split: str  # "bounding_box_train", "query" or "bounding_box_test"


@dataclass(frozen=True)
class NucleiRecord:
    """A DSB2018 sample: ``<id>/images/<id>.png`` with one binary PNG per nucleus in ``<id>/masks/``."""

    sample_id: str
    image: Path
    masks: tuple[Path, ...] = field(default_factory=tuple)
