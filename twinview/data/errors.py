"""The one error type that readers raise for bad input."""

from __future__ import annotations

import os
from pathlib import Path


class DataError(ValueError):
    """Bad input data: names the offending file and says what is wrong with it.

    ``str(err)`` reads ``"<path>: <reason>"``; ``err.path`` and ``err.reason`` hold the parts.
    """

    def __init__(self, path: str | os.PathLike[str] | None, reason: str) -> None:
        self.path = Path(path) if path is not None else None
        self.reason = reason
        where = display_path(self.path) if self.path is not None else "<no path>"
        super().__init__(f"{where}: {reason}")


def display_path(path: str | os.PathLike[str]) -> str:
    """A printable form of a path, also for names that are not valid UTF-8 (bytes shown escaped)."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")
