"""2018 Data Science Bowl (DSB2018) nuclei folders.

Layout (Kaggle): one folder per sample, ``<id>/images/<id>.png`` plus ``<id>/masks/*.png`` with one
binary mask per nucleus (the masks folder may be absent for unlabelled samples). The root is either
the folder holding the ``<id>/`` folders, or a parent holding ``stage1_train/``, ``stage1_test/``, ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twinview.data.images import load_image
from twinview.data.records import NucleiRecord
from twinview.errors import DataError

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class NucleiSample:
    """One decoded sample.

    ``instances`` numbers nuclei 1..N in mask-file order (0 is background); where masks overlap, the
    later mask wins. ``boxes`` are ``xyxy`` pixel edges of each mask file's own pixels (x_max, y_max
    exclusive), so a nucleus fully covered by a later one keeps its box.
    """

    image: np.ndarray  # HxWx3 uint8
    instances: np.ndarray  # HxW int32
    semantic: np.ndarray  # HxW uint8, 1 inside any nucleus
    boxes: np.ndarray  # Nx4 float32


def sample_dirs(root: PathLike) -> list[Path]:
    """The sample folders (those with an ``images/`` folder) in ``root`` or in its ``stage*`` folders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "not a folder")
    samples = _samples_in(root)
    if samples:
        return samples
    stages = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("stage"))
    return [sample for stage in stages for sample in _samples_in(stage)]


def is_dsb2018(root: PathLike) -> bool:
    """Whether ``root`` holds at least one complete sample (``<id>/images/<id>.png``)."""
    return any((sample / "images" / f"{sample.name}.png").is_file() for sample in sample_dirs(root))


def _samples_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if (p / "images").is_dir())


def nuclei_record(sample_dir: PathLike) -> NucleiRecord:
    """The record of one sample folder; a missing ``images/<id>.png`` is a DataError naming it."""
    sample_dir = Path(sample_dir)
    image = sample_dir / "images" / f"{sample_dir.name}.png"
    if not image.is_file():
        raise DataError(image, "missing sample image")
    masks_dir = sample_dir / "masks"
    masks = sorted(masks_dir.glob("*.png")) if masks_dir.is_dir() else []
    return NucleiRecord(sample_dir.name, image, tuple(p for p in masks if not p.name.startswith("._")))


def read_dsb2018(root: PathLike) -> list[NucleiRecord]:
    """One record per sample folder below ``root`` (see the module docstring for the layouts)."""
    samples = sample_dirs(root)
    if not samples:
        raise DataError(root, "no DSB2018 samples (<id>/images/<id>.png)")
    return [nuclei_record(sample) for sample in samples]


def load_nuclei(record: NucleiRecord) -> NucleiSample:
    """Decode the image and all masks; a mask whose size differs from the image is a DataError naming it."""
    image = load_rgb(record.image)
    height, width = image.shape[:2]
    instances = np.zeros((height, width), dtype=np.int32)
    boxes = np.zeros((len(record.masks), 4), dtype=np.float32)
    for index, path in enumerate(record.masks, start=1):
        mask = load_mask(path, (height, width))
        instances[mask] = index
        boxes[index - 1] = _box(mask)
    return NucleiSample(image, instances, (instances > 0).astype(np.uint8), boxes)


def load_rgb(path: PathLike) -> np.ndarray:
    """A sample image as ``HxWx3`` uint8 (alpha dropped, grey repeated); other bit depths are a DataError."""
    image = load_image(path)
    if image.dtype != np.uint8:
        raise DataError(path, f"expected an 8-bit image, got {image.dtype}")
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def load_mask(path: PathLike, shape: tuple[int, int]) -> np.ndarray:
    """One nucleus mask as HxW bool (nonzero is inside); DataError when empty or not of ``shape``."""
    mask = load_image(path)[..., 0] > 0
    if mask.shape != shape:
        raise DataError(
            path, f"mask size {mask.shape[0]}x{mask.shape[1]} differs from image {shape[0]}x{shape[1]}"
        )
    if not mask.any():
        raise DataError(path, "empty mask")
    return mask


def _box(mask: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    return np.array([columns[0], rows[0], columns[-1] + 1, rows[-1] + 1], dtype=np.float32)
