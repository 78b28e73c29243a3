"""Preprocessed training cases on disk, for data sets larger than memory (``data.cache: disk``).

Each case is preprocessed once (orientation, spacing, intensity: :func:`downstream.seg.data.preprocess_case`)
into a :mod:`twinview.array_store` entry under ``data.cache_dir`` (default ``~/.cache/twinview/seg``),
keyed by the preprocessing, the case's files and their sizes and modification times. Training then reads
cases back as it needs them, keeping up to ``data.cache_ram_gb`` of the most recently used ones in memory.

An own store rather than MONAI's ``PersistentDataset``: volumes are saved with the slice axis first, so
a 2D model's slice is read through a memory map without loading its volume, and the RAM budget is a
byte count rather than a share of cases.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from downstream.seg.config import SegDataConfig
from downstream.seg.data import Case, SegTask, preprocess_case, preprocess_metadata
from twinview import array_store

KEYS = ("image", "label")


def case_key(case: Case, task: SegTask, cfg: SegDataConfig) -> str:
    """A hash of what the stored arrays depend on: the preprocessing and the case's files as they are."""
    files = [*(case.channels or (case.image,)), *([case.label] if case.label is not None else [])]
    return array_store.entry_key({
        "preprocessing": preprocess_metadata(cfg, task), "kind": task.kind, "labels": sorted(task.labels),
        "mask_values": sorted((task.mask_values or {}).items()), "in_channels": task.in_channels,
        "slice_axis": cfg.slice_axis, "files": array_store.file_stats(files)})


class CaseStore:
    """The stored cases of one run, read back with a RAM budget (least recently used dropped first)."""

    def __init__(self, folders: dict[str, Path], ram_bytes: int) -> None:
        self.folders, self.ram_bytes = folders, ram_bytes
        self._meta: dict[str, dict] = {}
        self._ram: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._ram_used = 0

    @classmethod
    def build(cls, cases: Sequence[Case], task: SegTask, cfg: SegDataConfig, progress: bool = False
              ) -> CaseStore:
        """Preprocess and write every case not stored yet (one at a time, so memory holds one case)."""
        from tqdm.auto import tqdm

        root = Path(cfg.cache_dir) if cfg.cache_dir else array_store.DEFAULT_ROOT / "seg"
        axis = cfg.slice_axis if task.image_dims == 3 else None
        folders = {}
        for case in tqdm(cases, desc="cache cases", unit="case", disable=not progress):
            folder = root / case_key(case, task, cfg)
            if not array_store.is_complete(folder):
                data = preprocess_case(case, task, cfg)
                image = data["image"].as_tensor().numpy().astype(np.float32)
                label = data["label"].as_tensor().numpy().astype(np.uint8)
                slices = array_store.varying_slices(image, axis) if axis is not None else []
                array_store.write_entry(folder, {"image": image, "label": label}, axis, {"slices": slices})
            folders[case.case_id] = folder
        return cls(folders, int(cfg.cache_ram_gb * 2**30))

    def meta(self, case_id: str) -> dict:
        if case_id not in self._meta:
            self._meta[case_id] = array_store.read_meta(self.folders[case_id])
        return self._meta[case_id]

    def volume(self, case_id: str) -> dict[str, torch.Tensor]:
        """``{"image": (C, *spatial), "label": (1, *spatial)}`` of a case, from RAM when held there."""
        if case_id in self._ram:
            self._ram.move_to_end(case_id)
            return self._ram[case_id]
        folder, axis = self.folders[case_id], self.meta(case_id)["slice_axis"]
        item = {k: torch.from_numpy(array_store.read_array(folder, k, axis)).float() for k in KEYS}
        size = _nbytes(item)
        if size <= self.ram_bytes:
            while self._ram and self._ram_used + size > self.ram_bytes:
                self._ram_used -= _nbytes(self._ram.popitem(last=False)[1])
            self._ram[case_id] = item
            self._ram_used += size
        return item

    def slice(self, case_id: str, index: int) -> dict[str, torch.Tensor]:
        """The 2D slice ``index`` along the stored slice axis, read through a memory map."""
        folder = self.folders[case_id]
        return {k: torch.from_numpy(array_store.read_slice(folder, k, index)).float() for k in KEYS}


def _nbytes(item: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in item.values())


class StoredItems(Sequence):
    """The training items of a :class:`CaseStore`: whole cases, or the non-constant 2D slices along
    ``slice_axis`` of volumes (what :func:`downstream.seg.data.to_slices` keeps in memory)."""

    def __init__(self, store: CaseStore, case_ids: Sequence[str], slices: bool) -> None:
        self.store = store
        if slices:
            self.keys = [(c, k) for c in case_ids for k in store.meta(c)["slices"]]
        else:
            self.keys = [(c, -1) for c in case_ids]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        case_id, k = self.keys[i]
        return self.store.volume(case_id) if k < 0 else self.store.slice(case_id, k)
