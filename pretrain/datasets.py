"""Unlabelled data sets for pretraining, built on the readers: each item is a pair of views.

Every item's augmentation is seeded from ``(seed, epoch, index)``, so a run gives the same views
whatever the number of loader workers or processes, and a resumed run repeats exactly the views
that the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from engine.sampling import sample_seed
from pretrain.config import DataConfig
from pretrain.views import TwoViews

Loader = Callable[[], np.ndarray]
PRETRAIN_KINDS = {"market1501": "market1501", "msd": "msd_slices", "nnunet": "msd_slices",
                  "case_folders": "msd_slices", "images": "images", "image_pairs": "images",
                  "dsb2018": "dsb2018"}
"""The data kind that ``auto`` reads for each layout :func:`twinview.data.inspect.detect_format` finds."""


@dataclass
class Samples:
    """Loaders of the unlabelled samples, their names, whether they are 2D images or 3D volumes, and for
    slices of volumes each slice's relative position along the slice axis (0 first, 1 last)."""

    loaders: list[Loader]
    names: list[str]
    spatial_dims: int = 2
    positions: list[float] | None = None


def _image_loader(path: Path) -> Loader:
    from twinview.data.images import load_image

    return lambda: load_image(path)


def _volume_samples(cfg: DataConfig, slices: bool) -> Samples:
    """The images of an MSD task, nnU-Net raw set or per-case folders (training and test, labels ignored,
    ``data.exclude_cases`` left out), as whole volumes (``CxDxHxW``) or as their 2D slices along
    ``data.slice_axis`` (``HxWxC``); every modality when ``data.channels`` is their number, else the
    first. With ``data.cache: disk`` each volume is written once to a :mod:`twinview.array_store` entry
    and samples are read back when drawn."""
    from twinview import array_store
    from twinview.data.case_folders import CasePatterns
    from twinview.data.convert import read_volume_set
    from twinview.data.nifti import load_channels

    patterns = CasePatterns(tuple(cfg.image)) if cfg.image else None
    volumes = read_volume_set(Path(cfg.path), patterns)
    every = cfg.channels > 1 and cfg.channels == len(volumes.channel_names)
    axis = cfg.slice_axis if slices else None
    store = (Path(cfg.cache_dir) if cfg.cache_dir else array_store.DEFAULT_ROOT / "pretrain") \
        if cfg.cache == "disk" else None
    samples = Samples([], [], spatial_dims=2 if slices else 3, positions=[] if slices else None)
    for rec in [*volumes.training, *volumes.test]:
        if rec.case_id in cfg.exclude_cases:
            continue
        if store is None:
            volume = load_channels(rec.channels)[0].astype(np.float32)  # (C, X, Y, Z)
            _add_volume(samples, rec.case_id, volume if every else volume[:1], axis, every)
            continue
        folder = store / array_store.entry_key({"use": "pretrain", "every": every, "axis": axis,
                                                "files": array_store.file_stats(rec.channels)})
        if not array_store.is_complete(folder):
            volume = load_channels(rec.channels)[0].astype(np.float32)
            volume = volume if every else volume[:1]
            varying = array_store.varying_slices(volume, axis) if slices else []
            count = volume.shape[axis + 1] if slices else 1
            array_store.write_entry(folder, {"image": volume}, axis, {"slices": varying, "count": count})
        _add_stored(samples, rec.case_id, folder, every)
    return samples


def _add_volume(samples: Samples, case_id: str, volume: np.ndarray, axis: int | None, every: bool) -> None:
    """A ``(C, X, Y, Z)`` volume held in memory: itself, or its non-constant slices along ``axis``."""
    if axis is None:
        samples.loaders.append(lambda v=volume if every else volume[0]: v)
        samples.names.append(case_id)
        return
    from twinview.array_store import varying_slices

    count = volume.shape[axis + 1]
    for i in varying_slices(volume, axis):  # an all-constant slice has nothing to contrast
        sl = np.ascontiguousarray(np.moveaxis(np.take(volume, i, axis=axis + 1), 0, -1))
        samples.loaders.append(lambda s=sl if every else sl[..., 0]: s)
        samples.names.append(f"{case_id}[{axis}:{i}]")
        samples.positions.append(i / max(count - 1, 1))


def _add_stored(samples: Samples, case_id: str, folder: Path, every: bool) -> None:
    """Loaders reading a stored volume, or each of its non-constant slices, when a sample is drawn."""
    from twinview import array_store

    meta = array_store.read_meta(folder)
    axis = meta["slice_axis"]
    if axis is None:
        samples.loaders.append(partial(_stored_volume, folder, every))
        samples.names.append(case_id)
        return
    for i in meta["slices"]:
        samples.loaders.append(partial(_stored_slice, folder, i, every))
        samples.names.append(f"{case_id}[{axis}:{i}]")
        samples.positions.append(i / max(meta["count"] - 1, 1))


def _stored_volume(folder: Path, every: bool) -> np.ndarray:
    from twinview import array_store

    volume = array_store.read_array(folder, "image", None)
    return volume if every else volume[0]


def _stored_slice(folder: Path, index: int, every: bool) -> np.ndarray:
    from twinview import array_store

    sl = np.moveaxis(array_store.read_slice(folder, "image", index), 0, -1)  # (C, H, W) -> (H, W, C)
    return np.ascontiguousarray(sl if every else sl[..., 0])


def resolve_kind(cfg: DataConfig) -> str:
    """The data kind to read: ``cfg.kind`` or, for ``auto``, what the data's layout is."""
    from twinview.data.inspect import resolve_layout

    return resolve_layout(Path(cfg.path), cfg.kind, PRETRAIN_KINDS, "pretraining; set data.kind")


def load_samples(cfg: DataConfig) -> Samples:
    """The unlabelled samples named by a data config."""
    root = Path(cfg.path)
    kind = resolve_kind(cfg)
    if kind == "market1501":
        from twinview.data.market1501 import read_market1501

        train = read_market1501(root).train
        return Samples([_image_loader(r.path) for r in train], [r.path.name for r in train])
    if kind in ("msd_slices", "msd_3d"):
        return _volume_samples(cfg, slices=kind == "msd_slices")
    if kind == "dsb2018":
        from twinview.data.dsb2018 import read_dsb2018

        recs = [r for r in read_dsb2018(root) if r.sample_id not in set(cfg.exclude_cases)]
        return Samples([_image_loader(r.image) for r in recs], [r.sample_id for r in recs])
    from twinview.data.image_pairs import IMAGES_DIR, is_image_pairs
    from twinview.data.images import read_image_folder

    recs = read_image_folder(root / IMAGES_DIR if is_image_pairs(root) else root)  # never the masks
    return Samples([_image_loader(r.path) for r in recs], [r.path.name for r in recs])


class TwoViewDataset(Dataset):
    """Applies a two-view transform to each sample, with per-item seeding (see module docstring); with
    ``positions``, items also carry the sample's position in its volume."""

    def __init__(self, samples: Samples, views: TwoViews, seed: int, positions: bool = False) -> None:
        if positions and samples.positions is None:
            raise ValueError("these samples have no positions (only slices of volumes do)")
        self.samples = samples
        self.views = views
        self.seed = seed
        self.positions = positions
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples.loaders)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        self.views.set_seed(sample_seed(self.seed, self.epoch, index))
        views = self.views(self.samples.loaders[index]())
        if self.positions:
            return (*views, torch.tensor(self.samples.positions[index], dtype=torch.float32))
        return views


def collate_views(batch: Sequence[tuple[torch.Tensor, ...]]
                  ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The two stacked views, and the stacked positions when the items carry them (else None)."""
    views = [torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])]
    return views, torch.stack([b[2] for b in batch]) if len(batch[0]) > 2 else None
