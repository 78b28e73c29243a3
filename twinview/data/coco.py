"""COCO-format object detection sets: the common exchange format for boxes, read and written torch-free.

A COCO file is one JSON object with ``images`` (``id``, ``file_name``, ``width``, ``height``),
``annotations`` (``image_id``, ``category_id``, ``bbox`` as ``[x, y, width, height]`` in pixels) and
``categories`` (``id``, ``name``). Here boxes are ``xyxy`` float32 pixel edges (``x_max``, ``y_max``
exclusive), as :mod:`twinview.data.dsb2018` gives them, and ``file_name`` is relative to an image root.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twinview.data.dsb2018 import load_nuclei, read_dsb2018
from twinview.errors import DataError, display_path, missing_path
from twinview.files import write_text_atomic

PathLike = str | os.PathLike[str]
COCO_KEYS = ("images", "annotations", "categories")
_SHOWN_MISSING = 5  # missing image files named in the error; the rest are counted


@dataclass(frozen=True)
class DetImage:
    """One image and its boxes (``N x 4`` float32 ``xyxy``, inside the image) with their category ids."""

    id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32
    labels: np.ndarray  # (N,) int64


@dataclass(frozen=True)
class DetSet:
    """A detection set; ``clipped`` and ``dropped`` count the boxes mended or discarded while reading."""

    images: list[DetImage]
    categories: dict[int, str]
    source: Path
    clipped: int = 0
    dropped: int = 0


def is_coco_json(path: PathLike) -> bool:
    """Whether ``path`` is a ``.json`` file holding an object with the COCO keys (parsed to find out)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or path.name.startswith("._") or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(key in data for key in COCO_KEYS)


def coco_files(folder: PathLike) -> list[Path]:
    """The COCO JSON files directly in ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if is_coco_json(p))


def read_coco(json_path: PathLike, image_root: PathLike | None = None) -> DetSet:
    """Read a COCO detection set; image files are ``image_root / file_name``.

    ``image_root`` defaults to the JSON's folder or, when more files are found there, its ``images/``
    folder. Boxes reaching outside their image are clipped to it and zero-area boxes (after clipping)
    dropped; both are counted in the set and reported by one warning, since exports often carry a few.
    ``iscrowd`` annotations are dropped silently: they mark regions to ignore, not objects. Images
    without annotations are kept as background. An unknown category id, missing image files (one
    error naming the first few), invalid JSON or missing keys are a DataError naming the JSON file.
    """
    det_set, _, missing = scan_coco(json_path, image_root)
    if missing:
        shown = ", ".join(display_path(p) for p in missing[:_SHOWN_MISSING])
        more = f" and {len(missing) - _SHOWN_MISSING} more" if len(missing) > _SHOWN_MISSING else ""
        raise DataError(json_path, f"{len(missing)} image file(s) missing: {shown}{more}")
    if det_set.clipped or det_set.dropped:
        warnings.warn(f"{display_path(json_path)}: {det_set.clipped} box(es) clipped to their image, "
                      f"{det_set.dropped} zero-area box(es) dropped", stacklevel=2)
    return det_set


def scan_coco(json_path: PathLike, image_root: PathLike | None = None) -> tuple[DetSet, Path, list[Path]]:
    """As :func:`read_coco`, but lenient about image files (for inspection): the set of the images
    whose files exist, the image root used and the paths of the missing files. Nothing is warned."""
    json_path = Path(json_path)
    data = _load_json(json_path)
    categories = _categories(data["categories"], json_path)
    entries = [_image_entry(entry, i, json_path) for i, entry in enumerate(_list(data, "images", json_path))]
    root = Path(image_root) if image_root is not None else _default_root(json_path, [e[1] for e in entries])
    by_id: dict[int, tuple[list[list[float]], list[int]]] = {}
    sizes: dict[int, tuple[int, int, int, int]] = {}
    for image_id, _, width, height in entries:
        if image_id in by_id:
            raise DataError(json_path, f"image id {image_id} appears twice in 'images'")
        by_id[image_id] = ([], [])
        sizes[image_id] = (width, height, width, height)
    clipped = dropped = 0
    for i, ann in enumerate(_list(data, "annotations", json_path)):
        image_id, category, box, crowd = _annotation(ann, i, json_path)
        if image_id not in by_id:
            raise DataError(json_path, f"annotations[{i}]: image id {image_id} is not in 'images'")
        if category not in categories:
            raise DataError(json_path, f"annotations[{i}]: category id {category} is not in 'categories' "
                                       f"{sorted(categories)}")
        if crowd:
            continue
        inside = [min(max(v, 0.0), limit) for v, limit in zip(box, sizes[image_id], strict=True)]
        if inside[2] <= inside[0] or inside[3] <= inside[1]:
            dropped += 1
            continue
        clipped += inside != box
        by_id[image_id][0].append(inside)
        by_id[image_id][1].append(category)
    images, missing = [], []
    for image_id, file_name, width, height in entries:
        path = root / file_name
        if not path.is_file():
            missing.append(path)
            continue
        boxes, labels = by_id[image_id]
        images.append(DetImage(image_id, path, width, height, np.array(boxes, np.float32).reshape(-1, 4),
                               np.array(labels, np.int64)))
    return DetSet(images, categories, json_path, clipped, dropped), root, missing


def write_coco(det_set: DetSet, json_path: PathLike, image_root: PathLike | None = None) -> Path:
    """Write ``det_set`` as a COCO JSON (atomically) with ``file_name`` relative to ``image_root``
    (default: the JSON's folder, so :func:`read_coco` finds the images again); returns the path."""
    json_path = Path(json_path)
    root = Path(image_root) if image_root is not None else json_path.parent
    images, annotations = [], []
    for image in det_set.images:
        images.append({"id": image.id, "file_name": Path(os.path.relpath(image.path, root)).as_posix(),
                       "width": image.width, "height": image.height})
        for box, label in zip(image.boxes.astype(np.float64), image.labels, strict=True):
            x, y, w, h = float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({"id": len(annotations) + 1, "image_id": image.id, "category_id": int(label),
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    categories = [{"id": k, "name": name} for k, name in sorted(det_set.categories.items())]
    text = json.dumps({"images": images, "annotations": annotations, "categories": categories})
    return write_text_atomic(json_path, text + "\n")


def dsb2018_coco(root: PathLike) -> DetSet:
    """The DSB2018 samples below ``root`` as a detection set: one box per nucleus mask (as
    :func:`~twinview.data.dsb2018.load_nuclei` gives it), category 1 ``nucleus``, image ids 1..N in
    sample order; samples without masks are kept as background images."""
    images = []
    for image_id, record in enumerate(read_dsb2018(root), start=1):
        sample = load_nuclei(record)
        height, width = sample.image.shape[:2]
        images.append(DetImage(image_id, record.image, width, height, sample.boxes,
                               np.ones(len(sample.boxes), np.int64)))
    return DetSet(images, {1: "nucleus"}, Path(root))


def coco_summary(det_set: DetSet) -> dict[str, Any]:
    """Counts for a report: images, boxes, boxes per image and box size (``sqrt(area)`` in pixels) as
    ``{"min", "median", "max"}`` (null without boxes), boxes per category, and the reading counts."""
    per_image = [len(image.boxes) for image in det_set.images]
    boxes = np.concatenate([image.boxes for image in det_set.images]) if det_set.images else np.zeros((0, 4))
    labels = np.concatenate([image.labels for image in det_set.images]) if det_set.images else np.zeros(0)
    sides = np.sqrt((boxes[:, 2] - boxes[:, 0]).astype(np.float64) * (boxes[:, 3] - boxes[:, 1]))
    return {
        "images": len(det_set.images),
        "boxes": int(sum(per_image)),
        "boxes_per_image": _stats(np.array(per_image)),
        "categories": {str(k): {"name": name, "boxes": int((labels == k).sum())}
                       for k, name in sorted(det_set.categories.items())},
        "box_size": _stats(sides),
        "clipped": det_set.clipped,
        "dropped": det_set.dropped,
        "images_without_boxes": per_image.count(0),
    }


def _stats(values: np.ndarray) -> dict[str, float] | None:
    """Minimum, median and maximum, rounded to 1/100 (integers stay integers); None without values."""
    if not values.size:
        return None
    return {"min": round(values.min().item(), 2), "median": round(float(np.median(values)), 2),
            "max": round(values.max().item(), 2)}


def _load_json(json_path: Path) -> dict[str, Any]:
    if not json_path.is_file():
        raise missing_path(json_path, "no such file" if not json_path.exists() else "not a file")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(json_path, "not UTF-8 text") from None
    except json.JSONDecodeError as err:
        reason = f"invalid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
        raise DataError(json_path, reason) from None
    if not isinstance(data, dict):
        raise DataError(json_path, "not a COCO file: expected a JSON object")
    absent = [key for key in COCO_KEYS if key not in data]
    if absent:
        raise DataError(json_path, f"not a COCO file: missing key(s) {', '.join(map(repr, absent))}")
    return data


def _list(data: dict[str, Any], key: str, json_path: Path) -> list[Any]:
    if not isinstance(data[key], list):
        raise DataError(json_path, f"{key!r} must be a list")
    return data[key]


def _field(entry: Any, key: str, where: str, json_path: Path) -> Any:
    if not isinstance(entry, dict):
        raise DataError(json_path, f"{where}: expected an object")
    if key not in entry:
        raise DataError(json_path, f"{where}: missing key {key!r}")
    return entry[key]


def _integer(entry: Any, key: str, where: str, json_path: Path, minimum: int | None = None) -> int:
    value = _field(entry, key, where, json_path)
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        wanted = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise DataError(json_path, f"{where}: {key!r} must be {wanted}, got {value!r}")
    return value


def _categories(entries: Any, json_path: Path) -> dict[int, str]:
    if not isinstance(entries, list):
        raise DataError(json_path, "'categories' must be a list")
    categories = {}
    for i, entry in enumerate(entries):
        where = f"categories[{i}]"
        category = _integer(entry, "id", where, json_path)
        if category in categories:
            raise DataError(json_path, f"{where}: category id {category} appears twice")
        categories[category] = str(_field(entry, "name", where, json_path))
    return categories


def _image_entry(entry: Any, i: int, json_path: Path) -> tuple[int, str, int, int]:
    where = f"images[{i}]"
    file_name = _field(entry, "file_name", where, json_path)
    if not isinstance(file_name, str) or not file_name:
        raise DataError(json_path, f"{where}: 'file_name' must be a non-empty string")
    return (_integer(entry, "id", where, json_path), file_name,
            _integer(entry, "width", where, json_path, 1), _integer(entry, "height", where, json_path, 1))


def _annotation(entry: Any, i: int, json_path: Path) -> tuple[int, int, list[float], bool]:
    """Image id, category id, ``xyxy`` box and crowd flag of one annotation."""
    where = f"annotations[{i}]"
    bbox = _field(entry, "bbox", where, json_path)
    numbers = isinstance(bbox, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    if not numbers or len(bbox) != 4:
        raise DataError(json_path, f"{where}: 'bbox' must be four finite numbers [x, y, width, height], "
                                   f"got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    crowd = entry.get("iscrowd", 0) in (1, True)
    return (_integer(entry, "image_id", where, json_path), _integer(entry, "category_id", where, json_path),
            [x, y, x + w, y + h], crowd)


def _default_root(json_path: Path, file_names: list[str]) -> Path:
    """The JSON's folder, or its ``images/`` folder when more of the files are found there."""
    candidates = [json_path.parent, json_path.parent / "images"]
    found = [sum((root / name).is_file() for name in file_names) for root in candidates]
    return candidates[int(found[1] > found[0])]
