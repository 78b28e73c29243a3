"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename.

A run folder holds ``ckpt-<step>.pt`` files (the last k are kept) and ``last.pt``-style lookup is
done by step number, so a run killed at any moment resumes from a complete file. Files are read
back with ``torch.load(..., weights_only=True)``: they hold tensors and plain Python values only.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twinview.errors import DataError

_CKPT = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointError(DataError, RuntimeError):
    """A checkpoint (or model, encoder) file that cannot be written or read back: names the file."""


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` so that readers see the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(err, Exception):  # Ctrl-C and exits pass through as they are
            raise
        free_mb = shutil.disk_usage(path.parent).free / 2**20
        raise CheckpointError(path, f"not written ({err}); {free_mb:.0f} MB free on its disk; the files "
                                    "already there are unchanged") from err


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / f"ckpt-{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run folder, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_rotating(obj: Any, run_dir: Path, step: int, keep_last: int) -> Path:
    """Save ``ckpt-<step>.pt`` atomically, then delete all but the newest ``keep_last``."""
    path = checkpoint_path(run_dir, step)
    atomic_save(obj, path)
    for old in list_checkpoints(run_dir)[:-max(keep_last, 1)]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a broken file is a ``CheckpointError`` naming it."""
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    except IsADirectoryError:
        raise CheckpointError(path, "a folder, not a checkpoint file") from None
    except pickle.UnpicklingError as err:  # torch's text suggests weights_only=False: never for us
        raise CheckpointError(path, "not a readable twinview checkpoint: holds objects other than tensors "
                                    "and plain values (or is a plain pickle); not loaded") from err
    except OSError as err:
        raise CheckpointError(path, f"cannot read the file: {err.strerror or type(err).__name__}") from err
    except Exception as err:  # torch raises several types for truncated or foreign files
        first = (str(err).strip().splitlines() or [""])[0]
        if (isinstance(err, RuntimeError) and first
                and not any(w in first for w in ("PytorchStreamReader", "weights_only", "Unpickler"))):
            reason = f"cannot be loaded: {first[:200]}"  # e.g. CUDA tensors on a machine without CUDA
        else:
            reason = "not a readable twinview checkpoint: truncated or not a torch file"
        raise CheckpointError(path, reason) from err


def load_payload(path: Path, required_keys: Sequence[str] | Sequence[Sequence[str]], what: str,
                 map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``path`` with :func:`load_checkpoint` and check that it is a dict holding ``required_keys``
    (one tuple of keys, or a list of alternative tuples); otherwise a ``CheckpointError`` (a
    ``DataError``) that names the file and says it is not a twinview ``what`` file."""
    alternatives = ([tuple(required_keys)] if all(isinstance(k, str) for k in required_keys)
                    else [tuple(keys) for keys in required_keys])
    wanted = " or ".join(" + ".join(keys) for keys in alternatives)
    prefix = "not a readable twinview checkpoint: "
    try:
        payload = load_checkpoint(path, map_location=map_location)
    except CheckpointError as err:
        if not err.reason.startswith(prefix):  # missing, unreadable, no CUDA: not about the content
            raise
        raise CheckpointError(path, f"not a twinview {what} file: {err.reason.removeprefix(prefix)}") from err
    if not isinstance(payload, dict):
        raise CheckpointError(path, f"not a twinview {what} file: it holds a {type(payload).__name__}, "
                                    f"not a dict of {wanted}")
    if not any(all(k in payload for k in keys) for keys in alternatives):
        found = ", ".join(sorted(map(str, payload))[:8]) or "nothing"
        raise CheckpointError(path, f"not a twinview {what} file: it holds {found}, not {wanted}")
    return payload


def load_weights_file(path: str | Path, file_name: str, kind: str, expected: Mapping[str, object],
                      hint: str, fits: str = "this model") -> tuple[dict[str, Any], dict[str, Any], Path]:
    """Read a run's ``file_name`` (``path`` is the file or its run folder): its ``kind`` tensors,
    ``{kind}_config`` metadata and the file read, after checking every ``expected`` metadata value.

    A missing file, a link loop, metadata that is not a mapping or any difference from ``expected`` is a
    ``ConfigError`` naming the file (``hint`` says what to pass instead); a file that is no twinview
    ``kind`` file (a bare tensor, a plain pickle, a truncated file) a ``DataError``.
    """
    from twinview.config import ConfigError
    from twinview.errors import is_link_loop

    path = Path(path)
    path = path / file_name if path.is_dir() else path
    if is_link_loop(path):
        raise ConfigError(path, f"symbolic link loop; {hint}")
    if not path.exists():
        raise ConfigError(path, f"no {kind} weights here; {hint}")
    payload = load_payload(path, (kind, f"{kind}_config"), kind)
    meta = payload[f"{kind}_config"]
    if not isinstance(meta, dict):
        raise ConfigError(path, f"not a twinview {kind} file: its {kind}_config is not a mapping")
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: {kind} has {a!r}, model needs {b!r}" for k, (a, b) in wrong.items())
        raise ConfigError(path, f"{kind} does not fit {fits} ({detail})")
    return payload[kind], meta, path


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
