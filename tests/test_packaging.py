"""The project's packaging files agree with each other and the CLI is installed."""

from __future__ import annotations

import re
import subprocess
import sys

import tomllib
import yaml

from conftest import REPO


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower()


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    reqs = project["dependencies"] + extras["test"] + extras["apps"] + extras["export"]
    return {_name(r): r.replace(" ", "") for r in reqs}


def _environment_requirements() -> dict[str, str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml must have exactly one pip: section"
    return {_name(r): r.replace(" ", "") for r in pip_lists[0] if not r.startswith("-e")}


def test_environment_yml_matches_pyproject() -> None:
    assert _environment_requirements() == _pyproject_requirements()


def test_torch_pinned_exactly_once() -> None:
    reqs = _pyproject_requirements()
    assert reqs["torch"] == "torch==2.14.1"
    assert reqs["torchvision"] == "torchvision==0.29.1"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    install_files = [f for f in tracked if f.endswith((".toml", ".txt", ".cfg", "Makefile", ".ci/run"))]
    pins = [f for f in install_files if "torch==" in (REPO / f).read_text(errors="ignore")]
    assert pins == ["pyproject.toml"]


def test_console_command_lists_subcommands() -> None:
    out = subprocess.run([sys.executable, "-m", "twinview_cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for sub in ("data", "demo"):
        assert sub in out


def test_the_apps_and_export_extras_hold_what_only_they_import() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    base = {_name(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert {"streamlit", "onnxruntime"} <= {_name(r) for r in extras["apps"]}
    assert {"onnx", "onnxscript"} <= {_name(r) for r in extras["export"]}
    assert not base & {"streamlit", "onnxruntime", "onnx", "onnxscript"}
