"""Arrays cached on disk for data larger than memory: ``.npy`` files, one folder per entry.

A volume is stored with its slice axis first, so one 2D slice is a contiguous block that a memory map
reads without loading the volume. ``meta.json`` is written last: a folder without it is incomplete
(a killed writer) and is written again. Entry names are hashes of what the arrays depend on
(:func:`entry_key`), so changed settings or source files make a new entry, never a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from twinview.files import write_text_atomic

FORMAT = 1  # bump when stored arrays change meaning
DEFAULT_ROOT = Path(os.environ.get("TWINVIEW_CACHE", Path.home() / ".cache" / "twinview"))
META = "meta.json"


def file_stats(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """``(resolved path, size, modification time in ns)`` of each file (a folder: of the files in it)."""
    stats = []
    for path in paths:
        entries = sorted(path.rglob("*")) if path.is_dir() else [path]
        stats += [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in entries if p.is_file()]
    return stats


def entry_key(parts: dict[str, Any]) -> str:
    """A short hash of ``parts`` (JSON-serialisable, with :func:`file_stats` for the source files)."""
    body = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:24]


def is_complete(folder: Path) -> bool:
    return (folder / META).is_file()


def write_entry(folder: Path, arrays: dict[str, np.ndarray], axis: int | None, meta: dict[str, Any]) -> None:
    """Write each ``(C, *spatial)`` array with spatial axis ``axis`` moved first (None: as it is), each
    file atomically, then ``meta.json`` (``meta`` plus ``slice_axis``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        stored = array if axis is None else np.ascontiguousarray(np.moveaxis(array, axis + 1, 0))
        tmp = folder / f".{name}.{secrets.token_hex(4)}.npy"
        np.save(tmp, stored)
        os.replace(tmp, folder / f"{name}.npy")
    write_text_atomic(folder / META, json.dumps({**meta, "slice_axis": axis}) + "\n")


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / META).read_text())


def read_array(folder: Path, name: str, axis: int | None) -> np.ndarray:
    """A whole stored array, back in ``(C, *spatial)`` order."""
    array = np.load(folder / f"{name}.npy")
    return array if axis is None else np.ascontiguousarray(np.moveaxis(array, 0, axis + 1))


def read_slice(folder: Path, name: str, index: int) -> np.ndarray:
    """Slice ``index`` along the stored slice axis, ``(C, *other axes)``, read through a memory map."""
    return np.array(np.load(folder / f"{name}.npy", mmap_mode="r")[index])


def varying_slices(array: np.ndarray, axis: int) -> list[int]:
    """The slices of a ``(C, *spatial)`` array along spatial ``axis`` that are not constant."""
    moved = np.moveaxis(array, axis + 1, 0)
    return [k for k in range(moved.shape[0]) if float(moved[k].max()) > float(moved[k].min())]
