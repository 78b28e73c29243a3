"""Market-1501 person re-identification folders.

Layout: ``bounding_box_train/``, ``query/`` and ``bounding_box_test/`` (the gallery), each holding
crops named ``PPPP_cCsS_FFFFFF_BB.jpg``: person id, camera, sequence, frame and box index. Files that
are not ``.jpg``/``.jpeg``/``.png`` (``Thumbs.db``, ...) and macOS ``._*`` files are ignored.

Standard protocol: junk images (pid ``-1``) are dropped from every split; distractors (pid ``0000``)
are dropped from the training split and kept in the gallery. A distractor in the query split is a
DataError: a query must be a real identity to have a true match.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from twinview.data.records import PersonRecord
from twinview.errors import DataError

PathLike = str | os.PathLike[str]

TRAIN, QUERY, GALLERY = "bounding_box_train", "query", "bounding_box_test"
SPLITS = (TRAIN, QUERY, GALLERY)
JUNK, DISTRACTOR = -1, 0
NAME_REASON = "name does not match PPPP_cCsS_FFFFFF_BB.jpg"
QUERY_DISTRACTOR_REASON = "distractor (pid 0000) in query: a query must be a real identity"

_SUFFIXES = (".jpg", ".jpeg", ".png")
_NAME = re.compile(r"(-1|\d{4})_c(\d+)s(\d+)_(\d{6})_(\d{2})\.(?:jpe?g|png)", re.IGNORECASE)


@dataclass(frozen=True)
class Market1501:
    """The three splits of a Market-1501 folder, filtered by the standard protocol."""

    root: Path
    train: list[PersonRecord]
    query: list[PersonRecord]
    gallery: list[PersonRecord]


def parse_market_name(path: PathLike) -> tuple[int, int, int, int]:
    """``(pid, camid, sequence, frame)`` from a ``PPPP_cCsS_FFFFFF_BB.jpg`` name.

    pid is -1 for junk and 0 for distractors; a name that does not match is a DataError.
    """
    match = _NAME.fullmatch(Path(path).name)
    if match is None or int(match[2]) == 0:
        raise DataError(path, NAME_REASON)
    pid, camid, sequence, frame, _box = (int(g) for g in match.groups())
    return pid, camid, sequence, frame


def split_files(folder: PathLike) -> list[Path]:
    """The image files in one split folder, sorted by name; DataError when the folder is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "missing split folder")
    return sorted(
        p for p in folder.iterdir() if p.name.lower().endswith(_SUFFIXES) and not p.name.startswith("._")
    )


def person_record(path: PathLike, split: str) -> PersonRecord | None:
    """The record for one crop, or None when the protocol drops it (junk; distractors in training)."""
    pid, camid, sequence, frame = parse_market_name(path)
    if pid == JUNK or (pid == DISTRACTOR and split == TRAIN):
        return None
    if pid == DISTRACTOR and split == QUERY:
        raise DataError(path, QUERY_DISTRACTOR_REASON)
    return PersonRecord(Path(path), pid, camid, sequence, frame, split)


def read_split(root: PathLike, split: str) -> list[PersonRecord]:
    """The kept records of one split; a missing or empty split is a DataError naming the folder."""
    folder = Path(root) / split
    records = [r for r in (person_record(p, split) for p in split_files(folder)) if r is not None]
    if not records:
        raise DataError(folder, "no images")
    return records


def read_market1501(root: PathLike) -> Market1501:
    """Read the three splits from their file names (pixels are not opened)."""
    return Market1501(Path(root), read_split(root, TRAIN), read_split(root, QUERY), read_split(root, GALLERY))


def relabel(records: list[PersonRecord]) -> dict[int, int]:
    """Map the person ids in ``records`` to ``0..N-1`` in increasing pid order (for the ID classifier)."""
    return {pid: index for index, pid in enumerate(sorted({r.pid for r in records}))}
