"""Optimisers, the schedule, and checkpoint files (atomic writes, rotation, RNG round trip)."""

from __future__ import annotations

import errno
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.checkpoint import (
    atomic_save,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_rotating,
    set_rng_state,
)
from engine.optim import param_groups, warmup_cosine
from pretrain.config import OptimConfig
from pretrain.optim import LARS, build_optimizer


def test_lars_scales_matrices_by_the_trust_ratio_and_leaves_vectors_alone() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=0.1, momentum=0.0, weight_decay=0.0, eta=0.01)
    w.grad = torch.tensor([[0.0, 2.0]])  # ||g|| = 2 -> trust = 0.01 * 5 / 2 = 0.025
    b.grad = torch.tensor([2.0])
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0 - 0.1 * 0.025 * 2.0]]))
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))  # plain SGD for 1-D tensors


def test_lars_weight_decay_enters_the_trust_ratio() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    opt = LARS([w], lr=1.0, momentum=0.0, weight_decay=0.5, eta=1.0)
    w.grad = torch.zeros(1, 2)
    opt.step()  # g = 0 + 0.5 w = [1.5, 2]; trust = 5 / 2.5 = 2; update = 2 * g = [3, 4]
    assert torch.allclose(w.detach(), torch.zeros(1, 2))


def test_biases_and_norms_get_no_weight_decay() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    decay, no_decay = param_groups(model, 0.5, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    groups = param_groups(model, 0.5, 0.1, backbone=model[0], backbone_lr_mult=0.1)
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in groups] == [
        (2, 0.5, 0.0), (1, pytest.approx(0.05), 0.1), (1, pytest.approx(0.05), 0.0)]  # head, backbone
    for name in ("sgd", "lars", "adamw"):
        opt = build_optimizer(model, OptimConfig(name=name), lr=0.5)
        assert [g["weight_decay"] for g in opt.param_groups] == [OptimConfig().weight_decay, 0.0]


def test_warmup_then_cosine() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[8] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_rotation_keeps_the_newest_and_latest_is_by_step(tmp_path: Path) -> None:
    for step in (5, 10, 100, 1000):
        save_rotating({"step": step}, tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000100.pt", "ckpt-00001000.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 1000
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "ckpt-00000001.pt"
    atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):  # noqa: ANN204
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_full_disk_is_an_error_naming_the_file_and_free_space(tmp_path: Path, monkeypatch) -> None:
    save_rotating({"step": 1}, tmp_path, 1, keep_last=1)

    def disk_full(obj, fh) -> None:  # noqa: ANN001
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(RuntimeError, match=r"ckpt-00000002\.pt: not written .*No space.* MB free"):
        save_rotating({"step": 2}, tmp_path, 2, keep_last=1)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-00000001.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 1


def test_a_truncated_checkpoint_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "ckpt-00000001.pt"
    atomic_save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=str(path)):
        load_checkpoint(path)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    atomic_save({"rng": rng_state()}, tmp_path / "c.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
