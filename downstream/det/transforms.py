"""Detection augmentations: albumentations moves the boxes with the image, so they stay on their objects.

Boxes are ``xyxy`` pixel edges (albumentations' ``pascal_voc``) with their category ids alongside. A crop
cuts boxes at its edges and drops those with less than :data:`MIN_VISIBILITY` of their area left, with
their labels. Seed a transform with ``transform.set_random_seed(seed)`` for reproducible draws.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

MIN_VISIBILITY = 0.3  # fraction of a box's area a crop must keep for the box to stay


def bbox_params() -> A.BboxParams:
    """Boxes as ``xyxy`` pixels labelled by ``labels``; clipped to the image, dropped when mostly cut away."""
    return A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=MIN_VISIBILITY,
                        clip=True)


def train_transform(size: int | None = None, rotate90: bool = True) -> A.Compose:
    """Flips, right-angle rotations (microscopy has no up), an optional random ``size`` x ``size`` crop
    (zero-padded when the image is smaller) and light brightness/contrast changes."""
    stages: list[A.BasicTransform] = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if rotate90:
        stages.append(A.RandomRotate90(p=1.0))
    if size is not None:
        stages.append(A.RandomCrop(height=size, width=size, pad_if_needed=True, pad_position="random",
                                   border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0))
    stages.append(A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5))
    return A.Compose(stages, bbox_params=bbox_params())


def apply(transform: A.Compose, image: np.ndarray, boxes: np.ndarray,
          labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``transform`` on one image with its boxes; returns the image, the surviving boxes as ``(N, 4)``
    float32 ``xyxy`` (``(0, 4)`` when none) and their labels as ``(N,)`` int64."""
    out = transform(image=image, bboxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                    labels=np.asarray(labels, np.int64).reshape(-1))
    return (out["image"], np.asarray(out["bboxes"], np.float32).reshape(-1, 4),
            np.asarray(out["labels"], np.int64).reshape(-1))
