"""Person crops for re-ID training and evaluation.

Every crop is resized to ``data.size`` whatever its own size (the Market-1501 crops are 128x64, other
sets differ), RGB; grey crops are repeated to three channels. Training items are seeded per
``(seed, epoch, index)`` like the pretraining views, so a resumed run sees the same augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset

from engine.sampling import sample_seed
from pretrain.views import ViewPipeline, build_views, eval_transform
from twinview.data.records import PersonRecord

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_pipeline(augment: str, size: Sequence[int]) -> ViewPipeline:
    """One augmented view per crop: ``baseline`` (Luo et al. 2019: flip, 10-pixel pad and random crop,
    random erasing) or one view of the contrastive ``reid`` preset."""
    if augment == "reid":
        return build_views("reid", tuple(size)).pipeline
    h, w = size
    pad = max(1, round(10 * h / 256))  # 10 pixels at 256x128
    stages = A.Compose([
        A.Resize(height=h, width=w),
        A.HorizontalFlip(p=0.5),
        A.PadIfNeeded(min_height=h + 2 * pad, min_width=w + 2 * pad, border_mode=cv2.BORDER_CONSTANT, fill=0),
        A.RandomCrop(height=h, width=w),
        A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        A.Erasing(scale=(0.02, 0.4), ratio=(0.3, 3.3), fill=0.0, p=0.5),  # 0 = the mean after Normalize
        ToTensorV2(),
    ])
    return ViewPipeline("reid", 2, 3, [stages])


def eval_pipeline(size: Sequence[int]) -> ViewPipeline:
    """Resize and normalise (``pretrain.views.preset_metadata("reid", size)`` describes it)."""
    return eval_transform("reid", tuple(size))


class PersonDataset(Dataset):
    """``(image, label)`` pairs: label = ``labels[pid]`` (training) or the pid itself."""

    def __init__(self, records: Sequence[PersonRecord], pipeline: ViewPipeline,
                 labels: dict[int, int] | None = None, seed: int | None = None) -> None:
        self.records, self.pipeline, self.labels, self.seed = list(records), pipeline, labels, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from twinview.data.images import load_image

        record = self.records[index]
        if self.seed is not None:
            self.pipeline.reseed(sample_seed(self.seed, self.epoch, index))
        image = self.pipeline(load_image(record.path))
        label = self.labels[record.pid] if self.labels is not None else record.pid
        return image, label


def load_batch(paths: Sequence[Path], pipeline: ViewPipeline) -> torch.Tensor:
    from twinview.data.images import load_image

    return torch.stack([pipeline(load_image(p)) for p in paths])


def camera_counts(records: Sequence[PersonRecord]) -> dict[int, int]:
    """Number of cameras that saw each identity."""
    cams: dict[int, set[int]] = {}
    for r in records:
        cams.setdefault(r.pid, set()).add(r.camid)
    return {pid: len(c) for pid, c in cams.items()}


def as_arrays(records: Sequence[PersonRecord]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([r.pid for r in records]), np.array([r.camid for r in records])
