"""Detection augmentations keep every box on its object: each output box is the bounding box of its
object's mask transformed alongside, labels follow their boxes and boxes cropped away leave with theirs."""

from __future__ import annotations

from collections.abc import Callable

import albumentations as A
import cv2
import numpy as np
import pytest

from downstream.det.transforms import MIN_VISIBILITY, apply, bbox_params, train_transform

HEIGHT, WIDTH = 48, 64


def rectangles(rng: np.random.Generator, n: int = 12) -> list[np.ndarray]:
    masks = []
    for _ in range(n):
        top, left = rng.integers(0, HEIGHT - 4), rng.integers(0, WIDTH - 4)
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        mask[top:top + rng.integers(2, 20), left:left + rng.integers(2, 20)] = 1
        masks.append(mask)
    return masks


def ellipses(rng: np.random.Generator, n: int = 12) -> list[np.ndarray]:
    masks = []
    for _ in range(n):
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        centre = (int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT)))
        axes = (int(rng.integers(2, 12)), int(rng.integers(2, 12)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        masks.append(mask)
    return masks


def mask_box(mask: np.ndarray) -> np.ndarray:
    """``xyxy`` pixel edges of a mask (max exclusive), as the readers give them."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([columns[0], rows[0], columns[-1] + 1, rows[-1] + 1], np.float32)


def run(transform: A.Compose, masks: list[np.ndarray], seed: int) -> tuple[dict, np.ndarray]:
    """Transform an image with its object masks and boxes, labelled by object index."""
    image = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), np.uint8)
    boxes = np.stack([mask_box(m) for m in masks])
    transform.set_random_seed(seed)
    out = transform(image=image, masks=masks, bboxes=boxes, labels=np.arange(len(masks)))
    return out, image


def check_boxes_follow_masks(out: dict, masks: list[np.ndarray]) -> list[int]:
    """Assert each kept box is inside the image and equals its transformed mask's box; the kept indices."""
    height, width = out["image"].shape[:2]
    boxes, kept = np.asarray(out["bboxes"]).reshape(-1, 4), [int(k) for k in out["labels"]]
    assert len(kept) == len(set(kept)) == len(boxes)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    for box, k in zip(boxes, kept, strict=True):
        np.testing.assert_allclose(box, mask_box(np.asarray(out["masks"][k])), atol=1e-3)
    return kept


ALWAYS = {
    "hflip": A.HorizontalFlip(p=1.0),
    "vflip": A.VerticalFlip(p=1.0),
    "rot90": A.RandomRotate90(p=1.0),
}


@pytest.mark.parametrize("name", [*ALWAYS, "train"])
@pytest.mark.parametrize("draw", [rectangles, ellipses])
def test_flips_and_rotations_move_every_box_with_its_object(
        name: str, draw: Callable[[np.random.Generator], list[np.ndarray]]) -> None:
    transform = (train_transform() if name == "train"
                 else A.Compose([ALWAYS[name]], bbox_params=bbox_params()))
    for seed in range(6):
        masks = draw(np.random.default_rng(seed))
        out, _ = run(transform, masks, seed)
        assert check_boxes_follow_masks(out, masks) == list(range(len(masks)))  # nothing lost, order kept


@pytest.mark.parametrize("size", [24, 40, 80])
@pytest.mark.parametrize("alone", [True, False])
def test_crops_cut_boxes_and_drop_those_mostly_cut_away(size: int, alone: bool) -> None:
    """Rectangles, so that a box's visible area equals its mask's; 80 pads the image instead."""
    transform = (A.Compose([A.RandomCrop(size, size, pad_if_needed=True, pad_position="random")],
                           bbox_params=bbox_params()) if alone else train_transform(size))
    dropped = 0
    for seed in range(8):
        masks = rectangles(np.random.default_rng(seed))
        out, _ = run(transform, masks, seed)
        assert out["image"].shape[:2] == (size, size)
        kept = check_boxes_follow_masks(out, masks)
        for k, mask in enumerate(masks):
            visible = np.asarray(out["masks"][k]).sum() / mask.sum()
            if abs(visible - MIN_VISIBILITY) > 1e-6:  # exactly at the threshold, rounding decides
                assert (k in kept) == (visible > MIN_VISIBILITY), (seed, k, visible)
        dropped += len(masks) - len(kept)
    assert (dropped > 0) == (size < max(HEIGHT, WIDTH))


def test_apply_returns_typed_arrays_and_labels_follow_their_boxes() -> None:
    masks = rectangles(np.random.default_rng(3))
    categories = np.random.default_rng(4).integers(1, 4, len(masks)).astype(np.int64)
    transform = train_transform(24)
    for seed in range(8):
        out, image = run(transform, masks, seed)
        transform.set_random_seed(seed)
        boxes = np.stack([mask_box(m) for m in masks])
        new_image, new_boxes, labels = apply(transform, image, boxes, categories)
        assert new_boxes.dtype == np.float32 and labels.dtype == np.int64
        assert new_boxes.shape == (len(labels), 4)
        kept = np.asarray(out["labels"], int)
        np.testing.assert_array_equal(new_image, out["image"])
        np.testing.assert_allclose(new_boxes, np.asarray(out["bboxes"]).reshape(-1, 4))
        np.testing.assert_array_equal(labels, categories[kept])


def test_apply_keeps_the_shape_of_empty_box_arrays() -> None:
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    new_image, boxes, labels = apply(train_transform(32), image, np.zeros((0, 4)), np.zeros(0))
    assert new_image.shape == (32, 32, 3) and boxes.shape == (0, 4) and labels.shape == (0,)
    assert boxes.dtype == np.float32 and labels.dtype == np.int64
