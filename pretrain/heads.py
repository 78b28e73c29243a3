"""Projection and prediction heads described by layer specs, with the papers' defaults.

A head is a stack of ``LayerSpec(in_dim, out_dim, norm, activation)``: Linear, then the
optional norm module, then the optional activation. The Linear has no bias when a norm follows
(the norm's shift makes it redundant), as in the SimSiam and BYOL reference code.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import NamedTuple

from torch import Tensor, nn


class LayerSpec(NamedTuple):
    """One head layer: ``Linear(in_dim, out_dim)`` -> ``norm`` -> ``activation``."""

    in_dim: int
    out_dim: int
    norm: nn.Module | None = None
    activation: nn.Module | None = None


class MLPHead(nn.Module):
    """An MLP built from layer specs (plain tuples are accepted too); maps (B, in) to (B, out)."""

    def __init__(self, layers: Sequence[LayerSpec | tuple[int, int, nn.Module | None, nn.Module | None]]):
        super().__init__()
        if not layers:
            raise ValueError("a head needs at least one layer")
        specs = [LayerSpec(*layer) for layer in layers]
        for prev, cur in pairwise(specs):
            if prev.out_dim != cur.in_dim:
                raise ValueError(f"layer sizes do not chain: {prev.out_dim} -> {cur.in_dim}")
        modules: list[nn.Module] = []
        for spec in specs:
            modules.append(nn.Linear(spec.in_dim, spec.out_dim, bias=spec.norm is None))
            modules.extend(m for m in (spec.norm, spec.activation) if m is not None)
        self.layers = nn.Sequential(*modules)
        self.in_dim = specs[0].in_dim
        self.out_dim = specs[-1].out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def simclr_projection(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> MLPHead:
    """SimCLR g(.): Linear-BN-ReLU-Linear (Chen et al. 2020; BN as in the reference code)."""
    return MLPHead(
        [
            LayerSpec(in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)),
            LayerSpec(hidden_dim, out_dim),
        ]
    )


def moco_v2_projection(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> MLPHead:
    """MoCo v2 MLP head: Linear-ReLU-Linear, no BN (Chen et al. 2020, "Improved Baselines")."""
    return MLPHead(
        [LayerSpec(in_dim, hidden_dim, None, nn.ReLU(inplace=True)), LayerSpec(hidden_dim, out_dim)]
    )


def byol_projection(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> MLPHead:
    """BYOL projector: Linear-BN-ReLU-Linear (Grill et al. 2020)."""
    return MLPHead(
        [
            LayerSpec(in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)),
            LayerSpec(hidden_dim, out_dim),
        ]
    )


def byol_prediction(in_dim: int = 256, hidden_dim: int = 4096, out_dim: int = 256) -> MLPHead:
    """BYOL predictor: same shape as the projector (Grill et al. 2020)."""
    return byol_projection(in_dim, hidden_dim, out_dim)


def simsiam_projection(in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048) -> MLPHead:
    """SimSiam projector: 3 layers, BN on every output, no ReLU on the last (Chen & He 2021).

    The output BN has no affine parameters, as in the reference code.
    """
    return MLPHead(
        [
            LayerSpec(in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)),
            LayerSpec(hidden_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)),
            LayerSpec(hidden_dim, out_dim, nn.BatchNorm1d(out_dim, affine=False)),
        ]
    )


def simsiam_prediction(in_dim: int = 2048, hidden_dim: int = 512, out_dim: int = 2048) -> MLPHead:
    """SimSiam predictor: bottleneck Linear-BN-ReLU-Linear (Chen & He 2021)."""
    return MLPHead(
        [
            LayerSpec(in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)),
            LayerSpec(hidden_dim, out_dim),
        ]
    )


def local_projection(in_channels: int, hidden: int = 128, out: int = 128,
                     spatial_dims: int = 2) -> nn.Sequential:
    """Chaitanya et al. 2020's g_2 for the local loss: 1x1 convolution, ReLU, 1x1 convolution, applied
    at every position of a decoder feature map."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return nn.Sequential(conv(in_channels, hidden, 1), nn.ReLU(inplace=True), conv(hidden, out, 1))
