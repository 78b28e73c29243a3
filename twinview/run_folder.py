"""One run folder for every kind of run: create it, refuse to overwrite it, resume it, lock it.

A run folder holds ``config.yaml`` (the resolved settings), ``provenance.json`` (one entry per start
or resume: version, commit, command, packages, machine), the checkpoints and the run's results. A run
that resumes must ask for the settings it was made with; only the keys in ``may_change`` (how long to
train, how to show progress, where to compute) may differ. While a process writes to the folder it
holds ``run.lock`` (its pid and host); a lock left by a process that no longer runs is taken over.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from twinview.errors import TwinviewError, display_path
from twinview.files import write_text_atomic

CONFIG_FILE, PROVENANCE_FILE, LOCK_FILE = "config.yaml", "provenance.json", "run.lock"
RESUMABLE_KEYS = frozenset({
    "out_dir", "train.epochs", "train.steps", "train.max_steps", "train.progress", "train.device",
    "train.ckpt_every_steps", "train.keep_last", "train.log_every_steps", "data.workers",
})
"""Settings a resumed run may change: its length, its bookkeeping and where it computes."""


class RunFolderError(TwinviewError):
    """A run folder that cannot be created, resumed or locked as asked."""


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"steps": 5}}`` -> ``{"train.steps": 5}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_keys(saved: Mapping[str, Any], requested: Mapping[str, Any],
                 defaults: Mapping[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ, with (saved, requested) values. A key that ``saved`` lacks (an
    option added since that run) does not differ while it is requested at its value in ``defaults``."""
    old, new = flatten(saved), flatten(requested)
    known = flatten(defaults) if defaults is not None else {}
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not (k not in old and k in known and new.get(k) == known[k])}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunFolder:
    """A run's folder; ``final`` names the file whose presence means training finished."""

    path: Path
    final: str

    @property
    def finished(self) -> bool:
        return (self.path / self.final).exists()

    def holds_run(self) -> bool:
        return (self.path / CONFIG_FILE).exists() or any(self.path.glob("ckpt-*.pt")) or self.finished

    @classmethod
    def open(cls, path: str | os.PathLike[str], final: str, config: Mapping[str, Any], resume: bool,
             may_change: Iterable[str] = RESUMABLE_KEYS, defaults: Mapping[str, Any] | None = None
             ) -> RunFolder:
        """A new run in ``path`` (which must not hold anything) or, with ``resume``, the run already
        there, checked to have been made with ``config`` but for ``may_change`` (and for options added
        since, requested at their ``defaults``)."""
        run = cls(Path(path), final)
        where = display_path(run.path)
        if run.path.exists() and not run.path.is_dir():
            raise RunFolderError(f"{where}: is a file, not a run folder")
        if not resume:
            if run.path.is_dir() and run.holds_run():
                raise RunFolderError(f"{where}: already holds a run; resume it with --resume {where} "
                                     "or choose another out_dir")
            if run.path.is_dir() and any(run.path.iterdir()):
                raise RunFolderError(f"{where}: not empty and not a twinview run; choose another out_dir")
            return run
        if not run.path.is_dir() or not run.holds_run():
            raise RunFolderError(f"{where}: no run to resume here")
        saved_file = run.path / CONFIG_FILE
        if saved_file.exists():
            saved = yaml.safe_load(saved_file.read_text()) or {}
            allowed = set(may_change)
            differ = {k: v for k, v in changed_keys(saved, config, defaults).items() if k not in allowed}
            if differ:
                detail = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differ.items())
                raise RunFolderError(f"{display_path(saved_file)}: the run was made with other settings "
                                     f"({detail}); start a new run for them")
        return run

    def save_config(self, config: Mapping[str, Any]) -> None:
        """Write the resolved config atomically."""
        write_text_atomic(self.path / CONFIG_FILE, yaml.safe_dump(dict(config), sort_keys=False))

    def record(self, provenance: Mapping[str, Any]) -> None:
        """Append one session (start or resume) to ``provenance.json``."""
        path = self.path / PROVENANCE_FILE
        sessions = json.loads(path.read_text())["sessions"] if path.exists() else []
        write_text_atomic(path, json.dumps({"sessions": [*sessions, dict(provenance)]}, indent=2) + "\n")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``run.lock`` while the body runs; another live holder is an error naming its pid."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK_FILE
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_stale(lock)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            break
        else:
            raise RunFolderError(f"{display_path(lock)}: could not take the lock")
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                if json.loads(lock.read_text()).get("pid") == me["pid"]:
                    lock.unlink()

    @staticmethod
    def _check_stale(lock: Path) -> None:
        """Remove a lock whose process is gone; raise if its holder may still run."""
        try:
            holder = json.loads(lock.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            holder, pid, host = {}, -1, socket.gethostname()
        where = display_path(lock)
        if host != socket.gethostname():
            raise RunFolderError(f"{where}: the run is locked by pid {pid} on {host}; if no process "
                                 "there writes to it any more, delete the lock file")
        if pid > 0 and _pid_alive(pid):
            raise RunFolderError(f"{where}: another twinview process (pid {pid}, since "
                                 f"{holder.get('since', '?')}) is writing to this run; wait for it or "
                                 "choose another out_dir")
        print(f"twinview: note: {where}: stale lock of pid {pid} (no longer running) taken over",
              file=sys.stderr)
        lock.unlink(missing_ok=True)
