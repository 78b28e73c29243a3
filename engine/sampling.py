"""Seeds and samplers that make a run's data order independent of workers and exact on resume."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One 63-bit seed per (run seed, epoch, item), independent of workers and ranks."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint64)[0] >> 1)


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch, split across ranks, that can start part-way into an epoch.

    Like ``DistributedSampler(drop_last=True)``: each rank gets ``len(dataset) // world`` indices.
    ``start`` skips the first indices of this rank's share (for resuming mid-epoch).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        per_rank = self.n // self.world
        return perm[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.n // self.world - self.start
