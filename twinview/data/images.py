"""2D image files (PNG, JPEG, TIFF), read with Pillow.

Layout: image files anywhere below a root folder (``.png .jpg .jpeg .tif .tiff``, any case); other
files and macOS ``._*`` files are ignored. Loaded arrays are ``HxWxC`` with C = 1 (grey) or 3 (RGB):
alpha is dropped, palettes are converted to RGB, 16-bit grey stays uint16, everything else is uint8.
Pillow reads 16-bit RGB PNGs as 8-bit RGB, so those are reported and loaded as 8-bit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from twinview.data.records import ImageRecord
from twinview.errors import DataError, display_path

PathLike = str | os.PathLike[str]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_GREY_MODES = ("1", "L", "LA", "La")
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_UNSUPPORTED_MODES = ("F",)
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def is_image(path: PathLike) -> bool:
    """Whether the name has an image suffix (macOS ``._*`` files excluded)."""
    name = Path(path).name
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("._")


def list_image_files(root: PathLike) -> list[Path]:
    """The image files below ``root`` (or ``root`` itself when it is an image), sorted by path."""
    root = Path(root)
    if root.is_file():
        return [root] if is_image(root) else []
    if not root.is_dir():
        raise DataError(root, "no such file or folder")
    return sorted(p for p in root.rglob("*") if is_image(p) and p.is_file())


def read_image_folder(root: PathLike) -> list[ImageRecord]:
    """One record per image below ``root``, from the file headers only (no pixel decoding)."""
    files = list_image_files(root)
    if not files:
        raise DataError(root, f"no images ({', '.join(IMAGE_SUFFIXES)})")
    return [image_record(path) for path in files]


def image_record(path: PathLike) -> ImageRecord:
    """Size, channels and bit depth of one image, from its header."""
    with _open(path) as image:
        channels, bit_depth = _layout(image.mode, path)
        return ImageRecord(Path(path), image.height, image.width, channels, bit_depth)


def load_image(path: PathLike) -> np.ndarray:
    """Decode one image fully into ``HxWxC`` (C = 1 or 3), uint8, or uint16 for 16-bit grey."""
    with _open(path) as image:
        _layout(image.mode, path)
        try:
            image.load()
        except _READ_ERRORS as exc:
            raise DataError(path, f"unreadable or truncated image: {display_path(str(exc))}") from exc
        array = _to_array(image, path)
    return array[..., None] if array.ndim == 2 else array


def _open(path: PathLike) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except UnidentifiedImageError:
        raise DataError(path, "not a readable image (PNG, JPEG or TIFF)") from None
    except _READ_ERRORS as exc:
        raise DataError(path, f"unreadable or truncated image: {display_path(str(exc))}") from exc


def _layout(mode: str, path: PathLike) -> tuple[int, int]:
    """``(channels, bit depth)`` that :func:`load_image` returns for a Pillow mode."""
    if mode in _UNSUPPORTED_MODES:
        raise DataError(path, f"unsupported image mode {mode} (floating point)")
    if mode in _UINT16_MODES:
        return 1, 16
    return (1 if mode in _GREY_MODES else 3), 8


def _to_array(image: Image.Image, path: PathLike) -> np.ndarray:
    if image.mode in _UINT16_MODES:
        array = np.asarray(image)
        if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint16).max):
            raise DataError(path, f"integer values outside 0..65535 (mode {image.mode})")
        return array.astype(np.uint16)
    target = "L" if image.mode in _GREY_MODES else "RGB"
    return np.array(image if image.mode == target else image.convert(target))  # writeable copy
