"""Synthetic data sets in the standard public layouts: the project's embedded default data.

Each generator writes a small data set that the ordinary readers open exactly like the real release
(MSD hippocampus, Market-1501, DSB2018 nuclei), so every pipeline can run end to end without
downloads. Output is a pure function of ``(kind, seed, size)``: the same arguments give byte-identical
files. The data set is built in a sibling temporary folder and renamed into place at the end, so an
interrupted run never leaves a half-written data set under the final name.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from twinview.data.synth.market import write_market
from twinview.data.synth.msd import write_msd
from twinview.data.synth.nuclei import write_nuclei
from twinview.errors import DataError

KINDS = ("msd", "market", "nuclei")
SIZES = ("small", "medium")

Writer = Callable[[Path, int, str], dict[str, object]]
_WRITERS: dict[str, Writer] = {"msd": write_msd, "market": write_market, "nuclei": write_nuclei}


def generate(kind: str, out: Path, seed: int = 0, size: str = "small") -> dict[str, object]:
    """Write the synthetic data set ``kind`` into the new (or empty) folder ``out``.

    Returns a JSON-ready summary: kind, folder, seed, size, the writer's counts, and the number and
    total bytes of the files written. Raises ``ValueError`` for an unknown kind or size and
    ``DataError`` when ``out`` is a file or a non-empty folder (nothing is written then).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic data kind {kind!r}; choose one of {', '.join(KINDS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    out = Path(out)
    _check_free(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        counts = _WRITERS[kind](tmp, seed, size)
        _check_free(out)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = [p for p in out.rglob("*") if p.is_file()]
    return {
        "kind": kind,
        "out": str(out),
        "seed": seed,
        "size": size,
        **counts,
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
    }


def _check_free(out: Path) -> None:
    """Refuse an existing file or non-empty folder at ``out`` so that nothing is written over."""
    if out.is_dir():
        if any(out.iterdir()):
            raise DataError(out, "output folder is not empty; choose a new folder")
    elif out.exists() or out.is_symlink():
        raise DataError(out, "output path exists and is not a folder; choose a new folder")
