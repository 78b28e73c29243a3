"""Self-supervised losses as pure functions of embeddings.

Every loss normalises its inputs itself, so callers pass raw projector/predictor outputs. Losses run
with autocast off and fp16/bf16 inputs cast to float32: logits of up to 1/T = 10 have a resolution
of 0.06 in bf16, and ``2 - 2 cos`` near convergence of 0.008. No large finite constants are used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec

import torch
import torch.nn.functional as F
from torch import Tensor

_P = ParamSpec("_P")


def _in_float32(loss: Callable[_P, Tensor]) -> Callable[_P, Tensor]:
    """Call ``loss`` with autocast disabled and its fp16/bf16 tensor arguments cast to float32."""

    def up(x: object) -> object:
        return x.float() if isinstance(x, Tensor) and x.dtype in (torch.float16, torch.bfloat16) else x

    @functools.wraps(loss)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Tensor:
        device = next(a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)).device.type
        with torch.autocast(device, enabled=False):
            return loss(*map(up, args), **{k: up(v) for k, v in kwargs.items()})

    return wrapper


@_in_float32
def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: float = 0.1,
    *,
    z1_all: Tensor | None = None,
    z2_all: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

    Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations".
    With ``z = normalize(cat(z1, z2))`` (2N rows) and ``s_ij = z_i . z_j / T``::

        l_i = -log( exp(s_{i,p(i)}) / sum_{j != i} exp(s_ij) ),    loss = mean_i l_i

    where ``p(i)`` is the other view of sample ``i``. The self-similarity ``j == i`` is removed
    with a boolean mask (``-inf`` logit), not a large negative constant.

    Distributed use: each rank passes its local ``z1``, ``z2`` (n rows each) as anchors and
    the embeddings gathered from all ranks, in rank order, as ``z1_all``, ``z2_all`` (N = W*n rows
    each; gather them with gradients, see ``engine.distributed.gather_with_grad``), with
    ``offset = rank * n``, the position of the local rows in the gathered set. The local anchors
    are then contrasted with all 2N candidates. The mean over ranks of the local losses equals
    the single-process loss on the concatenated batch.

    Args:
        z1, z2: (n, D) embeddings of the two views; row i of each comes from the same sample.
        temperature: T.
        z1_all, z2_all: (N, D) candidate sets containing ``z1``/``z2`` at rows ``offset:offset+n``;
            default: ``z1``, ``z2`` themselves (single process).
        offset: row of ``z1[0]`` in ``z1_all``.
    """
    if (z1_all is None) != (z2_all is None):
        raise ValueError("pass both z1_all and z2_all, or neither")
    if z1_all is None:
        z1_all, z2_all = z1, z2
    n, big_n = z1.shape[0], z1_all.shape[0]
    anchors = F.normalize(torch.cat([z1, z2]), dim=1)
    candidates = F.normalize(torch.cat([z1_all, z2_all]), dim=1)
    logits = anchors @ candidates.T / temperature  # (2n, 2N)

    local = torch.arange(n, device=z1.device) + offset
    self_idx = torch.cat([local, local + big_n])
    pos_idx = torch.cat([local + big_n, local])
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(2 * n, device=z1.device), self_idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, pos_idx)


@_in_float32
def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """InfoNCE of MoCo with a queue of negatives.

    He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning";
    Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning" (MoCo v2).
    With ``q, k`` normalised, ``l_pos = q . k`` and ``l_neg = q . queue_j``::

        loss = mean_i -log( exp(l_pos_i / T) / (exp(l_pos_i / T) + sum_j exp(l_neg_ij / T)) )

    i.e. cross-entropy over ``[l_pos, l_neg] / T`` with label 0.

    Args:
        q: (B, D) queries (gradients flow).
        k: (B, D) positive keys; detached.
        queue: (K, D) negative keys, already normalised; detached.
        temperature: T.
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.detach().T
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


@_in_float32
def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL regression loss ``mean_i (2 - 2 cos(p_i, z_i))``, ``z`` detached.

    Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning";
    equals the squared distance of the normalised vectors.
    """
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


@_in_float32
def simsiam_loss(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam negative cosine similarity ``-mean_i cos(p_i, stopgrad(z_i))``.

    Chen & He 2021, "Exploring Simple Siamese Representation Learning".
    """
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


@_in_float32
def global_contrastive(
    anchors: Tensor, candidates: Tensor, positive: Tensor, negative: Tensor, temperature: float = 0.1
) -> Tensor:
    """Contrastive loss whose positives and negatives are given as masks: the global loss G^D of
    Chaitanya et al. 2020, "Contrastive learning of global and local features for medical image
    segmentation with limited annotations" (NeurIPS).

    With ``s_ij = cos(a_i, c_j) / T``, ``P(i)`` the positives and ``N(i)`` the negatives of anchor ``i``::

        l_ip = -log( exp(s_ip) / (exp(s_ip) + sum_{n in N(i)} exp(s_in)) ),   loss = mean over all (i, p)

    Other positives of ``i`` are not in the denominator: slices of the same partition of other volumes
    are not pushed apart while one of them is pulled in. Candidates in neither mask (the anchor itself)
    take no part. An anchor without negatives contributes 0 per positive.

    Args:
        anchors: (a, D) embeddings; candidates: (c, D) embeddings (may contain the anchors).
        positive, negative: (a, c) boolean masks, disjoint; at least one positive in all.
        temperature: T.
    """
    if positive.shape != (anchors.shape[0], candidates.shape[0]) or negative.shape != positive.shape:
        raise ValueError(f"masks must be ({anchors.shape[0]}, {candidates.shape[0]}), got "
                         f"{tuple(positive.shape)} and {tuple(negative.shape)}")
    if (positive & negative).any():
        raise ValueError("a pair cannot be both positive and negative")
    if not positive.any():
        raise ValueError("no positive pair")
    logits = F.normalize(anchors, dim=1) @ F.normalize(candidates, dim=1).T / temperature
    negatives = torch.logsumexp(logits.masked_fill(~negative, float("-inf")), dim=1, keepdim=True)
    pair_loss = torch.logaddexp(logits, negatives) - logits  # -log(e^s / (e^s + sum_n e^s_n))
    return pair_loss[positive].mean()


@_in_float32
def local_contrastive(r1: Tensor, r2: Tensor, temperature: float = 0.1) -> Tensor:
    """Local contrastive loss L^R of Chaitanya et al. 2020 (same paper as :func:`global_contrastive`)
    between the region embeddings of two spatially aligned views of each image.

    For image ``b`` with regions ``1..R`` (``z = normalize(cat(r1_b, r2_b))``, 2R rows), region ``k`` of
    one view is the positive of region ``k`` of the other and the other regions of *the same image* (both
    views) are negatives: NT-Xent within each image, averaged over the 2R anchors of all B images::

        l_bi = -log( exp(s_{i,p(i)}) / sum_{j != i} exp(s_ij) ),   s = z z^T / T

    Args:
        r1, r2: (B, R, D) embeddings of R regions at the same places of the two views.
        temperature: T.
    """
    if r1.shape != r2.shape or r1.ndim != 3:
        raise ValueError(f"need two (B, R, D) tensors of one shape, got {tuple(r1.shape)} and "
                         f"{tuple(r2.shape)}")
    b, r, _ = r1.shape
    z = F.normalize(torch.cat([r1, r2], dim=1), dim=2)
    logits = z @ z.transpose(1, 2) / temperature  # (B, 2R, 2R)
    eye = torch.eye(2 * r, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    target = torch.cat([torch.arange(r, 2 * r), torch.arange(r)]).to(z.device).repeat(b)
    return F.cross_entropy(logits.reshape(b * 2 * r, 2 * r), target)
