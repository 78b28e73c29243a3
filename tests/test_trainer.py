"""The one trainer: outputs of a run, every method through it, resume after SIGKILL, NaN stop."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from engine.checkpoint import list_checkpoints, load_checkpoint
from pretrain.config import PretrainConfig
from pretrain.encoders import build_encoder
from twinview.config import load_config
from twinview.run_folder import RunFolderError


def tiny_overrides(data: Path, run: Path, kind: str = "market1501") -> list[str]:
    views, size, channels = {"market1501": ("reid", "[16,8]", 3), "msd_slices": ("mri", "[16,16]", 1),
                             "msd_3d": ("mri", "[16,16,16]", 1)}[kind]
    return [f"out_dir={run}", f"data.path={data}", f"data.kind={kind}", f"data.views={views}",
            f"data.size={size}", f"data.channels={channels}", "model.small_stem=true",
            "method.proj_hidden=64", "method.proj_out=32", "method.pred_hidden=32", "method.queue_size=64",
            "train.batch_size=16", "train.epochs=2", "train.progress=false", "train.ckpt_every_steps=3",
            "train.log_every_steps=1", "train.knn_every_epochs=0", "train.keep_last=2"]


def tiny_config(data: Path, run: Path, *extra: str, kind: str = "market1501") -> PretrainConfig:
    return load_config(PretrainConfig, None, [*tiny_overrides(data, run, kind), *extra])


def test_a_run_writes_checkpoints_logs_plots_and_encoder(synth_market: Path, tmp_path: Path) -> None:
    from pretrain.trainer import run_pretraining

    run = tmp_path / "run"
    result = run_pretraining(tiny_config(synth_market, run))
    assert result.steps > 3 and torch.isfinite(torch.tensor(result.final_loss))
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(1, result.steps + 1))
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    assert load_config(PretrainConfig, run / "config.yaml").out_dir == str(run)
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())
    ckpts = list_checkpoints(run)
    assert len(ckpts) == 2 and ckpts[-1].name == f"ckpt-{result.steps:08d}.pt"
    saved = torch.load(result.encoder_path, weights_only=True)
    encoder = build_encoder("resnet18", in_channels=3, spatial_dims=2, small_stem=True)
    encoder.load_state_dict(saved["encoder"])
    assert saved["encoder_config"]["size"] == [16, 8]
    assert 0.0 <= result.monitor["rank1"] <= 1.0 and (run / "embedding_map.png").exists()
    from twinview.model_card import check_weights, read_card

    card = read_card(run / "model.json")
    check_weights(card, run)
    assert card["task"] == "pretraining" and card["pretraining_method"] == "simclr"
    assert card["input_size"] == [16, 8] and card["embedding_size"] == 512
    assert card["preprocessing"]["intensity"]["kind"] == "mean_std"
    sessions = json.loads((run / "provenance.json").read_text())["sessions"]
    assert len(sessions) == 1 and sessions[0]["packages"]["torch"] == torch.__version__.split("+")[0]
    assert not (run / "run.lock").exists()


@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "simsiam"])
def test_every_method_trains_through_the_same_loop(method: str, synth_market: Path, tmp_path: Path) -> None:
    from pretrain.trainer import run_pretraining

    cfg = tiny_config(synth_market, tmp_path / method, f"method.name={method}", "train.max_steps=3")
    result = run_pretraining(cfg)
    assert result.steps == 3
    state = load_checkpoint(list_checkpoints(tmp_path / method)[-1])
    before = build_encoder("resnet18", in_channels=3, spatial_dims=2, small_stem=True).state_dict()
    after = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    assert after.keys() == before.keys()
    assert torch.isfinite(torch.tensor(result.final_loss))


@pytest.mark.parametrize("kind", ["msd_slices", "msd_3d"])
def test_scans_as_slices_and_as_volumes(kind: str, synth_msd: Path, tmp_path: Path) -> None:
    from pretrain.trainer import run_pretraining

    cfg = tiny_config(synth_msd, tmp_path / kind, "train.max_steps=2", "train.batch_size=4", kind=kind)
    result = run_pretraining(cfg)
    saved = torch.load(result.encoder_path, weights_only=True)
    assert saved["encoder_config"]["spatial_dims"] == (3 if kind == "msd_3d" else 2)
    assert saved["encoder_config"]["in_channels"] == 1


def test_existing_run_is_not_overwritten(synth_market: Path, tmp_path: Path) -> None:
    from pretrain.trainer import run_pretraining

    cfg = tiny_config(synth_market, tmp_path / "run", "train.max_steps=3")
    run_pretraining(cfg)
    before = {p.name: p.stat().st_mtime_ns for p in list_checkpoints(tmp_path / "run")}
    with pytest.raises(RunFolderError, match="--resume"):
        run_pretraining(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in list_checkpoints(tmp_path / "run")} == before


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(synth_market: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import pretrain.trainer as trainer

    real_build = trainer.build_model

    def poisoned(cfg: PretrainConfig, spatial_dims: int) -> torch.nn.Module:
        model = real_build(cfg, spatial_dims)
        calls = {"n": 0}
        forward = model.forward

        def forward_nan_at_step_5(views: list[torch.Tensor]) -> torch.Tensor:
            calls["n"] += 1
            loss = forward(views)
            return loss * float("nan") if calls["n"] == 5 else loss

        model.forward = forward_nan_at_step_5
        return model

    monkeypatch.setattr(trainer, "build_model", poisoned)
    run = tmp_path / "run"
    with pytest.raises(trainer.NonFiniteLossError, match=r"at step 5 .*ckpt-00000003\.pt"):
        trainer.run_pretraining(tiny_config(synth_market, run))
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == ["ckpt-00000003.pt"]
    state = load_checkpoint(ckpts[0])
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (run / "encoder.pt").exists()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "twinview_cli", "pretrain", *args]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(synth_market: Path, tmp_path: Path) -> None:
    from twinview.data.market1501 import read_market1501

    steps_per_epoch = len(read_market1501(synth_market).train) // 16
    assert steps_per_epoch >= 4
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Checkpoints every steps_per_epoch + 1 steps fall inside an epoch, never on its boundary.
    overrides = [*tiny_overrides(synth_market, tmp_path / "killed"), "train.deterministic=true",
                 "train.epochs=3", "train.amp=fp32", f"train.ckpt_every_steps={steps_per_epoch + 1}"]
    args = [a for o in overrides for a in ("--set", o)]
    killed = subprocess.Popen(_cli(*args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    first = tmp_path / "killed" / f"ckpt-{steps_per_epoch + 1:08d}.pt"
    deadline = time.monotonic() + 240
    while not first.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read().decode()[-2000:]
    assert not (tmp_path / "killed" / "encoder.pt").exists(), "the run finished before it was killed"
    resume_from = load_checkpoint(list_checkpoints(tmp_path / "killed")[-1])
    assert resume_from["step_in_epoch"] > 0, "the kill was meant to land mid-epoch"
    subprocess.run(_cli("--resume", str(tmp_path / "killed")), cwd=REPO, env=env, check=True,
                   capture_output=True)

    straight = [a.replace(str(tmp_path / "killed"), str(tmp_path / "straight")) for a in args]
    subprocess.run(_cli(*straight), cwd=REPO, env=env, check=True, capture_output=True)
    a = torch.load(tmp_path / "killed" / "encoder.pt", weights_only=True)["encoder"]
    b = torch.load(tmp_path / "straight" / "encoder.pt", weights_only=True)["encoder"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    final_a = load_checkpoint(list_checkpoints(tmp_path / "killed")[-1])
    final_b = load_checkpoint(list_checkpoints(tmp_path / "straight")[-1])
    assert final_a["step"] == final_b["step"] == 3 * steps_per_epoch
    assert all(torch.equal(final_a["model"][k], final_b["model"][k]) for k in final_b["model"])


@pytest.mark.slow
def test_torchrun_two_cpu_processes_share_one_run(synth_market: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    overrides = [*tiny_overrides(synth_market, run), "method.name=moco", "method.queue_size=256",
                 "train.max_steps=3", "train.amp=fp32"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "twinview_cli", "pretrain", *[a for o in overrides for a in ("--set", o)]]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpts = list_checkpoints(run)
    assert ckpts[-1].name == "ckpt-00000003.pt"  # one writer: rank 0
    state = load_checkpoint(ckpts[-1])
    # Each step enqueues the keys of both views from both ranks: 3 steps x 2 views x 16 x 2 ranks.
    assert int(state["model"]["queue_ptr"]) == (3 * 2 * 16 * 2) % 256
    with (run / "metrics.csv").open() as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2, 3]
