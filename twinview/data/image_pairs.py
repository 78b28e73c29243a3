"""2D image/mask pairs (retina, skin lesions, polyps, microscopy): ``images/`` beside ``masks/`` (or
``labels/``), a mask per image under the image's stem, possibly with a suffix.

``images/Image_01L.jpg`` pairs with ``masks/Image_01L.png`` or, with the suffix ``_1stHO``, with
``masks/Image_01L_1stHO.png``. The suffix is given (``mask_suffix``) or found: the part of each mask's
stem after the longest image stem it starts with, which must be the same for every mask. Images are
grey or RGB, 8 or 16 bit (:mod:`twinview.data.images`); an image without a mask is unlabelled.

Masks hold one class per pixel: indexed (palette) PNGs give their indices, grey masks their values (8
or 16 bit), RGB masks whose three channels agree their grey value. ``mask_values`` maps stored values
to classes explicitly (``{0: 0, 255: 1}`` for a binary 0/255 mask); without it the values are the
classes. A value that the mapping lacks is an error naming the mask.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from twinview.data.images import is_image
from twinview.errors import DataError, display_path

PathLike = str | os.PathLike[str]
IMAGES_DIR = "images"
MASK_DIRS = ("masks", "labels")


@dataclass(frozen=True)
class ImagePair:
    case_id: str  # the image's stem
    image: Path
    mask: Path | None


def is_image_pairs(root: PathLike) -> bool:
    root = Path(root)
    return (root / IMAGES_DIR).is_dir() and mask_dir(root) is not None


def mask_dir(root: PathLike) -> Path | None:
    """``root/masks`` or ``root/labels``, whichever exists (masks first)."""
    return next((Path(root) / d for d in MASK_DIRS if (Path(root) / d).is_dir()), None)


def scan_image_pairs(root: PathLike, mask_suffix: str | None = None
                     ) -> tuple[list[ImagePair], str, list[DataError]]:
    """Every image with its mask (or None), the suffix used, and a DataError per mask that pairs with
    no image (or per clash: two images with one stem, a suffix that differs between masks)."""
    root = Path(root)
    masks_root = mask_dir(root)
    if not (root / IMAGES_DIR).is_dir() or masks_root is None:
        raise DataError(root, f"2D pairs need {IMAGES_DIR}/ and {' or '.join(d + '/' for d in MASK_DIRS)}")
    problems: list[DataError] = []
    images = _by_stem(root / IMAGES_DIR, problems)
    masks = _by_stem(masks_root, problems)
    if not images:
        raise DataError(root / IMAGES_DIR, "no images (.png, .jpg, .jpeg, .tif, .tiff)")
    suffix = mask_suffix if mask_suffix is not None else _find_suffix(images, masks, masks_root, problems)
    paired: dict[str, Path] = {}
    reported = {Path(p.path) for p in problems if p.path is not None}
    for stem, path in masks.items():
        if path in reported:
            continue
        image_stem = stem[: len(stem) - len(suffix)] if suffix and stem.endswith(suffix) else stem
        if (suffix and not stem.endswith(suffix)) or image_stem not in images:
            want = f"{IMAGES_DIR}/{image_stem}.*" + (f" (mask suffix {suffix!r})" if suffix else "")
            problems.append(DataError(path, f"no image for this mask: expected {want}"))
            continue
        paired[image_stem] = path
    pairs = [ImagePair(stem, path, paired.get(stem)) for stem, path in sorted(images.items())]
    return pairs, suffix, problems


def read_image_pairs(root: PathLike, mask_suffix: str | None = None) -> list[ImagePair]:
    """The pairs of :func:`scan_image_pairs`; its first problem is raised."""
    pairs, _, problems = scan_image_pairs(root, mask_suffix)
    if problems:
        raise problems[0]
    return pairs


def load_mask(path: PathLike, mask_values: Mapping[int, int] | None = None,
              classes: Mapping[int, str] | None = None) -> np.ndarray:
    """(H, W) int64 classes of a mask file (see the module); DataError naming the file for an unreadable
    mask, a colour mask, a value missing from ``mask_values``, or a class not in ``classes``."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            array = np.array(image)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(path, f"not a readable mask image: {display_path(str(exc))}") from exc
    if array.ndim == 3:
        if mode in ("LA", "RGBA") or array.shape[2] == 4:
            array = array[..., : 1 if mode == "LA" else 3]
        if array.shape[2] == 3 and not (np.array_equal(array[..., 0], array[..., 1])
                                        and np.array_equal(array[..., 0], array[..., 2])):
            raise DataError(path, "a colour mask (channels differ): save it as an indexed or grey PNG with "
                                  "one class value per pixel")
        array = array[..., 0]
    values = array.astype(np.int64)
    if mask_values:
        found = np.unique(values)
        unknown = [int(v) for v in found if int(v) not in mask_values]
        if unknown:
            raise DataError(path, f"mask values {unknown[:5]} are not in data.mask_values "
                                  f"{dict(sorted(mask_values.items()))}")
        lookup = np.zeros(int(found.max()) + 1, dtype=np.int64)
        for stored, cls in mask_values.items():
            if stored < len(lookup):
                lookup[stored] = cls
        values = lookup[values]
    if classes is not None:
        unknown = sorted(set(np.unique(values).tolist()) - set(classes))
        if unknown:
            hint = "" if mask_values else f": map them with data.mask_values, e.g. {{0: 0, {unknown[-1]}: 1}}"
            raise DataError(path, f"mask values {unknown[:5]} are not among the classes "
                                  f"{sorted(classes)}{hint}")
    return values


def _by_stem(folder: Path, problems: list[DataError]) -> dict[str, Path]:
    """Stem -> image file directly in ``folder``; two files with one stem are a problem."""
    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and is_image(p)):
        if path.stem in found:
            problems.append(DataError(path, f"same stem as {found[path.stem].name}: which one is meant?"))
            continue
        found[path.stem] = path
    return found


def _find_suffix(images: dict[str, Path], masks: dict[str, Path], masks_root: Path,
                 problems: list[DataError]) -> str:
    """The common part of the mask stems after their image stems ('' when masks share the stems)."""
    suffixes: dict[str, str] = {}
    for stem in masks:
        starts = [s for s in images if stem.startswith(s)]
        if starts:
            suffixes[stem] = stem[len(max(starts, key=len)):]
    if not suffixes:
        return ""
    counts = Counter(suffixes.values())
    common = min(counts, key=lambda s: (-counts[s], s))
    odd = next((m for m, s in suffixes.items() if s != common), None)
    if odd is not None:
        problems.append(DataError(masks[odd], f"mask suffix {suffixes[odd]!r} differs from the "
                                              f"{common!r} of most masks in {display_path(masks_root)}"))
    return common
