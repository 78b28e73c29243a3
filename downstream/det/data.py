"""Detection data: a COCO file or DSB2018 folder as a ``DetSet``, a fixed split by image, and a Dataset.

Categories are renumbered 1..K in the order of their COCO ids (0 is the background) and mapped back
when results are written. The split reuses segmentation's :func:`~downstream.seg.data.make_split`: fixed
test and val images (``split_seed``) and a ``label_fraction`` subset of the rest, nested across
fractions. Training items are augmented by :mod:`downstream.det.transforms`, seeded per item from
``(seed, epoch, index)`` so that a resumed run sees the same crops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from downstream.det.config import DetDataConfig
from downstream.det.transforms import apply, train_transform
from engine.sampling import sample_seed
from twinview.data.coco import DetImage, DetSet
from twinview.errors import DataError

Target = dict[str, torch.Tensor]


def read_det_set(cfg: DetDataConfig) -> DetSet:
    """The images and boxes a data config names; ``DataError`` naming the path when there are none."""
    from twinview.data.coco import dsb2018_coco, read_coco

    det_set = read_coco(cfg.path, cfg.image_root or None) if cfg.kind == "coco" else dsb2018_coco(cfg.path)
    if not det_set.images:
        raise DataError(cfg.path, "no images to detect in")
    if not det_set.categories:
        raise DataError(cfg.path, "no categories: a detector needs at least one")
    return det_set


def category_ids(det_set: DetSet) -> list[int]:
    """The COCO category ids in label order: label ``k`` (1..K) is ``category_ids[k - 1]``."""
    return sorted(det_set.categories)


def split_ids(det_set: DetSet, cfg: DetDataConfig, seed: int) -> dict[str, Any]:
    """Test, val and training images by id (as strings, the keys of ``split.json``)."""
    from downstream.seg.config import SegDataConfig
    from downstream.seg.data import make_split

    fields = SegDataConfig(path=cfg.path, test_cases=cfg.test_cases, val_cases=cfg.val_cases,
                           split_seed=cfg.split_seed, label_fraction=cfg.label_fraction,
                           split_file=cfg.split_file)
    return make_split([str(image.id) for image in det_set.images], fields, seed)


def select(det_set: DetSet, ids: list[str]) -> list[DetImage]:
    """The images of ``det_set`` with these ids (as ``split.json`` lists them), in that order."""
    by_id = {str(image.id): image for image in det_set.images}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise DataError(det_set.source, f"image ids {unknown[:5]} of the split are not in this data")
    return [by_id[i] for i in ids]


def load_det_image(path: Path, in_channels: int, max_value: float) -> np.ndarray:
    """An image as ``H x W x in_channels`` float32 in [0, 1]: grey repeated to RGB, RGB averaged to grey."""
    from twinview.data.images import load_image

    image = load_image(path).astype(np.float32)
    if image.shape[2] != in_channels:
        image = np.repeat(image, 3, axis=2) if in_channels == 3 else image.mean(axis=2, keepdims=True)
    return np.clip(image / max_value, 0.0, 1.0)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``H x W x C`` -> ``C x H x W`` float32."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))


class DetDataset(Dataset):
    """``(image C x H x W in [0, 1], {"boxes" xyxy, "labels" 1..K, "image_id"})`` per item.

    With ``augment``, item ``i`` of epoch ``e`` is image ``i % n`` cropped and flipped with the seed
    ``(seed, e, i)``; ``length`` may exceed the number of images (few labelled images, large batches).
    """

    def __init__(self, images: list[DetImage], ids: list[int], cfg: DetDataConfig, augment: bool = False,
                 seed: int = 0, length: int | None = None) -> None:
        self.images, self.cfg, self.seed = images, cfg, seed
        self.label_of = {cat: k for k, cat in enumerate(ids, start=1)}
        self.transform = train_transform(cfg.size, cfg.rotate90) if augment else None
        self.length = length if length is not None else len(images)
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        item = self.images[index % len(self.images)]
        image = load_det_image(item.path, self.cfg.in_channels, self.cfg.max_value)
        if image.shape[:2] != (item.height, item.width):
            raise DataError(item.path, f"image is {image.shape[1]}x{image.shape[0]} (width x height); the "
                                       f"annotations say {item.width}x{item.height}")
        labels = np.array([self.label_of[int(c)] for c in item.labels], np.int64)
        boxes = item.boxes
        if self.transform is not None:
            self.transform.set_random_seed(sample_seed(self.seed, self.epoch, index) % 2**32)
            image, boxes, labels = apply(self.transform, image, boxes, labels)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # torchvision refuses empty boxes
        target = {"boxes": torch.from_numpy(boxes[keep].reshape(-1, 4).astype(np.float32)),
                  "labels": torch.from_numpy(labels[keep]), "image_id": torch.tensor(item.id)}
        return to_tensor(image), target


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[tuple[torch.Tensor, ...], tuple[Target, ...]]:
    """Images of different sizes stay separate: the detector batches (and pads) them itself."""
    return tuple(zip(*batch, strict=True))  # type: ignore[return-value]
