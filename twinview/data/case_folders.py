"""Per-case folders (BraTS and many challenges): one folder per case, one NIfTI file per modality and
a label file, told apart by file-name patterns.

``root/<case>/...``: every folder directly below ``root`` is a case (its name is the case id; files
may sit deeper inside it). Each image pattern must match exactly one file of a case; their order is
the channel order. The label pattern matches the label map (a case without one is unlabelled).
Patterns are shell wildcards (``*``, ``?``, ``[...]``) matched without regard to case against the
file's path inside its case folder, e.g. ``image: ["*T1c*.nii.gz", "*Flair*.nii.gz"]``,
``label: "*OT*.nii.gz"``. :func:`guess_patterns` proposes patterns from the names shared across cases,
which ``inspect`` reports when none are given.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from twinview.data.nifti import is_nifti
from twinview.data.nnunet import SegCase
from twinview.errors import DataError

PathLike = str | os.PathLike[str]
LABEL_WORDS = ("seg", "label", "_ot", "gt", "mask")  # in this order of preference when guessing


@dataclass(frozen=True)
class CasePatterns:
    """Which file of a case is which: one pattern per image channel, and the label's."""

    image: tuple[str, ...]
    label: str = ""

    def modality_names(self) -> list[str]:
        """A readable name per channel: the pattern without wildcards and NIfTI suffixes."""
        return [_strip(p) or f"channel {i}" for i, p in enumerate(self.image)]


def is_case_folders(root: PathLike) -> bool:
    """Sub-folders holding NIfTI files, and none at the top (there: a plain NIfTI folder)."""
    root = Path(root)
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if any(p.is_file() and is_nifti(p) for p in entries):
        return False
    return any(p.is_dir() and _nifti_below(p) for p in entries)


def case_dirs(root: PathLike) -> list[Path]:
    """The case folders below ``root``, sorted by name (hidden ones skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "not a folder")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_case_folders(root: PathLike, patterns: CasePatterns) -> tuple[list[SegCase], list[DataError]]:
    """The cases whose every image pattern matches one file, and a DataError per problem (a missing
    modality, a pattern matching several files, a file matched as two things)."""
    if not patterns.image:
        raise DataError(root, "per-case folders need image patterns (data.image), e.g. [\"*T1c*.nii.gz\"]")
    cases, problems = [], []
    for folder in case_dirs(root):
        files = _nifti_below(folder)
        names = {f: f.relative_to(folder).as_posix().lower() for f in files}
        channels, broken = [], False
        for i, pattern in enumerate(patterns.image):
            found = [f for f in files if fnmatch(names[f], pattern.lower())]
            if len(found) != 1:
                what = (f"no file matches image pattern {pattern!r} (channel {i})" if not found else
                        f"image pattern {pattern!r} matches {len(found)} files "
                        f"({', '.join(names[f] for f in found[:3])}): make it narrower")
                problems.append(DataError(folder, what))
                broken = True
                continue
            channels.append(found[0])
        label = None
        if patterns.label:
            found = [f for f in files if fnmatch(names[f], patterns.label.lower())]
            if len(found) > 1:
                problems.append(DataError(folder, f"label pattern {patterns.label!r} matches {len(found)} "
                                                  f"files ({', '.join(names[f] for f in found[:3])})"))
                broken = True
            label = found[0] if found else None
        twice = [c for c, n in Counter([*channels, *([label] if label else [])]).items() if n > 1]
        if twice:
            problems.append(DataError(twice[0], "matched by two patterns (image and label, or two images)"))
            broken = True
        if not broken:
            cases.append(SegCase(folder.name, tuple(channels), label))
    if not cases and not problems:
        problems.append(DataError(root, "no case folders with NIfTI files"))
    return cases, problems


def read_case_folders(root: PathLike, patterns: CasePatterns) -> list[SegCase]:
    """The cases of :func:`scan_case_folders`; its first problem is raised."""
    cases, problems = scan_case_folders(root, patterns)
    if problems:
        raise problems[0]
    return cases


def guess_patterns(root: PathLike) -> tuple[CasePatterns | None, dict[str, int]]:
    """Patterns proposed from the file names that most cases share (the case id taken out of each
    name), and every such name with the number of cases that have it. The label is the name with the
    first of :data:`LABEL_WORDS`; None when nothing is shared by half the cases."""
    folders = case_dirs(root)
    counts: Counter[str] = Counter()
    for folder in folders:
        counts.update({_generic(f.relative_to(folder).as_posix(), folder.name) for f in _nifti_below(folder)})
    shared = sorted(n for n, c in counts.items() if c * 2 >= len(folders))
    if not shared:
        return None, dict(counts)
    label = next((n for word in LABEL_WORDS for n in shared if word in _strip(n).lower()), "")
    images = tuple(n for n in shared if n != label)
    return (CasePatterns(images, label) if images else None), dict(sorted(counts.items()))


def safe_name(text: str) -> str:
    """``text`` usable as a file name: letters, digits, ``-`` and ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "channel"


def describe(patterns: CasePatterns) -> str:
    """The patterns as the config lines that set them."""
    label = f", label: {patterns.label!r}" if patterns.label else ""
    return f"image: {list(patterns.image)!r}{label}"


def _nifti_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_nifti(p))


def _generic(name: str, case_id: str) -> str:
    """A case's file name as a pattern for every case: its case id replaced by ``*``."""
    if case_id and case_id in name:
        return "*" + name.split(case_id, 1)[1] if name.startswith(case_id) else name.replace(case_id, "*")
    return name


def _strip(pattern: str) -> str:
    name = Path(pattern).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name.strip("*?_-. ")
