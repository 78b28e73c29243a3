"""The ``twinview`` command: help, exit codes, JSON output, and the demo end to end (slow)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO
from twinview_cli.main import main

SUBCOMMANDS = (["data"], ["data", "inspect"], ["data", "synth"], ["data", "coco"], ["pretrain"], ["views"],
               ["demo"], ["seg"], ["seg", "train"], ["seg", "predict"], ["seg", "eval"], ["reid"],
               ["reid", "train"], ["reid", "eval"], ["reid", "index"], ["reid", "query"], ["export"], ["app"],
               ["app", "retrieval"], ["app", "segmentation"])


def test_help_lists_every_subcommand() -> None:
    out = subprocess.run([sys.executable, "-m", "twinview_cli", "--help"], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    for name in ("data", "pretrain", "views", "seg", "reid", "demo"):
        assert f"    {name}" in out


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_each_subcommand_has_help(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    assert exit_.value.code == 0
    assert f"usage: twinview {' '.join(words)}" in capsys.readouterr().out


def test_inspect_prints_json_and_exits_0_on_good_data(synth_market: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "inspect", str(synth_market)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "market1501" and report["problems"] == []
    assert report["splits"]["query"]["ids"] > 0


def test_inspect_exits_1_and_lists_a_truncated_file(synth_market: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "market"
    shutil.copytree(synth_market, copy)
    victim = sorted((copy / "query").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])
    assert main(["data", "inspect", str(copy)]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [p["file"] for p in problems] == [str(victim)]


def test_inspect_exits_2_with_a_message_on_an_empty_folder(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twinview: error: ") and str(tmp_path) in err


def test_synth_writes_then_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", "nuclei", "--out", str(tmp_path / "n"), "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "nuclei" and summary["seed"] == 3
    before = sorted(p.name for p in (tmp_path / "n").iterdir())
    assert main(["data", "synth", "nuclei", "--out", str(tmp_path / "n")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == before


def test_views_writes_a_png_grid(synth_market: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    assert main(["views", "reid", str(synth_market), "--out", str(out), "--samples", "2"]) == 0
    width, height = Image.open(out).size
    assert height == 2 * 128 and width > height


@pytest.mark.realdata
@pytest.mark.parametrize("name, fmt", [("Market-1501-mini", "market1501"), ("Task04_Hippocampus", "msd"),
                                       ("dsb2018-nuclei", "dsb2018")])
def test_inspect_reports_the_real_data(name: str, fmt: str, shared_data: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "inspect", str(shared_data / name)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == fmt and report["problems"] == []


@pytest.mark.slow
def test_demo_runs_every_stage_quickly(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "twinview_cli", "demo", "--out", str(out), "--quick"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert set(summary) >= {"pretrained", "random_init"}
    assert (out / "pretrain_simclr" / "encoder.pt").exists()
    assert (out / "pretrain_simclr" / "loss_curve.png").exists()
    seg = json.loads((out / "seg_summary.json").read_text())
    assert seg["labelled_volumes"] == 1 and seg["seeds"] == [0]
    for arm in ("pretrained", "random"):
        assert 0.0 <= seg[arm]["dice_mean"] <= 1.0
        assert seg[arm]["dice_mean"] == seg[arm]["runs"][0]["test"]["dice_mean"]
    assert (out / "seg" / "runs" / "pretrained_n1_s0" / "model.pt").exists()
    assert (out / "seg" / "runs" / "random_n1_s0" / "model.json").exists()
    assert (out / "pretrain_seg_simclr" / "encoder.pt").exists()
    reid = json.loads((out / "reid_summary.json").read_text())
    assert all(0.0 < reid[arm]["rank1"] <= 1.0 for arm in ("pretrained", "random"))
    assert "4/5 re-ID" in done.stdout and f"Results are in {out.resolve()}" in done.stdout
    from twinview.model_card import read_onnx_card

    assert read_onnx_card(out / "models" / "reid.onnx")["task"] == "reid"
    assert read_onnx_card(out / "models" / "segmentation.onnx")["task"] == "segmentation"
    assert f"twinview app retrieval --demo-out {out}" in done.stdout
    assert f"twinview app segmentation --demo-out {out}" in done.stdout


def test_app_without_a_model_says_how_to_make_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["app", "segmentation", "--demo-out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "models/segmentation.onnx" in err and "make demo" in err and "twinview export" in err
    assert main(["app", "retrieval", "--model", str(tmp_path / "nope.onnx")]) == 2
    assert "nope.onnx: no such ONNX file" in capsys.readouterr().err


def test_app_command_runs_the_app_script_headless() -> None:
    from twinview_cli.launch import APPS_DIR, app_command

    cmd = app_command("retrieval", 8600, 20)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(APPS_DIR / "retrieval_app.py")
    assert cmd[cmd.index("--server.port"):][:2] == ["--server.port", "8600"]
    assert cmd[cmd.index("--server.maxUploadSize"):][:2] == ["--server.maxUploadSize", "20"]


def test_version_prints_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    from twinview.provenance import twinview_version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"twinview {twinview_version()}"


def test_a_mistyped_flag_shows_its_subcommands_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["seg", "train", "--labl-fraction", "0.5"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "usage: twinview seg train" in err
    assert "unrecognized arguments: --labl-fraction 0.5" in err


def test_print_config_shows_the_resolved_config_and_runs_nothing(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    code = main(["seg", "train", "--config", str(REPO / "configs/seg/hippocampus2d.yaml"), "--label-fraction",
                 "0.25", "--label-cases", "2", "--set", f"out_dir={tmp_path / 'run'}", "--print-config"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert code == 0 and shown["data"]["label_fraction"] == 0.25 and shown["model"]["arch"] == "flexunet"
    assert shown["data"]["label_cases"] == 2
    assert not (tmp_path / "run").exists()


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("twinview: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "<no path>" not in err
    return err


def test_user_mistakes_are_one_line_errors(tmp_path: Path, synth_market: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    err = one_line_error(capsys, ["seg", "predict", str(synth_market), "--model", str(tmp_path / "nope"),
                                  "--out", str(tmp_path / "masks")])
    assert str(tmp_path / "nope") in err
    err = one_line_error(capsys, ["reid", "query", str(tmp_path / "no_index"),
                                  str(next((synth_market / "query").iterdir()))])
    assert "no_index" in err
    err = one_line_error(capsys, ["views", "ct", str(synth_market), "--out", str(tmp_path / "v.png"), "--3d"])
    assert "3D views need an MSD folder" in err
    err = one_line_error(capsys, ["pretrain", "--set", f"data.path={synth_market}", "--set", "optim.lr=-0.1",
                                  "--set", f"out_dir={tmp_path / 'lr'}"])
    assert err == "twinview: error: optim.lr: -0.1 is not > 0\n" and not (tmp_path / "lr").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path: Path, synth_market: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    err = one_line_error(capsys, ["pretrain", "--set", f"data.path={synth_market}", "--set",
                                  "train.device=cuda", "--set", f"out_dir={tmp_path / 'run'}"])
    assert "no CUDA device" in err and not (tmp_path / "run").exists()


def fake_seg_run(path: Path, fraction: float, data: Path) -> None:
    from downstream.seg.config import SegConfig
    from twinview.config import load_config, save_config

    path.mkdir()
    save_config(load_config(SegConfig, REPO / "configs/seg/hippocampus2d.yaml",
                            [f"out_dir={path}", f"data.label_fraction={fraction}", f"data.path={data}",
                             "data.test_cases=2", "data.val_cases=1"]), path / "config.yaml")
    (path / "ckpt-00000010.pt").write_bytes(b"not read: the settings are compared first")


def test_resume_refuses_a_changed_label_fraction_and_an_existing_run_is_not_overwritten(
        tmp_path: Path, synth_msd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    fake_seg_run(run, 0.1, synth_msd)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    err = one_line_error(capsys, ["seg", "train", "--resume", str(run), "--label-fraction", "0.5"])
    assert "data.label_fraction: 0.1 -> 0.5" in err
    err = one_line_error(capsys, ["seg", "train", "--config", str(run / "config.yaml")])
    assert "already holds a run" in err and f"--resume {run}" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_run_another_process_writes_to_is_refused(tmp_path: Path, synth_msd: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import os

    from twinview.run_folder import RunFolder

    run = tmp_path / "run"
    fake_seg_run(run, 0.1, synth_msd)
    with RunFolder(run, "model.pt").lock():  # a run in progress holds the folder
        err = one_line_error(capsys, ["seg", "train", "--resume", str(run)])
    assert f"another twinview process (pid {os.getpid()}" in err
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-00000010.pt", "config.yaml"]
