"""P x K identity sampling for metric learning (Hermans et al. 2017): every batch holds P identities
with K images each, so each anchor has positives and negatives for the batch-hard triplet loss."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class PKSampler(Sampler[int]):
    """A flat index sampler: use it as ``DataLoader(ds, sampler=s, batch_size=p * k, drop_last=True)``;
    every consecutive ``p * k`` indices form one batch (identity by identity, K indices each).

    Epoch plan: identity ``i`` with ``n_i`` images contributes ``g_i = max(1, n_i // k)`` groups of K
    images, capped so that no identity needs two slots of the same batch (``g_i <= T // p`` with
    ``T = sum g_i``). Each epoch, from a generator seeded by ``(seed, epoch)``, every identity's images
    are shuffled and cut into its groups (an identity with fewer than K images is drawn with
    replacement); the identities are shuffled and their groups laid end to end, batch ``b`` takes the
    groups at positions ``b, b + B, ..., b + (p - 1) B`` (``B = T // p`` batches, the last ``T mod p``
    groups are left out), and the batch order is shuffled. So an epoch covers about every image once
    (like torchreid's ``RandomIdentitySampler``) and has a fixed number of batches.

    Under ``torchrun`` (``world`` processes) process ``rank`` takes every ``world``-th batch of the plan.
    ``set_epoch(epoch, start_batch)`` selects the epoch and skips its first ``start_batch`` batches (to
    resume mid-epoch); ``len()`` counts the indices still to come.
    """

    def __init__(self, pids: Sequence[int], p: int, k: int, seed: int = 0, rank: int = 0, world: int = 1):
        if p < 1 or k < 1:
            raise ValueError(f"PKSampler: need p >= 1 and k >= 1, got p={p}, k={k}")
        ids, codes = np.unique(np.asarray(pids), return_inverse=True)
        if len(ids) < p:
            raise ValueError(f"PKSampler: {len(ids)} identities, fewer than p={p} per batch")
        self.p, self.k, self.seed = p, k, seed
        order = np.argsort(codes, kind="stable")
        self._members = np.split(order, np.cumsum(np.bincount(codes))[:-1])  # indices of each identity
        groups = np.maximum(np.bincount(codes) // k, 1)
        while groups.max() > groups.sum() // p:  # an identity would need two slots of one batch
            groups = np.minimum(groups, groups.sum() // p)
        self._groups = groups
        self.rank, self.world = rank, world
        self._all_batches = int(groups.sum()) // p
        self.batches_per_epoch: int = self._all_batches // world  # this process's share
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's plan and skip its first ``start_batch`` batches."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"PKSampler: start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.epoch, self.start_batch = epoch, start_batch

    def batches(self) -> np.ndarray:
        """This process's plan of the epoch, (batches_per_epoch, p * k) dataset indices."""
        rng = np.random.default_rng([self.seed, self.epoch])
        groups = []
        for i in rng.permutation(len(self._members)):
            members, g = self._members[i], self._groups[i]
            if len(members) < self.k:
                groups.append(rng.choice(members, self.k, replace=True)[None])
            else:
                groups.append(rng.permutation(members)[:g * self.k].reshape(g, self.k))
        n = self._all_batches
        lanes = np.concatenate(groups)[:n * self.p].reshape(self.p, n, self.k)  # lane j: positions jB..
        plan = lanes.transpose(1, 0, 2).reshape(n, self.p * self.k)[rng.permutation(n)]
        return plan[self.rank::self.world][:self.batches_per_epoch]

    def __iter__(self) -> Iterator[int]:
        return iter(self.batches()[self.start_batch:].ravel().tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.p * self.k
