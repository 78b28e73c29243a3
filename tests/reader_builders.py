"""Small hand-built data sets in the standard layouts, for the reader and inspect tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

SECRET_NAME = "SECRET^NAME"
SECRET_ID = "SECRET-ID-4711"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def write_nifti(path: Path, array: np.ndarray, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> Path:
    """Save ``array`` with a diagonal affine of ``spacing``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)
    return path


def volume(shape: tuple[int, ...] = (6, 5, 4), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def label_volume(shape: tuple[int, ...] = (6, 5, 4), values: tuple[int, ...] = (0, 1, 2)) -> np.ndarray:
    return (np.arange(np.prod(shape)) % len(values)).reshape(shape).choose(values).astype(np.uint8)


def write_msd(root: Path, cases: int = 2, spacing: tuple[float, float, float] = (1.0, 1.5, 2.0)) -> Path:
    """An MSD task with ``cases`` labelled volumes, one test volume (a plain string entry) and ``._`` junk."""
    training = []
    for i in range(cases):
        name = f"case_{i:03d}.nii.gz"
        write_nifti(root / "imagesTr" / name, volume(seed=i), spacing)
        write_nifti(root / "labelsTr" / name, label_volume(), spacing)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    write_nifti(root / "imagesTs" / "case_100.nii.gz", volume(seed=100), spacing)
    (root / "imagesTr" / "._case_000.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    dataset = {
        "name": "Toy",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "numTraining": cases,
        "training": training,
        "test": ["./imagesTs/case_100.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


def write_image(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    """Save an array with Pillow (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def rgb(height: int = 8, width: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


MARKET_NAMES = {
    "bounding_box_train": [
        "0002_c1s1_000451_03.jpg",
        "0002_c2s1_000301_01.jpg",
        "0007_c3s3_077419_03.jpg",
        "0000_c1s1_000001_01.jpg",
        "-1_c4s2_001234_02.jpg",
    ],
    "query": ["0003_c1s1_000551_01.jpg", "0005_c2s1_000976_01.jpg"],
    "bounding_box_test": [
        "0003_c2s1_000601_02.jpg",
        "0003_c1s1_000561_01.jpg",
        "0005_c6s2_003002_01.jpg",
        "0000_c5s1_000002_04.jpg",
        "-1_c1s1_000003_05.jpg",
    ],
}


def write_market(root: Path, names: dict[str, list[str]] | None = None) -> Path:
    """A Market-1501 folder with tiny JPEG crops (plus a ``Thumbs.db`` that readers must ignore)."""
    for split, split_names in (names or MARKET_NAMES).items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(split_names):
            write_image(root / split / name, rgb(seed=i))
        (root / split / "Thumbs.db").write_bytes(b"not an image")
    return root


def write_dsb_sample(root: Path, sample_id: str, image: np.ndarray, masks: list[np.ndarray]) -> Path:
    """``<id>/images/<id>.png`` and one ``masks/<k>.png`` (0/255) per boolean mask."""
    folder = root / sample_id
    write_image(folder / "images" / f"{sample_id}.png", image)
    for k, mask in enumerate(masks):
        write_image(folder / "masks" / f"mask_{k:02d}.png", mask.astype(np.uint8) * 255)
    return folder


def square(shape: tuple[int, int], top: int, left: int, height: int, width: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + height, left : left + width] = True
    return mask


def write_dicom_slice(
    path: Path,
    series_uid: str,
    pixels: np.ndarray,
    position: tuple[float, float, float] | None,
    orientation: tuple[float, ...] | None = AXIAL,
    instance: int = 1,
) -> Path:
    """One MR slice (Explicit VR Little Endian, uint16, slope 2, intercept -100) with patient tags set."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName = SECRET_NAME
    ds.PatientID = SECRET_ID
    ds.PatientBirthDate = "19010203"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MR"
    ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = list(position)
    if orientation is not None:
        ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [0.5, 0.7]
    ds.SliceThickness = 2.5
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -100
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_series(
    root: Path,
    slices: int = 4,
    orientation: tuple[float, ...] = AXIAL,
    step: float = 2.5,
    order_by: str = "position",
) -> str:
    """A series whose slice k has constant raw value 10 * k, written in shuffled file order.

    Slice k sits at ``k * step`` mm along the normal (``order_by="position"``) or carries only
    InstanceNumber k + 1 (``order_by="instance"``). File names and write order do not follow k.
    """
    uid = generate_uid()
    normal = np.cross(orientation[:3], orientation[3:])
    for n, k in enumerate(np.random.default_rng(1).permutation(slices)):
        pixels = np.full((3, 2), 10 * k, dtype=np.uint16)
        by_position = order_by == "position"
        position = tuple(float(v) for v in (np.array([5.0, -3.0, 7.0]) + k * step * normal))
        write_dicom_slice(
            root / f"sub{n % 2}" / f"IM{n:04d}",
            uid,
            pixels,
            position if by_position else None,
            orientation if by_position else None,
            instance=int(k) + 1,
        )
    return uid


def snapshot(root: Path) -> dict[bytes, tuple[int, int]]:
    """Every path below ``root`` (as bytes) with its size and modification time."""
    result = {}
    for folder, dirs, files in os.walk(os.fsencode(root)):
        for name in dirs + files:
            stat = os.stat(os.path.join(folder, name))
            result[os.path.join(folder, name)] = (stat.st_size, stat.st_mtime_ns)
    return result
