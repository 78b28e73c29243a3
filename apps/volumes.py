"""Uploads for the segmentation app: read from memory, checked against the model card, segmented, shown.

A detection model takes a PNG or TIFF as stored (:func:`read_detection_upload`); its boxes are drawn in
numpy (:func:`draw_detections`).

:func:`read_upload` turns an uploaded file (name and bytes) into a :class:`Volume` the way training read
its cases (``downstream.seg.data``): a 3D NIfTI is one channel, a 4D one holds its channels on the last
axis, DICOM pixels get RescaleSlope/Intercept, and volumes are reoriented to the card's axis codes (the
input's affine is kept, so the mask is written back on the input's own grid). Nothing touches the disk.

Zipped DICOM series are opened defensively: member count and declared uncompressed size are checked from
the zip directory before any member is read, and the sizes again while reading; absolute, ``..`` and
symbolic-link members are refused. DICOM is parsed with :func:`twinview.data.dicom.read_dataset` and a
whitelist of geometry and pixel tags, so patient tags (PatientName, PatientID, PatientBirthDate, ...) are
never loaded. Every mistake in an upload is a one-line :class:`DataError` naming the file.
"""

from __future__ import annotations

import gzip
import io
import re
import stat
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError

from apps import uploads
from apps.runtime import OnnxModel, detect, normalise_intensity, segment
from apps.uploads import MB
from twinview.data.dicom import SliceHeader, group_series, read_dataset
from twinview.data.nifti import AFFINE_TOLERANCE
from twinview.errors import DataError

DEFAULT_MAX_UPLOAD_MB = 512
UNCOMPRESSED_FACTOR = 4  # a .nii.gz or a zip may unpack to this many times the upload cap, no more
MAX_ZIP_MEMBERS = 10_000
UPLOAD_TYPES = ("nii", "nii.gz", "zip", "png", "tif", "tiff")
LABEL_TYPES = ("nii", "nii.gz", "png", "tif", "tiff")

# level, width in HU (the usual radiology presets)
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft tissue (40/400)": (40.0, 400.0),
    "brain (40/80)": (40.0, 80.0),
    "lung (-600/1500)": (-600.0, 1500.0),
    "bone (400/1800)": (400.0, 1800.0),
}
PERCENTILE_WINDOWS: dict[str, tuple[float, float]] = {
    "percentiles 1-99": (1.0, 99.0),
    "percentiles 0.5-99.5": (0.5, 99.5),
    "percentiles 5-95": (5.0, 95.0),
}
# one colour per foreground label (label 1 takes the first); the same red, blue, yellow, green as the
# overlays of `twinview seg predict`, then more
PALETTE = np.array([[230, 60, 60], [60, 140, 255], [250, 200, 40], [80, 220, 120], [200, 90, 220],
                    [40, 210, 210], [255, 140, 30], [160, 110, 60], [250, 120, 180], [140, 140, 140]],
                   dtype=np.uint8)
VIEWS = {"axial": 2, "coronal": 1, "sagittal": 0}  # the RAS axis each view slices along

# what a zipped series is parsed for: geometry, series and modality, and the pixels with their rescale
_DICOM_TAGS = ["SeriesInstanceUID", "Modality", "Rows", "Columns", "PixelSpacing", "ImageOrientationPatient",
               "ImagePositionPatient", "InstanceNumber", "SliceThickness", "SamplesPerPixel",
               "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames", "BitsAllocated",
               "BitsStored", "HighBit", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
               "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "PixelData", "FloatPixelData",
               "DoubleFloatPixelData"]
_DICOM_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError,
                 zlib.error, RuntimeError, NotImplementedError)
_NIFTI_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error, RuntimeError,
               NotImplementedError)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_MR = {"MR", "MRI", "T1", "T1W", "T1GD", "T2", "T2W", "FLAIR", "ADC", "DWI", "PD"}


@dataclass
class Volume:
    """An upload as the model sees it, and what writing its mask back on the input's grid needs."""

    name: str
    image: np.ndarray  # (C, *spatial) float32 in the model's axis order
    spacing: tuple[float, ...]  # mm per voxel along the spatial axes of ``image`` (1.0 for 2D images)
    modality: str  # "CT", "MR", ... as the file says it; "" when it does not (NIfTI, PNG, TIFF)
    affine: np.ndarray  # the input's own 4x4 affine (identity for 2D images)
    ornt: np.ndarray | None  # nibabel orientation from the input's axes to ``image``'s; None: unchanged
    header: nib.Nifti1Header | None  # a NIfTI input's header, reused for the mask
    note: str = ""  # for the user, e.g. which series of a zip is shown

    @property
    def is_2d(self) -> bool:
        return self.image.ndim == 3

    @property
    def ras(self) -> bool:
        """Whether the axes are R, A, S (so the views are axial, coronal and sagittal)."""
        return not self.is_2d and "".join(orientations.aff2axcodes(self.model_affine)) == "RAS"

    @property
    def model_affine(self) -> np.ndarray:
        """The affine of ``image``'s grid."""
        if self.ornt is None:
            return self.affine
        return self.affine @ orientations.inv_ornt_aff(self.ornt, self.input_shape)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The spatial shape in the input's own axis order."""
        shape = self.image.shape[1:]
        if self.ornt is None:
            return shape
        out = [0] * len(shape)
        for axis, (target, _) in enumerate(self.ornt):
            out[axis] = shape[int(target)]
        return tuple(out)


# --------------------------------------------------------------------------- caps


def max_upload_bytes() -> int:
    """This app's upload cap in bytes (default 512 MB)."""
    return uploads.max_upload_bytes(DEFAULT_MAX_UPLOAD_MB)


def _max_unpacked() -> int:
    return UNCOMPRESSED_FACTOR * max_upload_bytes()


# --------------------------------------------------------------------------- reading uploads


def read_upload(name: str, data: bytes, card: Mapping[str, Any]) -> Volume:
    """The upload ``name`` (NIfTI, zipped DICOM series, PNG or TIFF), ready for the model of ``card``."""
    uploads.check_upload_size(name, len(data), DEFAULT_MAX_UPLOAD_MB)
    lower = name.lower()
    if lower.endswith((".nii", ".nii.gz")):
        volume = _volume(name, *_read_nifti(name, data), "", card)
    elif lower.endswith(".zip"):
        volume = _read_dicom_zip(name, data, card)
    elif lower.endswith((".png", ".tif", ".tiff")):
        volume = _read_picture(name, data, card)
    else:
        raise DataError(name, "not a supported upload: give a NIfTI file (.nii, .nii.gz), a zipped DICOM "
                              "series (.zip), or a PNG or TIFF image")
    _check_against_card(volume, card)
    return volume


def upload_stem(name: str) -> str:
    """The upload's file name without folders and suffix (``scans/ct.nii.gz`` -> ``ct``)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".nii.gz", *(f".{t}" for t in UPLOAD_TYPES)):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)] or "upload"
    return base or "upload"


def _read_nifti(name: str, data: bytes) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """``(array, affine, header)`` of NIfTI bytes, gzipped or not (scaling applied, as ``load_nifti``)."""
    if data[:2] == b"\x1f\x8b":
        cap = _max_unpacked()
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
                data = f.read(cap + 1)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(name, f"truncated or corrupt gzip data ({exc})") from None
        if len(data) > cap:
            raise DataError(name, f"unpacks to over {cap / MB:g} MB "
                                  f"({UNCOMPRESSED_FACTOR} x the upload cap)")
    sizes = {int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big")}
    kind = nib.Nifti2Image if 540 in sizes else nib.Nifti1Image if 348 in sizes else None
    if kind is None:
        raise DataError(name, "not a NIfTI file (no NIfTI header)")
    try:
        image = kind.from_bytes(data)
        array = np.asarray(image.dataobj)
    except _NIFTI_ERRORS as exc:
        raise DataError(name, f"truncated or corrupt NIfTI ({str(exc).splitlines()[0][:200]})") from None
    return array, np.array(image.affine, dtype=np.float64), image.header


def _volume(name: str, array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None,
            modality: str, card: Mapping[str, Any], note: str = "") -> Volume:
    """A volume (x, y, z) or (x, y, z, channels) in the card's orientation, channels first."""
    if array.ndim == 5 and array.shape[3] == 1:  # (x, y, z, 1, channels): NIfTI's time axis left empty
        array = array[:, :, :, 0]
    if array.ndim not in (3, 4):
        raise DataError(name, f"a {array.ndim}D array {array.shape}; a volume is 3D, or 4D with channels "
                              "on the last axis")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise DataError(name, f"voxel type {array.dtype} is not a real number")
    ornt = None
    if card["preprocessing"]["orientation"]:
        target = orientations.axcodes2ornt(card["preprocessing"]["orientation"])
        ornt = orientations.ornt_transform(orientations.io_orientation(affine), target)
        array = orientations.apply_orientation(array, ornt)
    image = (np.moveaxis(array, -1, 0) if array.ndim == 4 else array[None]).astype(np.float32)
    volume = Volume(name, np.ascontiguousarray(image), (), modality, affine, ornt, header, note)
    volume.spacing = tuple(float(v) for v in np.linalg.norm(volume.model_affine[:3, :3], axis=0))
    return volume


def _read_picture(name: str, data: bytes, card: Mapping[str, Any]) -> Volume:
    """A PNG or TIFF as one 2D image (C, H, W): grey, 16-bit grey or RGB (alpha dropped)."""
    image = _picture_array(name, data)
    if image.shape[0] == 3 and card["in_channels"] == 1 and np.array_equal(image[0], image[1]) \
            and np.array_equal(image[0], image[2]):
        image = image[:1]  # an RGB file of a grey picture
    if image.shape[0] == 1 and card["in_channels"] == 3:
        image = np.repeat(image, 3, axis=0)  # as training repeated grey (channel_policy)
    return Volume(name, image.astype(np.float32), (1.0, 1.0), "", np.eye(4), None, None)


def _picture_array(name: str, data: bytes) -> np.ndarray:
    """The pixels of a PNG or TIFF as stored, (C, H, W): grey or 16-bit grey (C = 1), or RGB (C = 3, alpha
    dropped)."""
    try:
        with Image.open(io.BytesIO(data)) as picture:
            if getattr(picture, "n_frames", 1) > 1:
                raise DataError(name, f"{picture.n_frames} pages; upload a single 2D image")
            if picture.mode == "F":
                raise DataError(name, "floating-point pixels are not supported; save it as 8- or 16-bit")
            grey = picture.mode in ("1", "L", "LA", "La", "I;16", "I;16L", "I;16B", "I;16N", "I")
            array = np.asarray(picture.convert("RGB") if not grey else
                               picture if picture.mode.startswith("I") else picture.convert("L"))
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(name, "not a readable PNG or TIFF image") from None
    except _IMAGE_ERRORS as exc:
        raise DataError(name, f"truncated or corrupt image ({exc})") from None
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


def _read_dicom_zip(name: str, data: bytes, card: Mapping[str, Any]) -> Volume:
    """The (largest) DICOM series in a zip, read in memory, as a volume (rows, columns, slices)."""
    members = _dicom_members(name, data)
    datasets, headers = {}, []
    for member, raw in members:
        path = Path(name) / member
        try:
            ds = read_dataset(io.BytesIO(raw), _DICOM_TAGS)  # pydicom reads file objects too
        except _DICOM_ERRORS as exc:
            raise DataError(path, f"corrupt DICOM ({str(exc).splitlines()[0][:200]})") from None
        if "SeriesInstanceUID" not in ds or "Rows" not in ds or "Columns" not in ds:
            raise DataError(path, "no SeriesInstanceUID, Rows or Columns (not an image slice)")
        datasets[path] = ds
        headers.append(_slice_header(path, ds))
    series = group_series(headers)
    record = max(series, key=lambda r: len(r.files))
    note = (f"the zip holds {len(series)} series; showing the largest ({len(record.files)} slices)"
            if len(series) > 1 else "")
    by_path = {h.path: h for h in headers}
    slices = [_dicom_pixels(path, datasets[path], record.shape[:2]) for path in record.files]
    first, last = by_path[record.files[0]], by_path[record.files[-1]]
    return _volume(name, np.stack(slices, axis=-1), _dicom_affine(first, last, len(slices), record.spacing),
                   None, record.modality, card, note)


def _dicom_members(name: str, data: bytes) -> list[tuple[str, bytes]]:
    """``(member name, bytes)`` of the DICOM files (``DICM`` marker) in a zip, read in memory."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except _ZIP_ERRORS as exc:
        raise DataError(name, f"not a readable zip ({exc})") from None
    with archive:
        files = [info for info in archive.infolist() if not info.is_dir()]
        if len(files) > MAX_ZIP_MEMBERS:
            raise DataError(name, f"{len(files)} files in the zip, over the cap of {MAX_ZIP_MEMBERS}")
        for info in files:
            problem = _unsafe_member(info)
            if problem:
                raise DataError(name, f"member {info.filename!r} is {problem}; refusing the zip")
        cap = _max_unpacked()
        declared = sum(info.file_size for info in files)
        if declared > cap:
            raise DataError(name, f"unpacks to {declared / MB:.0f} MB, over the cap of {cap / MB:g} MB "
                                  f"({UNCOMPRESSED_FACTOR} x the upload cap)")
        out, total = [], 0
        for info in files:
            try:
                with archive.open(info) as f:
                    head = f.read(132)
                    if head[128:132] != b"DICM" or Path(info.filename).name.upper() == "DICOMDIR":
                        continue
                    raw = head + f.read(info.file_size - len(head) + 1)
            except _ZIP_ERRORS as exc:
                raise DataError(name, f"member {info.filename!r} cannot be read ({exc})") from None
            total += len(raw)
            if len(raw) != info.file_size or total > cap:
                raise DataError(name, f"member {info.filename!r} unpacks to more than the zip declares")
            out.append((info.filename, raw))
    if not out:
        raise DataError(name, "no DICOM files in the zip (none has the DICM marker)")
    return out


def _unsafe_member(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member could escape a folder it were unpacked into (None when it could not)."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in name.split("/"):
        return "a path with '..'"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    if info.flag_bits & 0x1:
        return "encrypted"
    return None


def _slice_header(path: Path, ds: Any) -> SliceHeader:
    spacing = ds.get("PixelSpacing") or (1.0, 1.0)
    orientation, position = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    instance, thickness = ds.get("InstanceNumber"), ds.get("SliceThickness")
    try:
        return SliceHeader(
            path=path, series_uid=str(ds.SeriesInstanceUID), modality=str(ds.get("Modality", "")),
            rows=int(ds.Rows), columns=int(ds.Columns),
            pixel_spacing=(float(spacing[0]), float(spacing[1])),
            orientation=tuple(float(v) for v in orientation) if orientation else None,
            position=tuple(float(v) for v in position) if position else None,
            instance=int(instance) if instance not in (None, "") else None,
            thickness=float(thickness) if thickness not in (None, "") else None)
    except (TypeError, ValueError, IndexError) as exc:
        raise DataError(path, f"malformed geometry tags ({exc})") from None


def _dicom_pixels(path: Path, ds: Any, shape: tuple[int, int]) -> np.ndarray:
    """One slice as float32 with RescaleSlope/Intercept applied (as ``twinview.data.dicom.load_slice``)."""
    try:
        pixels = ds.pixel_array
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except _DICOM_ERRORS as exc:
        raise DataError(path, f"cannot decode the pixel data ({str(exc).splitlines()[0][:200]})") from None
    if pixels.shape != shape:
        raise DataError(path, f"pixel data of shape {pixels.shape}, not {shape}: colour and multi-frame "
                              "DICOM are not supported")
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _dicom_affine(first: SliceHeader, last: SliceHeader, n: int,
                  spacing: tuple[float, float, float]) -> np.ndarray:
    """(row, column, slice) indices to RAS+ mm, as ``twinview.data.dicom.load_dicom_series`` builds it."""
    row_spacing, column_spacing, slice_spacing = spacing
    if first.orientation is None or first.position is None or last.position is None:
        return np.diag([row_spacing, column_spacing, slice_spacing, 1.0])
    row_direction, column_direction = np.array(first.orientation[:3]), np.array(first.orientation[3:6])
    if n > 1:
        step = (np.array(last.position) - np.array(first.position)) / (n - 1)
    else:
        step = np.cross(row_direction, column_direction) * slice_spacing
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = column_direction * row_spacing, row_direction * column_spacing, step
    lps[:3, 3] = first.position
    return _LPS_TO_RAS @ lps


# --------------------------------------------------------------------------- the card


def modality_group(modality: str) -> str:
    """``CT``, ``MR`` (MR, MRI and MR sequence names such as T2 or FLAIR) or the modality in capitals."""
    word = modality.strip().upper()
    return "MR" if word in _MR else word


def card_modality(card: Mapping[str, Any]) -> str:
    """What the model was trained on (the card's ``data.modality``), "" when the card does not say."""
    return (card.get("data") or {}).get("modality", "")


def _check_against_card(volume: Volume, card: Mapping[str, Any]) -> None:
    name, trained = volume.name, card_modality(card)
    if volume.modality and trained and modality_group(volume.modality) != modality_group(trained):
        raise DataError(name, f"a {volume.modality} series; the model was trained on {trained} "
                              f"({modality_group(trained)}) images")
    channels, wanted = volume.image.shape[0], card["in_channels"]
    if channels != wanted:
        raise DataError(name, f"{channels} channel(s); the model takes {wanted} ({trained or 'its images'})")
    pre = card["preprocessing"]
    if volume.is_2d and card["spatial_dims"] == 3:
        raise DataError(name, "a 2D image; the model segments 3D volumes: upload NIfTI or a zipped "
                              "DICOM series")
    if volume.is_2d and pre["intensity"]["kind"] == "ct_window":
        raise DataError(name, "a PNG or TIFF holds no Hounsfield units; this CT model needs NIfTI or DICOM")
    if not volume.is_2d and card["spatial_dims"] == 2 and pre["slice_axis"] is None:
        raise DataError(name, "a volume; the model segments 2D images: upload a PNG or TIFF")
    if not volume.is_2d and pre["spacing"] is not None:
        raise DataError(name, f"the model resamples volumes to {pre['spacing']} mm, which this app does not "
                              "do: use `twinview seg predict` with the run folder")


# --------------------------------------------------------------------------- segmentation


def segment_volume(model: OnnxModel, volume: Volume) -> np.ndarray:
    """The label mask on ``volume.image``'s grid: the card's intensity step, sliding windows, argmax."""
    image = normalise_intensity(volume.image, model.card["preprocessing"]["intensity"])
    logits = segment(model, image)
    return logits.argmax(0).astype(np.uint8 if logits.shape[0] <= 256 else np.uint16)


def label_names(card: Mapping[str, Any]) -> dict[int, str]:
    """The card's labels by index, background included."""
    return {int(k): v for k, v in sorted(card["labels"].items(), key=lambda kv: int(kv[0]))}


def read_label(name: str, data: bytes, volume: Volume, labels: Mapping[int, str]) -> np.ndarray:
    """A ground-truth label file on the upload's grid, in the model's axis order like the mask."""
    uploads.check_upload_size(name, len(data), DEFAULT_MAX_UPLOAD_MB)
    if name.lower().endswith((".nii", ".nii.gz")):
        array, affine, _ = _read_nifti(name, data)
        if array.ndim == 4 and array.shape[3] == 1:
            array = array[..., 0]
        if array.shape != volume.input_shape:
            raise DataError(name, f"label shape {array.shape} differs from the image's {volume.input_shape}; "
                                  "upload the label file of this image")
        if not volume.is_2d and float(np.max(np.abs(affine - volume.affine))) > AFFINE_TOLERANCE:
            raise DataError(name, "label affine differs from the image's; upload the label file of this "
                                  "image")
        if volume.ornt is not None:
            array = orientations.apply_orientation(array, volume.ornt)
    elif name.lower().endswith((".png", ".tif", ".tiff")):
        picture = _read_picture(name, data, {"in_channels": 1})
        array = picture.image[0]
        if picture.image.shape[0] != 1 or array.shape != volume.image.shape[1:]:
            raise DataError(name, f"label of shape {picture.image.shape[1:]} with {picture.image.shape[0]} "
                                  f"channel(s); the image needs one channel of {volume.image.shape[1:]}")
    else:
        raise DataError(name, "not a label file: give NIfTI (.nii, .nii.gz), PNG or TIFF")
    if not np.array_equal(array, np.round(array)):
        raise DataError(name, "label values are not integers")
    unknown = sorted(set(np.unique(array).astype(int).tolist()) - set(labels))
    if unknown:
        raise DataError(name, f"label values {unknown[:10]} are not among the model's labels "
                              f"{sorted(labels)}")
    return np.ascontiguousarray(array.astype(np.uint16))


# --------------------------------------------------------------------------- statistics


def structure_volumes(mask: np.ndarray, spacing: tuple[float, ...],
                      labels: Mapping[int, str]) -> list[dict[str, Any]]:
    """One row per foreground label: its voxel count and, for volumes, its volume in mL."""
    counts = np.bincount(mask.ravel(), minlength=max(labels) + 1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    rows = []
    for c, name in labels.items():
        if c:
            row: dict[str, Any] = {"structure": name, "voxels": int(counts[c])}
            if mask.ndim == 3:
                row["volume (mL)"] = round(int(counts[c]) * voxel_ml, 3)
            rows.append(row)
    return rows


def dice_per_structure(pred: np.ndarray, truth: np.ndarray, labels: Mapping[int, str]) -> dict[str, float]:
    """Dice of each foreground label (both empty: 1.0, one empty: 0.0, as ``twinview seg eval``)."""
    if pred.shape != truth.shape:
        raise DataError(None, f"label shape {truth.shape} differs from the mask's {pred.shape}")
    out = {}
    for c, name in labels.items():
        if c:
            p, t = pred == c, truth == c
            total = int(p.sum()) + int(t.sum())
            out[name] = 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total
    return out


# --------------------------------------------------------------------------- writing masks


def mask_nifti_bytes(mask: np.ndarray, volume: Volume) -> bytes:
    """The mask as ``.nii.gz`` bytes on the input's own grid, with its affine (and header, for NIfTI)."""
    if volume.ornt is not None:
        back = np.empty_like(volume.ornt)
        for axis, (target, flip) in enumerate(volume.ornt):
            back[int(target)] = (axis, flip)
        mask = orientations.apply_orientation(mask, back)
    header = None
    kind = nib.Nifti1Image
    if volume.header is not None:
        header = volume.header.copy()
        header.set_data_dtype(mask.dtype)
        kind = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = kind(np.ascontiguousarray(mask), volume.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    return gzip.compress(image.to_bytes(), compresslevel=6)


def mask_png_bytes(mask: np.ndarray) -> bytes:
    """A 2D mask as a PNG whose pixel values are the label indices."""
    out = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.uint16)).save(out, "PNG")
    return out.getvalue()


# --------------------------------------------------------------------------- detection


def read_detection_upload(name: str, data: bytes) -> np.ndarray:
    """A PNG or TIFF upload for a detection model, as stored: (H, W, C), C = 1 (grey) or 3 (RGB)."""
    uploads.check_upload_size(name, len(data), DEFAULT_MAX_UPLOAD_MB)
    lower = name.lower()
    if lower.endswith((".nii", ".nii.gz", ".zip")):
        raise DataError(name, "a volume; the model detects in 2D images only: upload a PNG or TIFF")
    if not lower.endswith((".png", ".tif", ".tiff")):
        raise DataError(name, "not a supported upload: the model detects in PNG or TIFF images")
    return np.moveaxis(_picture_array(name, data), 0, -1)


def detect_image(model: OnnxModel, image: np.ndarray) -> dict[str, np.ndarray]:
    """All the detections of ``model`` in ``image`` (as :func:`read_detection_upload` gives it): boxes,
    labels (category ids) and scores, highest first."""
    boxes, labels, scores = detect(model, image)
    return {"boxes": boxes, "labels": labels, "scores": scores}


def category_names(card: Mapping[str, Any]) -> dict[int, str]:
    """A detection card's category ids to names (label k is category ``category_ids[k - 1]``)."""
    return {int(c): card["labels"].get(str(k), str(c))
            for k, c in enumerate(card["architecture"]["category_ids"], start=1)}


def category_colour(card: Mapping[str, Any], category: int) -> tuple[int, int, int]:
    """The box colour of a category: its label's colour in the palette."""
    return label_colour(card["architecture"]["category_ids"].index(int(category)) + 1)


def detection_counts(found: Mapping[str, np.ndarray], min_score: float,
                     card: Mapping[str, Any]) -> dict[str, int]:
    """How many detections of each category score at least ``min_score``."""
    kept = found["labels"][found["scores"] >= min_score]
    return {name: int((kept == c).sum()) for c, name in category_names(card).items()}


def draw_detections(image: np.ndarray, found: Mapping[str, np.ndarray], min_score: float,
                    card: Mapping[str, Any]) -> np.ndarray:
    """The image (H, W, C) as RGB uint8, scaled as the model saw it (divided by ``max_value``), with the
    boxes of the detections scoring at least ``min_score`` outlined in their category's colour."""
    max_value = float(card["preprocessing"]["intensity"]["max_value"])
    pixels = np.clip(np.asarray(image, dtype=np.float32) / max_value, 0.0, 1.0) * 255.0
    out = np.ascontiguousarray(np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels[..., :3])
    out = np.round(out).astype(np.uint8)
    height, width = out.shape[:2]
    pen = max(1, round(min(height, width) / 400))  # line width: 1 px, thicker on large images
    keep = found["scores"] >= min_score
    for box, category in zip(found["boxes"][keep], found["labels"][keep], strict=True):
        x0, x1 = _pixel_span(box[0], box[2], width)
        y0, y1 = _pixel_span(box[1], box[3], height)
        colour = np.array(category_colour(card, int(category)), np.uint8)
        out[y0:min(y0 + pen, y1 + 1), x0:x1 + 1] = colour
        out[max(y1 - pen + 1, y0):y1 + 1, x0:x1 + 1] = colour
        out[y0:y1 + 1, x0:min(x0 + pen, x1 + 1)] = colour
        out[y0:y1 + 1, max(x1 - pen + 1, x0):x1 + 1] = colour
    return out


def _pixel_span(low: float, high: float, size: int) -> tuple[int, int]:
    """The first and last pixel a box edge pair covers along an axis of ``size`` pixels, inside it."""
    first = int(np.clip(np.floor(low), 0, size - 1))
    return first, max(first, int(np.clip(np.ceil(high) - 1, 0, size - 1)))


def detections_json(found: Mapping[str, np.ndarray], min_score: float, card: Mapping[str, Any]) -> bytes:
    """The detections scoring at least ``min_score`` as JSON: category id and name, box xyxy, score."""
    import json

    names = category_names(card)
    keep = found["scores"] >= min_score
    rows = [{"category_id": int(c), "category": names.get(int(c), str(c)),
             "box_xyxy": [round(float(v), 2) for v in box], "score": round(float(s), 4)}
            for box, c, s in zip(found["boxes"][keep], found["labels"][keep], found["scores"][keep],
                                 strict=True)]
    return (json.dumps(rows, indent=1) + "\n").encode()


# --------------------------------------------------------------------------- display


def display_modality(volume: Volume, card: Mapping[str, Any]) -> str:
    """The modality group the window presets follow: the file's, else the model's."""
    return modality_group(volume.modality or card_modality(card))


def window_presets(volume: Volume, card: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """Display windows as ``(low, high)``: CT presets (and the model's own window) for CT, percentile
    windows of the whole volume otherwise."""
    intensity = card["preprocessing"]["intensity"]
    if display_modality(volume, card) == "CT":
        out = {name: (level - width / 2, level + width / 2) for name, (level, width) in CT_WINDOWS.items()}
        if intensity["kind"] == "ct_window":
            low, high = intensity["window"]
            out[f"model input ({low:g} to {high:g} HU)"] = (float(low), float(high))
        return out
    values = volume.image.ravel()
    values = values[:: max(1, values.size // 2_000_000)]  # a sample is plenty for display percentiles
    bounds = np.percentile(values, [p for pair in PERCENTILE_WINDOWS.values() for p in pair])
    return {name: (float(bounds[2 * i]), float(bounds[2 * i + 1]))
            for i, name in enumerate(PERCENTILE_WINDOWS)}


def label_colour(label: int) -> tuple[int, int, int]:
    """The overlay colour of a foreground label."""
    return tuple(int(v) for v in PALETTE[(label - 1) % len(PALETTE)])


def view_axes(volume: Volume) -> dict[str, int]:
    """The views to show and the axis each slices along: axial, coronal, sagittal for RAS volumes."""
    if volume.is_2d:
        return {"image": -1}
    return dict(VIEWS) if volume.ras else {f"axis {a}": a for a in range(3)}


def view_slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A 2D slice of a spatial array turned for the screen; for RAS volumes in radiological convention
    (patient's right on the left, anterior or superior at the top). A 2D array (axis -1) stays as it is."""
    if axis < 0:
        return array
    return np.take(array, index, axis=axis).T[::-1, ::-1]


def overlay(volume: Volume, mask: np.ndarray, axis: int, index: int, window: tuple[float, float],
            opacity: float, channel: int = 0) -> np.ndarray:
    """The slice ``index`` along ``axis`` as RGB uint8: the image in ``window``, each label in its colour
    blended at ``opacity``, stretched to the voxels' physical aspect ratio."""
    low, high = window
    rgb_image = volume.is_2d and volume.image.shape[0] == 3
    channels = volume.image if rgb_image else volume.image[channel:channel + 1]
    grey = np.stack([view_slice(c, axis, index) for c in channels], axis=-1)
    scaled = np.clip((grey - low) / max(high - low, 1e-6), 0.0, 1.0) * 255.0
    base = np.repeat(scaled, 3, axis=-1) if scaled.shape[-1] == 1 else scaled
    labels = view_slice(mask, axis, index)
    colours = np.vstack([np.zeros((1, 3), np.uint8), PALETTE[(np.arange(int(labels.max(initial=0))) %
                                                                len(PALETTE))]])
    blend = np.where((labels > 0)[..., None], (1 - opacity) * base + opacity * colours[labels], base)
    out = Image.fromarray(np.round(blend).astype(np.uint8))
    if axis >= 0:
        earlier, later = (s for a, s in enumerate(volume.spacing) if a != axis)
        height, width = out.height, out.width
        scale = later / earlier  # screen rows step along the later axis, screen columns along the earlier
        if scale >= 1:
            out = out.resize((width, max(1, round(height * scale))), Image.NEAREST)
        else:
            out = out.resize((max(1, round(width / scale)), height), Image.NEAREST)
    return np.asarray(out)
