"""The one run folder: create, refuse to overwrite, resume only under the same settings, lock, provenance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from twinview.run_folder import LOCK_FILE, RunFolder, RunFolderError, changed_keys

CONFIG = {"out_dir": "runs/x", "data": {"path": "d", "label_fraction": 0.1},
          "train": {"steps": 100, "progress": True, "seed": 0}}


def made_run(tmp_path: Path, config: dict = CONFIG) -> Path:
    run = RunFolder.open(tmp_path / "run", "model.pt", config, resume=False)
    run.save_config(config)
    (run.path / "ckpt-00000010.pt").write_bytes(b"x")
    return run.path


def test_a_new_run_needs_an_empty_or_missing_folder(tmp_path: Path) -> None:
    assert RunFolder.open(tmp_path / "new", "model.pt", CONFIG, resume=False).path == tmp_path / "new"
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("precious")
    with pytest.raises(RunFolderError, match="not empty and not a twinview run"):
        RunFolder.open(tmp_path / "thesis", "model.pt", CONFIG, resume=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        RunFolder.open(tmp_path / "file", "model.pt", CONFIG, resume=False)
    path = made_run(tmp_path)
    with pytest.raises(RunFolderError, match=f"already holds a run; resume it with --resume {path}"):
        RunFolder.open(path, "model.pt", CONFIG, resume=False)


def test_resume_refuses_changed_settings_and_names_the_keys(tmp_path: Path) -> None:
    path = made_run(tmp_path)
    changed = {**CONFIG, "data": {"path": "d", "label_fraction": 0.5}}
    with pytest.raises(RunFolderError) as err:
        RunFolder.open(path, "model.pt", changed, resume=True)
    assert "data.label_fraction: 0.1 -> 0.5" in str(err.value) and "config.yaml" in str(err.value)
    assert yaml.safe_load((path / "config.yaml").read_text())["data"]["label_fraction"] == 0.1
    longer = {**CONFIG, "train": {"steps": 300, "progress": False, "seed": 0}, "out_dir": "moved"}
    assert RunFolder.open(path, "model.pt", longer, resume=True).path == path  # may change: length, display
    with pytest.raises(RunFolderError, match="train.seed: 0 -> 1"):
        RunFolder.open(path, "model.pt", {**CONFIG, "train": {**CONFIG["train"], "seed": 1}}, resume=True)
    with pytest.raises(RunFolderError, match="no run to resume"):
        RunFolder.open(tmp_path / "elsewhere", "model.pt", CONFIG, resume=True)


def test_changed_keys_flattens_nested_settings() -> None:
    assert changed_keys({"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 1, "c": [1, 3]}, "d": 0}) == {
        "a.c": ([1, 2], [1, 3]), "d": (None, 0)}


def test_an_option_added_since_the_run_counts_only_off_its_default(tmp_path: Path) -> None:
    path = made_run(tmp_path)
    defaults = {**CONFIG, "model": {"decoder_weights": ""}}
    added = {**CONFIG, "model": {"decoder_weights": ""}}  # the saved run predates model.decoder_weights
    assert RunFolder.open(path, "model.pt", added, resume=True, defaults=defaults).path == path
    with pytest.raises(RunFolderError, match="model.decoder_weights: None -> 'runs/local'"):
        RunFolder.open(path, "model.pt", {**CONFIG, "model": {"decoder_weights": "runs/local"}}, resume=True,
                       defaults=defaults)
    with pytest.raises(RunFolderError, match="model.decoder_weights"):  # without the defaults: a change
        RunFolder.open(path, "model.pt", added, resume=True)


def test_a_live_lock_is_refused_and_a_stale_one_taken_over(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = RunFolder(tmp_path / "run", "model.pt")
    with run.lock():
        assert json.loads((run.path / LOCK_FILE).read_text())["pid"] == os.getpid()
        busy = f"another twinview process \\(pid {os.getpid()}"
        with pytest.raises(RunFolderError, match=busy), run.lock():
            pass
    assert not (run.path / LOCK_FILE).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    import socket

    (run.path / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "x"}))
    with run.lock():
        assert json.loads((run.path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"stale lock of pid {pid}" in capsys.readouterr().err


def test_provenance_appends_one_session_per_start(tmp_path: Path) -> None:
    from twinview import provenance

    run = RunFolder(tmp_path / "run", "model.pt")
    run.record(provenance.collect(["twinview", "seg", "train"], {"torch_threads": 2, "gpus": []}))
    run.record(provenance.collect(["twinview", "seg", "train", "--resume", "run"]))
    sessions = json.loads((run.path / "provenance.json").read_text())["sessions"]
    assert [s["command"][-1] for s in sessions] == ["train", "run"]
    first = sessions[0]
    assert first["twinview_version"] and first["machine"]["cores"] >= 1 and first["machine"]["cpu"]
    assert first["machine"]["torch_threads"] == 2 and "numpy" in first["packages"]
    assert first["git"] is None or len(first["git"]["sha"]) == 40
