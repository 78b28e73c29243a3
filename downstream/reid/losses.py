"""Re-ID training losses: batch-hard triplet loss, the label-smoothed identity loss, and ClusterNCE for
training without labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def batch_hard_triplet_loss(features: Tensor, pids: Tensor, margin: float | None = 0.3) -> Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017, "In Defense of the Triplet Loss for Person
    Re-Identification").

    With Euclidean distances ``d`` between the rows of ``features`` (B, D), each anchor ``a`` takes its
    hardest positive and hardest negative in the batch::

        d_ap = max_{p != a, y_p = y_a} d(a, p),    d_an = min_{n: y_n != y_a} d(a, n)
        loss = mean_a max(0, margin + d_ap - d_an)       (margin given)
        loss = mean_a log(1 + exp(d_ap - d_an))          (margin None: soft margin)

    Anchors without a positive or without a negative in the batch are left out of the mean; if no
    anchor has both, ``ValueError``.
    """
    if features.ndim != 2 or pids.shape != (len(features),):
        raise ValueError(f"batch_hard_triplet_loss: need (B, D) features and (B,) pids, "
                         f"got {tuple(features.shape)} and {tuple(pids.shape)}")
    dist = torch.cdist(features, features)
    same = pids[:, None] == pids[None, :]
    positive = same & ~torch.eye(len(pids), dtype=torch.bool, device=same.device)
    negative = ~same
    valid = positive.any(1) & negative.any(1)
    if not valid.any():
        raise ValueError("batch_hard_triplet_loss: no anchor has both a positive and a negative in the batch")
    d_ap = dist.masked_fill(~positive, float("-inf")).amax(1)[valid]
    d_an = dist.masked_fill(~negative, float("inf")).amin(1)[valid]
    if margin is None:
        return F.softplus(d_ap - d_an).mean()
    return F.relu(d_ap - d_an + margin).mean()


def id_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """Identity (classification) loss with label smoothing (Szegedy et al. 2016, "Rethinking the
    Inception Architecture"): cross-entropy against ``q = (1 - eps) onehot(y) + eps / K`` over ``K``
    classes, ``loss = -mean_i sum_k q_k log softmax(logits_i)_k``."""
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def cluster_nce_loss(features: Tensor, memory: Tensor, targets: Tensor, temperature: float = 0.05) -> Tensor:
    """ClusterNCE (Dai et al. 2021, "Cluster Contrast for Unsupervised Person Re-Identification"): InfoNCE
    of each feature against one memory vector per cluster,

        loss = -mean_i log( exp(q_i . c_{y_i} / tau) / sum_k exp(q_i . c_k / tau) ),

    with ``q_i`` the L2-normalised ``features`` (B, D), ``c_k`` the rows of ``memory`` (C, D; normalised
    by the caller) and ``y_i`` in ``[0, C)`` the pseudo-identity of each row of the batch."""
    if features.ndim != 2 or memory.ndim != 2 or features.shape[1] != memory.shape[1] \
            or targets.shape != (len(features),):
        raise ValueError(f"cluster_nce_loss: need (B, D) features, (C, D) memory and (B,) targets, got "
                         f"{tuple(features.shape)}, {tuple(memory.shape)}, {tuple(targets.shape)}")
    return F.cross_entropy(F.normalize(features, dim=1) @ memory.t() / temperature, targets)
