"""The pretraining methods as small modules mapping two augmented views to a scalar loss.

Each method has ``.encoder`` (the backbone to save and export), ``forward(views) -> loss`` on
``views[0]``, ``views[1]`` (batches of the same images, differently augmented; further views are
ignored; the positional methods also take each sample's position in its volume) and
``step_update(step, total_steps)``, which the trainer calls after every optimizer step (``step`` =
optimizer steps taken so far, this one included: 1 after the first). Target/momentum networks are
frozen deep copies updated by EMA of the *parameters* only: their BN running statistics evolve in their
own forward passes, as in the MoCo and BYOL reference code. Everything needed to
resume (queue, pointer, target networks) is in ``state_dict()``; BYOL's tau is a function of the step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.distributed import gather_no_grad, gather_with_grad, rank
from pretrain.heads import (
    MLPHead,
    byol_prediction,
    byol_projection,
    local_projection,
    moco_v2_projection,
    simclr_projection,
    simsiam_prediction,
    simsiam_projection,
)
from pretrain.losses import (
    byol_loss,
    global_contrastive,
    info_nce,
    local_contrastive,
    nt_xent,
    simsiam_loss,
)


def _two_views(views: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    if len(views) < 2:
        raise ValueError(f"need two augmented views, got {len(views)}")
    return views[0], views[1]


def _frozen_copy(module: nn.Module) -> nn.Module:
    copied = copy.deepcopy(module)
    copied.requires_grad_(False)
    return copied


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, decay: float) -> None:
    """``target_param = decay * target_param + (1 - decay) * online_param`` for parameters, not buffers."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o.detach(), 1.0 - decay)


def byol_tau(step: int, total_steps: int, tau_base: float) -> float:
    """BYOL's EMA schedule ``1 - (1 - tau_base) (cos(pi k / K) + 1) / 2``: tau_base at k=0, 1 at k=K."""
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * k / total_steps) + 1.0) / 2.0


class SimCLR(nn.Module):
    """SimCLR (Chen et al. 2020): NT-Xent between the projections of the two views.

    Under ``torch.distributed`` the negatives are the projections of all ranks, gathered with
    gradients; per-rank batches must have equal size (``drop_last=True``).
    """

    def __init__(self, encoder: nn.Module, projection: MLPHead, temperature: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.projection = projection
        self.temperature = temperature

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        v1, v2 = _two_views(views)
        z1 = self.projection(self.encoder(v1))
        z2 = self.projection(self.encoder(v2))
        return nt_xent(
            z1,
            z2,
            self.temperature,
            z1_all=gather_with_grad(z1),
            z2_all=gather_with_grad(z2),
            offset=rank() * z1.shape[0],
        )

    def step_update(self, step: int, total_steps: int) -> None:
        """No-op."""


class MoCoV2(nn.Module):
    """MoCo v2 (He et al. 2020; Chen et al. 2020) with the symmetrised loss.

    ``loss = (InfoNCE(q1, k2) + InfoNCE(q2, k1)) / 2`` against a queue of ``queue_size`` normalised
    keys. After both terms, in training mode, ``cat(k1, k2)`` (gathered from all ranks in rank order)
    is enqueued once. Keys come from momentum copies of the encoder and projection, updated in
    ``step_update`` with ``momentum`` (the paper's 0.999 suits long ImageNet runs; 0.99 short ones).
    Shuffle-BN is not implemented: under DDP use SyncBN or accept per-GPU BN statistics.
    """

    queue: Tensor
    queue_ptr: Tensor

    def __init__(
        self,
        encoder: nn.Module,
        projection: MLPHead,
        queue_size: int = 65536,
        momentum: float = 0.99,
        temperature: float = 0.2,
    ):
        super().__init__()
        self.encoder = encoder
        self.projection = projection
        self.momentum_encoder = _frozen_copy(encoder)
        self.momentum_projection = _frozen_copy(projection)
        self.momentum = momentum
        self.temperature = temperature
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection.out_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _keys(self, x: Tensor) -> Tensor:
        return F.normalize(self.momentum_projection(self.momentum_encoder(x)), dim=1)

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        size = self.queue.shape[0]
        if keys.shape[0] > size:
            raise ValueError(f"{keys.shape[0]} keys per step exceed the queue size {size}")
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        v1, v2 = _two_views(views)
        q1 = self.projection(self.encoder(v1))
        q2 = self.projection(self.encoder(v2))
        k1, k2 = self._keys(v1), self._keys(v2)
        negatives = self.queue.clone()  # the queue is updated in place before backward
        loss = (
            info_nce(q1, k2, negatives, self.temperature) + info_nce(q2, k1, negatives, self.temperature)
        ) / 2
        if self.training:
            self._enqueue(torch.cat([gather_no_grad(k1), gather_no_grad(k2)]))
        return loss

    def step_update(self, step: int, total_steps: int) -> None:
        """EMA of the momentum encoder and projection with the fixed ``momentum``."""
        ema_update(self.momentum_encoder, self.encoder, self.momentum)
        ema_update(self.momentum_projection, self.projection, self.momentum)


class BYOL(nn.Module):
    """BYOL (Grill et al. 2020): ``byol_loss(p1, z2') + byol_loss(p2, z1')`` (the paper's sum).

    ``p`` = online prediction, ``z'`` = target projection; the target encoder and projection are EMA
    copies with BYOL's cosine tau schedule, applied in ``step_update``.
    """

    def __init__(self, encoder: nn.Module, projection: MLPHead, prediction: MLPHead, tau_base: float = 0.99):
        super().__init__()
        self.encoder = encoder
        self.projection = projection
        self.prediction = prediction
        self.target_encoder = _frozen_copy(encoder)
        self.target_projection = _frozen_copy(projection)
        self.tau_base = tau_base
        self.current_tau = tau_base

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        v1, v2 = _two_views(views)
        p1 = self.prediction(self.projection(self.encoder(v1)))
        p2 = self.prediction(self.projection(self.encoder(v2)))
        with torch.no_grad():
            z1 = self.target_projection(self.target_encoder(v1))
            z2 = self.target_projection(self.target_encoder(v2))
        return byol_loss(p1, z2) + byol_loss(p2, z1)

    def step_update(self, step: int, total_steps: int) -> None:
        """Set ``current_tau = byol_tau(step, total_steps, tau_base)`` and EMA the target parameters."""
        self.current_tau = byol_tau(step, total_steps, self.tau_base)
        ema_update(self.target_encoder, self.encoder, self.current_tau)
        ema_update(self.target_projection, self.projection, self.current_tau)


class SimSiam(nn.Module):
    """SimSiam (Chen & He 2021): ``(D(p1, z2) + D(p2, z1)) / 2`` with D the stop-gradient negative cosine."""

    def __init__(self, encoder: nn.Module, projection: MLPHead, prediction: MLPHead):
        super().__init__()
        self.encoder = encoder
        self.projection = projection
        self.prediction = prediction

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        v1, v2 = _two_views(views)
        z1 = self.projection(self.encoder(v1))
        z2 = self.projection(self.encoder(v2))
        return (simsiam_loss(self.prediction(z1), z2) + simsiam_loss(self.prediction(z2), z1)) / 2

    def step_update(self, step: int, total_steps: int) -> None:
        """No-op."""


def same_position(anchor_pos: Tensor, candidate_pos: Tensor, partitions: int | None = None,
                  threshold: float | None = None) -> Tensor:
    """(a, c) mask of pairs at the same place of their volumes, positions being relative (0 = first
    slice, 1 = last). ``partitions``: both fall in the same of S equal partitions (Chaitanya et al. 2020);
    ``threshold``: their positions differ by less than it (Zeng et al. 2021)."""
    if (partitions is None) == (threshold is None):
        raise ValueError("give partitions or threshold")
    if partitions is not None:
        a = (anchor_pos * partitions).long().clamp(0, partitions - 1)
        c = (candidate_pos * partitions).long().clamp(0, partitions - 1)
        return a[:, None] == c[None, :]
    return (anchor_pos[:, None] - candidate_pos[None, :]).abs() < threshold


class PositionalContrast(nn.Module):
    """Global contrastive learning with positional positives, for slices of aligned volumes.

    Two views of each slice are embedded as in SimCLR; slices (of any volume) at the same place in their
    volumes are positives, the others negatives, in :func:`global_contrastive` (anatomy at one position
    looks alike across patients). ``partitions``: the GCL of Chaitanya et al. 2020 (NeurIPS: S equal
    partitions along the slice axis); ``threshold``: the positional contrastive learning of Zeng et al.
    2021 (MICCAI: positions closer than the threshold), with Chaitanya's loss. Under ``torch.distributed``
    candidates and positions are gathered from all ranks, as for SimCLR.
    """

    def __init__(self, encoder: nn.Module, projection: MLPHead, temperature: float = 0.1,
                 partitions: int | None = None, threshold: float | None = None):
        super().__init__()
        self.encoder = encoder
        self.projection = projection
        self.temperature = temperature
        self.partitions, self.threshold = partitions, threshold
        same_position(torch.zeros(1), torch.zeros(1), partitions, threshold)  # checks the choice

    def forward(self, views: Sequence[Tensor], positions: Tensor) -> Tensor:
        v1, v2 = _two_views(views)
        z1 = self.projection(self.encoder(v1))
        z2 = self.projection(self.encoder(v2))
        n = z1.shape[0]
        positions = positions.to(z1.device, torch.float32)
        candidates = torch.cat([gather_with_grad(z1), gather_with_grad(z2)])
        all_positions = gather_no_grad(positions)
        anchor_pos, candidate_pos = positions.repeat(2), all_positions.repeat(2)
        same = same_position(anchor_pos, candidate_pos, self.partitions, self.threshold)
        big_n = all_positions.shape[0]
        local = torch.arange(n, device=z1.device) + rank() * n
        itself = torch.zeros_like(same)
        itself[torch.arange(2 * n, device=z1.device), torch.cat([local, local + big_n])] = True
        return global_contrastive(torch.cat([z1, z2]), candidates, same & ~itself, ~same, self.temperature)

    def step_update(self, step: int, total_steps: int) -> None:
        """No-op."""


class LocalContrast(nn.Module):
    """Decoder pretraining by local contrast (Chaitanya et al. 2020, the random-region strategy L^R).

    The U-Net's encoder comes pretrained (global stage) and stays fixed, BatchNorm statistics included.
    Two views of each image with the same geometry and different intensities go through encoder and
    decoder; a 1x1-convolution projection follows, its map is averaged over a ``grid`` x ``grid`` of
    regions, and :func:`local_contrastive` makes each region match the same region of the other view
    and differ from the image's other regions. ``.encoder`` is the fixed encoder, ``.decoder`` the
    pretrained decoder (what ``decoder.pt`` holds); ``encoder_method`` names the method that trained the
    fixed encoder (a run's ``encoder.pt`` records it).
    """

    def __init__(self, unet: nn.Module, projection: nn.Module, grid: int = 4, temperature: float = 0.1,
                 encoder_method: str = "") -> None:
        super().__init__()
        self.encoder_method = encoder_method
        self.encoder = unet.encoder.requires_grad_(False)
        self.decoder = unet.decoder
        self.skip_connect = unet.skip_connect
        self.projection = projection
        self.grid = grid
        self.temperature = temperature
        self.encoder.eval()

    def train(self, mode: bool = True) -> LocalContrast:
        super().train(mode)
        self.encoder.eval()  # fixed: its statistics stay those of the global stage
        return self

    def regions(self, x: Tensor) -> Tensor:
        """(B, grid^d, D) region embeddings of a batch."""
        with torch.no_grad():
            features = self.encoder(x)
        out = self.projection(self.decoder(features, self.skip_connect))
        pooled = (F.adaptive_avg_pool2d if out.ndim == 4 else F.adaptive_avg_pool3d)(out, self.grid)
        return pooled.flatten(2).transpose(1, 2)

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        v1, v2 = _two_views(views)
        return local_contrastive(self.regions(v1), self.regions(v2), self.temperature)

    def step_update(self, step: int, total_steps: int) -> None:
        """No-op."""


Method = SimCLR | MoCoV2 | BYOL | SimSiam | PositionalContrast | LocalContrast
POSITIONAL = frozenset({"gcl", "pcl"})  # methods that need each slice's position in its volume


# The papers' settings; build_method's options use these names.
PAPER_DEFAULTS: dict[str, dict[str, Any]] = {
    "simclr": {"proj_hidden": 2048, "proj_out": 128, "temperature": 0.1},
    "moco": {"proj_hidden": 2048, "proj_out": 128, "temperature": 0.2, "queue_size": 65536, "momentum": 0.99},
    "byol": {"proj_hidden": 4096, "proj_out": 256, "pred_hidden": 4096, "tau_base": 0.99},
    "simsiam": {"proj_hidden": 2048, "proj_out": 2048, "pred_hidden": 512},
    "gcl": {"proj_hidden": 2048, "proj_out": 128, "temperature": 0.1, "partitions": 4},
    "pcl": {"proj_hidden": 2048, "proj_out": 128, "temperature": 0.1, "position_threshold": 0.1},
    "local": {"proj_hidden": 128, "proj_out": 128, "temperature": 0.1, "local_grid": 4},
}


def build_method(name: str, encoder: nn.Module, unet: nn.Module | None = None, encoder_method: str = "",
                 **cfg: Any) -> Method:
    """Build a method around ``encoder`` (which needs ``feat_dim``) with heads sized by ``cfg``; ``local``
    trains the decoder of ``unet`` (a FlexibleUNet whose encoder holds the weights that ``encoder_method``
    pretrained).

    Options are those of ``PAPER_DEFAULTS`` (proj_hidden, proj_out, pred_hidden, temperature,
    queue_size, momentum, tau_base, partitions, position_threshold, local_grid). A method ignores the
    options it does not use, so one config section can hold them all; a missing or ``None`` option takes
    the paper's value for that method, and an unknown option raises ``TypeError``.
    """
    if name not in PAPER_DEFAULTS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(PAPER_DEFAULTS)}")
    unknown = set(cfg) - {key for defaults in PAPER_DEFAULTS.values() for key in defaults}
    if unknown:
        raise TypeError(f"unknown method options {sorted(unknown)}")
    defaults = PAPER_DEFAULTS[name]
    o = {**defaults, **{k: v for k, v in cfg.items() if k in defaults and v is not None}}
    d = encoder.feat_dim
    if name in POSITIONAL:
        projection = simclr_projection(d, o["proj_hidden"], o["proj_out"])
        return PositionalContrast(encoder, projection, o["temperature"], partitions=o.get("partitions"),
                                  threshold=o.get("position_threshold"))
    if name == "local":
        if unet is None:
            raise ValueError("method local needs the U-Net whose decoder it pretrains")
        channels = unet.decoder.blocks[-1].convs.conv_1.conv.out_channels
        spatial_dims = 2 if isinstance(unet.decoder.blocks[-1].convs.conv_1.conv, nn.Conv2d) else 3
        projection = local_projection(channels, o["proj_hidden"], o["proj_out"], spatial_dims)
        return LocalContrast(unet, projection, o["local_grid"], o["temperature"], encoder_method)
    if name == "simclr":
        return SimCLR(encoder, simclr_projection(d, o["proj_hidden"], o["proj_out"]), o["temperature"])
    if name == "moco":
        projection = moco_v2_projection(d, o["proj_hidden"], o["proj_out"])
        return MoCoV2(encoder, projection, o["queue_size"], o["momentum"], o["temperature"])
    if name == "byol":
        projection = byol_projection(d, o["proj_hidden"], o["proj_out"])
        prediction = byol_prediction(o["proj_out"], o["pred_hidden"], o["proj_out"])
        return BYOL(encoder, projection, prediction, o["tau_base"])
    projection = simsiam_projection(d, o["proj_hidden"], o["proj_out"])
    return SimSiam(encoder, projection, simsiam_prediction(o["proj_out"], o["pred_hidden"], o["proj_out"]))
