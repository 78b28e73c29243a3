"""A PNG grid of augmented views (matplotlib, Agg), to see what a preset does to one's own data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from pretrain.views import build_views, eval_transform, preset_metadata
from twinview.errors import DataError

CELL_PX = 128  # height of one grid cell in pixels; the width follows the output aspect ratio
_DPI = 100


def save_view_grid(
    preset: str,
    samples: Sequence[np.ndarray],
    out_png: str | Path,
    n_pairs: int = 4,
    spatial_dims: int = 2,
    size: Sequence[int] = (128, 128),
    channels: int | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Write a PNG grid: a row per sample, columns ``original | view 1 | view 2`` for ``n_pairs`` pairs.

    "original" is the deterministic :func:`~pretrain.views.eval_transform` of the sample. 3D samples show
    the middle slice along the first spatial axis. The PNG is ``(1 + 2 * n_pairs) * cell_w`` by
    ``len(samples) * CELL_PX`` pixels, ``cell_w = round(CELL_PX * W / H)``. ``seed`` makes the grid
    reproducible; the other arguments are those of :func:`~pretrain.views.build_views`.
    """
    if not samples or n_pairs < 1:
        raise ValueError("need at least one sample and one pair")
    views = build_views(preset, size, spatial_dims, channels, **overrides)
    views.set_seed(seed)
    original = eval_transform(preset, size, spatial_dims, channels, **overrides)
    meta = preset_metadata(preset, size, spatial_dims, channels, **overrides)
    rows = []
    for sample in samples:
        row = [original(sample)]
        for _ in range(n_pairs):
            row.extend(views(sample))
        rows.append([_displayable(t, meta) for t in row])

    n_cols = 1 + 2 * n_pairs
    cell_w = round(CELL_PX * size[-1] / size[-2])
    fig = Figure(figsize=(n_cols * cell_w / _DPI, len(rows) * CELL_PX / _DPI), dpi=_DPI)
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1, wspace=0, hspace=0)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0, aspect="auto")
            ax.set_axis_off()
            if r == 0:
                label = "original" if c == 0 else f"pair {(c + 1) // 2} view {2 - c % 2}"
                ax.text(2, 2, label, color="yellow", fontsize=6, va="top", backgroundcolor="black")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=_DPI)  # a bare Figure renders with Agg; pyplot's global state is not touched
    return out_png


def _displayable(view: torch.Tensor, meta: dict[str, Any]) -> np.ndarray:
    """A view as an HxW or HxWx3 array in [0, 1]: undo mean/std; z-scores shown over [-3, 3]."""
    x = view[:, view.shape[1] // 2] if view.ndim == 4 else view
    intensity = meta["intensity"]
    if intensity["kind"] == "mean_std":
        x = x * torch.tensor(intensity["std"]).view(-1, 1, 1) + torch.tensor(intensity["mean"]).view(-1, 1, 1)
    elif intensity["kind"] == "zscore_nonzero":
        x = (x + 3.0) / 6.0
    x = x.clamp(0.0, 1.0).numpy()
    return x[0] if x.shape[0] != 3 else x.transpose(1, 2, 0)


def save_view_grid_from_data(preset: str, data: str | Path, out_png: str | Path, n_samples: int = 4,
                             size: Sequence[int] | None = None, seed: int = 0, volumes: bool = False) -> Path:
    """:func:`save_view_grid` on the first ``n_samples`` samples (spread over the data) of a folder
    in any layout the pretraining reads; ``volumes`` takes MSD scans as 3D volumes, not slices."""
    from pretrain.config import DataConfig
    from pretrain.datasets import load_samples, resolve_kind

    cfg = DataConfig(path=str(data))
    kind = resolve_kind(cfg)
    if volumes:
        if kind != "msd_slices":
            raise DataError(data, f"3D views need an MSD folder of volumes; this is {kind} data")
        kind = "msd_3d"
    samples = load_samples(DataConfig(path=str(data), kind=kind))
    spatial_dims = samples.spatial_dims
    if size is None:
        size = (32, 32, 32) if spatial_dims == 3 else (128, 64) if preset == "reid" else (128, 128)
    picks = np.linspace(0, len(samples.loaders) - 1, num=min(n_samples, len(samples.loaders))).round()
    arrays = [samples.loaders[int(i)]() for i in picks]
    return save_view_grid(preset, arrays, out_png, spatial_dims=spatial_dims, size=tuple(size), seed=seed)
