"""Where a result came from: twinview's version and commit, the command, the packages and the machine.

Every run folder records this (``provenance.json``) and the benchmark scripts print the machine line.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "torchvision", "monai", "segmentation-models-pytorch", "albumentations", "numpy",
            "scikit-learn", "faiss-cpu", "onnx", "onnxruntime", "nibabel", "pydicom")


def twinview_version() -> str:
    try:
        return metadata.version("twinview")
    except metadata.PackageNotFoundError:
        from twinview import __version__

        return __version__


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def git_commit() -> dict[str, Any] | None:
    """The commit of the checkout twinview runs from and whether it has uncommitted changes; None
    for an installed copy or where git is missing."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"sha": sha, "dirty": bool(dirty)}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def collect(argv: list[str] | None = None, devices: dict[str, Any] | None = None) -> dict[str, Any]:
    """One session's provenance; ``devices`` adds what only torch knows (threads, GPUs)."""
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "twinview_version": twinview_version(),
        "git": git_commit(),
        "command": list(sys.argv if argv is None else argv),
        "python": platform.python_version(),
        "packages": package_versions(),
        "machine": {"host": socket.gethostname(), "platform": platform.platform(), "cpu": cpu_name(),
                    "cores": cpu_cores(), **(devices or {})},
    }
