"""User errors: what the command line prints as one line ``twinview: error: ...`` (exit 2).

Anything else that escapes is a bug in twinview and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from pathlib import Path


class TwinviewError(Exception):
    """A mistake the user can mend (bad input, settings, paths, devices); ``str()`` says which and how."""


class DataError(TwinviewError, ValueError):
    """Bad input: names the offending file and says what is wrong with it.

    ``str(err)`` reads ``"<path>: <reason>"`` (just the reason when there is no path); ``err.path``
    and ``err.reason`` hold the parts.
    """

    def __init__(self, path: str | os.PathLike[str] | None, reason: str) -> None:
        self.path = Path(path) if path is not None else None
        self.reason = reason
        super().__init__(f"{display_path(self.path)}: {reason}" if self.path is not None else reason)


class OutputError(DataError):
    """An output path that would overwrite an input or something twinview did not write."""


def display_path(path: str | os.PathLike[str]) -> str:
    """A printable form of a path, also for names that are not valid UTF-8 (bytes shown escaped)."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")


def is_link_loop(path: str | os.PathLike[str]) -> bool:
    """Whether following ``path`` runs into a symbolic link loop (``Path.exists()`` is False then)."""
    try:
        os.stat(path)
    except OSError as err:
        return err.errno == errno.ELOOP
    except ValueError:  # a NUL byte in the name
        return False
    return False


def missing_path(path: str | os.PathLike[str], reason: str = "no such file or folder") -> DataError:
    """The error for an input path that cannot be followed: a symbolic link loop, or else ``reason``."""
    if is_link_loop(path):
        return DataError(path, "symbolic link loop: following its links never reaches a file or folder")
    return DataError(path, reason)


def check_output(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = (), *,
                 kind: str = "output", foreign: Callable[[Path], str | None] | None = None,
                 overwrite: bool = False, flag: str = "--overwrite") -> None:
    """Refuse an output path that would overwrite an input or something twinview did not write.

    ``OutputError`` naming ``out`` when (symbolic links resolved) it is, contains or lies inside one of
    ``inputs``; when it is an existing file (or a link loop); and, with ``foreign`` (for outputs that
    replace the folder as a whole), when it is a symbolic link, or a non-empty folder for which
    ``foreign(out)`` gives a reason why it is not an earlier twinview ``kind``, or is one and
    ``overwrite`` is off. A missing path or an empty folder passes.
    """
    out = Path(out)
    real = Path(os.path.realpath(out))
    for item in inputs:
        source = Path(os.path.realpath(item))
        relation = ("is" if real == source else "contains" if source.is_relative_to(real)
                    else "lies inside" if real.is_relative_to(source) else None)
        if relation:
            raise OutputError(out, f"{relation} the input {display_path(item)}; outputs never overwrite "
                                   "inputs: choose another output folder")
    if is_link_loop(out):
        raise OutputError(out, "symbolic link loop; choose another output folder")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise OutputError(out, f"exists and is not a folder; the {kind} is written as a folder: "
                               "choose another path")
    if foreign is None:
        return
    if os.path.islink(out):  # the folder is replaced as a whole: that must be the folder itself
        raise OutputError(out, f"a symbolic link; give the folder it points to ({display_path(real)}) "
                               "or a new one")
    if not any(out.iterdir()):
        return
    reason = foreign(out)
    if reason is not None:
        raise OutputError(out, f"a folder that twinview did not write as a {kind} ({reason}); it is left "
                               "as it is: choose a new or empty folder")
    if not overwrite:
        raise OutputError(out, f"holds an earlier twinview {kind}; pass {flag} to replace it")
