"""Preprocessed training cases on disk, for data sets larger than memory (``data.cache: disk``).

Each case is preprocessed once (orientation, spacing, intensity: :func:`downstream.seg.data.preprocess_case`)
and written as ``.npy`` files under ``<cache_dir>/<key>/``, where the key hashes the preprocessing, the
case's files and their sizes and modification times: changed settings or files give a new entry, never
a stale one. Training then reads cases back as it needs them, keeping up to ``data.cache_ram_gb`` of
the most recently used ones in memory.

An own store rather than MONAI's ``PersistentDataset``: volumes are saved with the slice axis first, so
a 2D model's slice is read through a memory map without loading its volume, and the RAM budget is a
byte count rather than a share of cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from downstream.seg.config import SegDataConfig
from downstream.seg.data import Case, SegTask, preprocess_case, preprocess_metadata
from twinview.files import write_text_atomic

FORMAT = 1  # bump when the stored arrays change meaning
DEFAULT_CACHE = Path(os.environ.get("TWINVIEW_CACHE", Path.home() / ".cache" / "twinview")) / "seg"


def case_key(case: Case, task: SegTask, cfg: SegDataConfig) -> str:
    """A hash of what the stored arrays depend on: the preprocessing and the case's files as they are."""
    files = [*(case.channels or (case.image,)), *([case.label] if case.label is not None else [])]
    stats = []
    for path in files:
        entries = sorted(path.rglob("*")) if path.is_dir() else [path]  # DSB2018: a folder of masks
        stats += [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in entries if p.is_file()]
    body = {"format": FORMAT, "preprocessing": preprocess_metadata(cfg, task), "kind": task.kind,
            "labels": sorted(task.labels), "mask_values": sorted((task.mask_values or {}).items()),
            "in_channels": task.in_channels, "slice_axis": cfg.slice_axis, "files": stats}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:24]


class CaseStore:
    """The stored cases of one run, read back with a RAM budget (least recently used dropped first)."""

    def __init__(self, folders: dict[str, Path], ram_bytes: int) -> None:
        self.folders, self.ram_bytes = folders, ram_bytes
        self._ram: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._ram_used = 0

    @classmethod
    def build(cls, cases: Sequence[Case], task: SegTask, cfg: SegDataConfig, progress: bool = False
              ) -> CaseStore:
        """Preprocess and write every case not stored yet (one at a time, so memory holds one case)."""
        from tqdm.auto import tqdm

        root = Path(cfg.cache_dir) if cfg.cache_dir else DEFAULT_CACHE
        axis = cfg.slice_axis if task.image_dims == 3 else None
        folders = {}
        for case in tqdm(cases, desc="cache cases", unit="case", disable=not progress):
            folder = root / case_key(case, task, cfg)
            if not (folder / "meta.json").exists():
                _write_case(folder, preprocess_case(case, task, cfg), axis)
            folders[case.case_id] = folder
        return cls(folders, int(cfg.cache_ram_gb * 2**30))

    def meta(self, case_id: str) -> dict[str, Any]:
        return json.loads((self.folders[case_id] / "meta.json").read_text())

    def volume(self, case_id: str) -> dict[str, torch.Tensor]:
        """``{"image": (C, *spatial), "label": (1, *spatial)}`` of a case, from RAM when held there."""
        if case_id in self._ram:
            self._ram.move_to_end(case_id)
            return self._ram[case_id]
        folder = self.folders[case_id]
        axis = self.meta(case_id)["slice_axis"]
        item = {k: torch.from_numpy(_unmoved(np.load(folder / f"{k}.npy"), axis)).float()
                for k in ("image", "label")}
        size = sum(t.numel() * t.element_size() for t in item.values())
        if size <= self.ram_bytes:
            while self._ram and self._ram_used + size > self.ram_bytes:
                _, dropped = self._ram.popitem(last=False)
                self._ram_used -= sum(t.numel() * t.element_size() for t in dropped.values())
            self._ram[case_id] = item
            self._ram_used += size
        return item

    def slice(self, case_id: str, index: int) -> dict[str, torch.Tensor]:
        """The 2D slice ``index`` along the stored slice axis, read through a memory map."""
        folder = self.folders[case_id]
        return {k: torch.from_numpy(np.array(np.load(folder / f"{k}.npy", mmap_mode="r")[index])).float()
                for k in ("image", "label")}


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


def _unmoved(array: np.ndarray, axis: int | None) -> np.ndarray:
    """A stored array (slice axis first) back in (C, *spatial) order."""
    return array if axis is None else np.ascontiguousarray(np.moveaxis(array, 0, axis + 1))


def _write_case(folder: Path, case: dict[str, Any], axis: int | None) -> None:
    """The arrays, volumes with the slice axis ``axis`` first as (S, C, ...) so that a slice is one
    contiguous block (2D images, ``axis`` None, as they are), then ``meta.json`` last: a folder without
    it is incomplete and is written again."""
    image, label = case["image"].as_tensor().numpy(), case["label"].as_tensor().numpy()
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (("image", image.astype(np.float32)), ("label", label.astype(np.uint8))):
        stored = array if axis is None else np.ascontiguousarray(np.moveaxis(array, axis + 1, 0))
        tmp = folder / f".{name}.{secrets.token_hex(4)}.npy"
        np.save(tmp, stored)
        os.replace(tmp, folder / f"{name}.npy")
    slices = []
    if axis is not None:
        moved = np.moveaxis(image, axis + 1, 0)
        slices = [k for k in range(moved.shape[0]) if float(moved[k].max()) > float(moved[k].min())]
    write_text_atomic(folder / "meta.json", json.dumps({"slice_axis": axis, "shape": list(image.shape),
                                                        "slices": slices}) + "\n")
