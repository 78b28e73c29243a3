"""``twinview det predict``: detect in new images; COCO results JSON plus PNGs with the boxes drawn.

``IMAGES`` is an image file, a folder of images, or a COCO JSON file: then its image ids are used and
its true boxes drawn too (white; predictions in colour). Image ids of plain images are 1..N in path
order, listed in ``images.json`` (a COCO file without annotations), so that ``results.json`` (COCO
results: ``image_id``, ``category_id``, ``bbox`` as ``[x, y, w, h]``, ``score``) loads in any COCO tool.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from downstream.det.data import load_det_image, to_tensor
from downstream.det.evaluate import detect, load_det_model, model_file, results_of
from twinview.data.coco import DetImage
from twinview.errors import DataError

RESULTS_FILE, IMAGES_FILE, DRAWN = "results.json", "images.json", "boxes"
COLOURS = [(230, 60, 60), (60, 140, 255), (250, 200, 40), (80, 220, 120), (200, 90, 220)]


def input_images(path: Path) -> tuple[list[DetImage], dict[int, str] | None]:
    """The images to detect in and, for a COCO file, its categories (their true boxes are in the images)."""
    from twinview.data.coco import is_coco_json, read_coco
    from twinview.data.images import image_record, is_image, list_image_files
    from twinview.errors import missing_path

    if is_coco_json(path):
        det_set = read_coco(path)
        return det_set.images, det_set.categories
    if path.is_file():
        if not is_image(path):
            raise DataError(path, "not an image (PNG, JPEG, TIFF) or a COCO JSON file")
        files = [path]
    elif path.is_dir():
        files = list_image_files(path)
        if not files:
            raise DataError(path, "no images found")
    else:
        raise missing_path(path)
    images = []
    for i, f in enumerate(files, start=1):
        record = image_record(f)
        images.append(DetImage(i, f, record.width, record.height, np.zeros((0, 4), np.float32),
                               np.zeros(0, np.int64)))
    return images, None


def predict(run: Path, inputs: Path, out: Path, device: str = "auto", draw_score: float = 0.5
            ) -> dict[str, Any]:
    """Write ``results.json``, ``images.json`` and ``boxes/<image>.png`` (detections scoring at least
    ``draw_score``, and true boxes for a COCO input) into ``out``; returns a summary.

    ``out`` must not be, contain or lie inside an input or be an existing file (``OutputError``)."""
    from engine.device import select_device
    from twinview.errors import check_output

    inputs, out = Path(inputs), Path(os.path.abspath(out))
    check_output(out, [inputs, model_file(run)], kind="prediction folder")
    images, categories = input_images(inputs)
    dev = select_device(device)
    model, meta = load_det_model(run, dev)
    names = {int(k): v for k, v in meta["labels"].items()}
    (out / DRAWN).mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    stems = _unique_stems(images)
    for image, stem in zip(images, stems, strict=True):
        pixels = load_det_image(image.path, meta["in_channels"], meta["max_value"])
        found = detect(model, to_tensor(pixels), dev)
        results += results_of(image.id, found, meta["category_ids"])
        truth = image.boxes if categories is not None else None
        draw_boxes(pixels, found, names, out / DRAWN / f"{stem}.png", draw_score, truth)
    coco_images = [{"id": i.id, "file_name": str(i.path), "width": i.width, "height": i.height}
                   for i in images]
    coco_categories = [{"id": c, "name": names[k]} for k, c in enumerate(meta["category_ids"], start=1)]
    (out / IMAGES_FILE).write_text(json.dumps({"images": coco_images, "annotations": [],
                                               "categories": coco_categories}) + "\n")
    (out / RESULTS_FILE).write_text(json.dumps(results) + "\n")
    return {"images": len(images), "detections": len(results), "results": str(out / RESULTS_FILE),
            "drawn": str(out / DRAWN)}


def _unique_stems(images: list[DetImage]) -> list[str]:
    """PNG names: the image's stem, with its id where two images share one."""
    stems = [i.path.stem for i in images]
    return [s if stems.count(s) == 1 else f"{s}_{i.id}" for s, i in zip(stems, images, strict=True)]


def draw_boxes(image: np.ndarray, found: dict[str, np.ndarray], names: dict[int, str], out: Path,
               min_score: float, truth: np.ndarray | None = None) -> Path:
    """A PNG of ``image`` (H x W x C in [0, 1]) with true boxes in white and detections in colour."""
    from PIL import Image, ImageDraw

    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    canvas = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    pen = ImageDraw.Draw(canvas)
    if truth is not None:
        for box in truth:
            pen.rectangle([float(v) for v in box], outline=(255, 255, 255), width=1)
    for box, score, label in zip(found["boxes"], found["scores"], found["labels"], strict=True):
        if score < min_score:
            continue
        colour = COLOURS[(int(label) - 1) % len(COLOURS)]
        x0, y0 = float(box[0]), float(box[1])
        pen.rectangle([float(v) for v in box], outline=colour, width=1)
        if len(names) > 2:  # more than one category: say which
            pen.text((x0 + 1, y0 + 1), f"{names.get(int(label), label)} {score:.2f}", fill=colour)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
