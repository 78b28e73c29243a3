"""NIfTI volumes (``.nii`` / ``.nii.gz``), read with nibabel.

Folder layout: one volume per case in an images folder; an optional labels folder holds each case's
label volume under the same case id (``case.nii.gz`` pairs with ``case.nii.gz`` or ``case.nii``).
macOS ``._*`` resource-fork files are ignored.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from twinview.data.records import VolumeRecord
from twinview.errors import DataError, display_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")
AFFINE_TOLERANCE = 1e-3
_READ_ERRORS = (ImageFileError, OSError, EOFError, ValueError, zlib.error)

PathLike = str | os.PathLike[str]


def is_nifti(path: PathLike) -> bool:
    """Whether the file name ends in ``.nii`` or ``.nii.gz`` (macOS ``._*`` files excluded)."""
    name = Path(path).name
    return name.lower().endswith(NIFTI_SUFFIXES) and not name.startswith("._")


def case_id(path: PathLike) -> str:
    """The file name without ``.nii`` / ``.nii.gz``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def nifti_files(folder: PathLike) -> list[Path]:
    """The NIfTI files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))


def _open(path: PathLike) -> nib.spatialimages.SpatialImage:
    try:
        return nib.load(path, mmap=False)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except _READ_ERRORS as exc:
        raise DataError(path, f"not a readable NIfTI file: {display_path(str(exc))}") from exc


def nifti_header(path: PathLike) -> tuple[tuple[int, ...], tuple[float, float, float]]:
    """``(shape, spacing)`` from the header only; spacing is the voxel size (mm) of the first 3 axes.

    The header stores float32 sizes; they are rounded to 6 decimals (1.27, not 1.2699999809265137).
    """
    image = _open(path)
    zooms = tuple(round(float(z), 6) for z in image.header.get_zooms()[:3])
    spacing = zooms + (1.0,) * (3 - len(zooms))
    return tuple(int(n) for n in image.shape), spacing


def load_nifti(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)``: all voxels read (scaling applied, stored dtype kept) and the 4x4 affine."""
    image = _open(path)
    try:
        data = np.asarray(image.dataobj)
    except _READ_ERRORS as exc:
        raise DataError(path, f"truncated or corrupt NIfTI: {display_path(str(exc))}") from exc
    return data, np.array(image.affine, dtype=np.float64)


def check_pair(image_path: PathLike, label_path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load an image and its label; DataError naming the label when shape or affine differ.

    The label must match the image's first three axes (a 4D image has channels last). Returns both arrays.
    """
    image, label, _ = load_pair(image_path, label_path)
    return image, label


def load_pair(image_path: PathLike, label_path: PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, label, affine)`` as :func:`check_pair` checks them; the affine is the image's."""
    image, image_affine = load_nifti(image_path)
    return image, load_label(label_path, image.shape[:3], image_affine), image_affine


def load_label(label_path: PathLike, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """A label volume that must have the image's spatial ``shape`` and ``affine``; DataError naming it
    when it does not."""
    label, label_affine = load_nifti(label_path)
    if label.shape != tuple(shape):
        raise DataError(label_path, f"label shape {label.shape} differs from image shape {tuple(shape)}")
    difference = float(np.max(np.abs(label_affine - affine)))
    if difference > AFFINE_TOLERANCE:
        raise DataError(
            label_path,
            f"label affine differs from image affine by up to {difference:.4g} "
            f"(tolerance {AFFINE_TOLERANCE:g})",
        )
    return label


def load_channels(paths: tuple[Path, ...] | list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """``(array (C, X, Y, Z), affine)`` of a case stored as one file per channel (a single 3D or 4D file,
    channels last, works too). Every file must have the first one's shape and affine: DataError naming
    the file that differs."""
    arrays, first_affine, first_shape = [], None, None
    first = Path(paths[0]).name if paths else ""
    for path in paths:
        data, affine = load_nifti(path)
        if data.ndim not in (3, 4):
            raise DataError(path, f"{data.ndim}D array {data.shape}: expected a 3D volume")
        if first_shape is None:
            first_shape, first_affine = data.shape[:3], affine
        elif data.shape[:3] != first_shape:
            raise DataError(path, f"shape {data.shape[:3]} differs from {first}'s {first_shape} "
                                  "(channels of a case must share one grid)")
        else:
            difference = float(np.max(np.abs(affine - first_affine)))
            if difference > AFFINE_TOLERANCE:
                raise DataError(path, f"affine differs from {first}'s by up to {difference:.4g} (tolerance "
                                      f"{AFFINE_TOLERANCE:g}; channels of a case must share one grid)")
        arrays += [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[3])]
    if first_affine is None:
        raise ValueError("load_channels needs at least one file")
    return np.stack(arrays), first_affine


def volume_record(image: PathLike, label: PathLike | None = None) -> VolumeRecord:
    """A record for one case, with shape and spacing from the image header."""
    shape, spacing = nifti_header(image)
    return VolumeRecord(
        case_id=case_id(image),
        image=Path(image),
        label=Path(label) if label is not None else None,
        shape=shape,
        spacing=spacing,
    )


def read_nifti_folder(images_dir: PathLike, labels_dir: PathLike | None = None) -> list[VolumeRecord]:
    """One record per NIfTI file in ``images_dir``, paired by case id with ``labels_dir`` when given.

    A case without a label file is a DataError naming the image.
    """
    images = nifti_files(images_dir)
    if not images:
        raise DataError(images_dir, "no NIfTI files (.nii, .nii.gz)")
    if labels_dir is None:
        return [volume_record(image) for image in images]
    labels = {case_id(p): p for p in nifti_files(labels_dir)}
    return [volume_record(image, _label_for(image, labels, labels_dir)) for image in images]


def _label_for(image: Path, labels: dict[str, Path], labels_dir: PathLike) -> Path:
    case = case_id(image)
    if case not in labels:
        raise DataError(image, f"no label file for this case in {display_path(labels_dir)}")
    return labels[case]
