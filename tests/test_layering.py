"""The house's layers, held by reading every import (lazy ones inside functions too).

``twinview_cli`` -> ``downstream`` -> ``pretrain`` -> ``engine`` -> ``twinview`` (ground floor);
``apps`` -> ``twinview``. The ground floor and the apps import no torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

TORCH = {"torch", "torchvision", "monai", "segmentation_models_pytorch", "lightly"}
LAYERS = ["twinview", "engine", "pretrain", "downstream", "twinview_cli"]  # bottom to top
FORBIDDEN: dict[str, set[str]] = {
    **{layer: set(LAYERS[i + 1:]) | {"apps"} for i, layer in enumerate(LAYERS)},
    "apps": {"engine", "pretrain", "downstream", "twinview_cli"},
}
FORBIDDEN["twinview"] |= TORCH
FORBIDDEN["apps"] |= TORCH


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(root: Path) -> list[str]:
    """Every import that runs against the layers, as ``file:line: package imports module``."""
    out = []
    for package, banned in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, module in imports(path):
                if module in banned:
                    out.append(f"{path.relative_to(root)}:{line}: {package} imports {module}")
    return out


def test_the_house_keeps_its_layers() -> None:
    assert violations(REPO) == []


def test_a_planted_violation_is_caught(tmp_path: Path) -> None:
    for package in [*LAYERS, "apps"]:
        (tmp_path / package).mkdir()
    (tmp_path / "twinview" / "reader.py").write_text("def f():\n    import torch.nn\n")
    (tmp_path / "pretrain" / "method.py").write_text("from downstream.seg import model\n")
    (tmp_path / "apps" / "page.py").write_text("import numpy\n\ndef g():\n    from monai import data\n")
    (tmp_path / "engine" / "loop.py").write_text("from twinview.errors import DataError\nimport torch\n")
    assert violations(tmp_path) == ["twinview/reader.py:2: twinview imports torch",
                                    "pretrain/method.py:1: pretrain imports downstream",
                                    "apps/page.py:4: apps imports monai"]


def test_the_ground_floor_runs_without_torch() -> None:
    """Every ground-floor module imports with torch made unimportable."""
    modules = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                     for p in (REPO / "twinview").rglob("*.py"))
    code = ("import sys; sys.modules['torch'] = None\n"
            f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
