"""The one training loop on a toy task: exact resume past a broken checkpoint, best.pt, finished runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from engine.checkpoint import list_checkpoints, load_checkpoint
from engine.device import set_determinism
from engine.loop import BEST_FILE, LoopSettings, NonFiniteLossError, Parts, Task, finished_result, train
from engine.optim import warmup_cosine
from engine.sampling import ResumableSampler
from twinview.run_folder import RunFolder


class Stop(Exception):
    """Stands in for a kill part-way through a run."""


class ToyTask(Task):
    """Noisy linear regression; ``stop_at`` raises before that step, ``scores`` are the validations."""

    name = "toy"
    extra_fields = ("val_score",)
    best_metric = "val_score"

    def __init__(self, stop_at: int | None = None, scores: dict[int, float] | None = None,
                 nan_at: int | None = None) -> None:
        self.stop_at, self.scores, self.nan_at = stop_at, scores or {}, nan_at

    def build(self, device: torch.device, rank: int, world: int) -> Parts:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(40, 3, generator=g)
        data = TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(40, generator=g))
        self.sampler = ResumableSampler(len(data), seed=0)
        self.model = nn.Linear(3, 1)
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        loader = DataLoader(data, batch_size=8, sampler=self.sampler, drop_last=True)
        return Parts(self.model, optimizer, warmup_cosine(optimizer, 2, 12), loader,
                     lambda epoch, done: self.sampler.set_epoch(epoch, done * 8), 5, 12, 8)

    def compute_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        self.steps_seen = getattr(self, "steps_seen", 0) + 1
        if self.stop_at is not None and self.steps_seen == self.stop_at:
            raise Stop
        loss = ((model(batch[0])[:, 0] - batch[1]) ** 2).mean()
        return loss * math.nan if self.nan_at == self.steps_seen else loss

    def validate(self, step: int, total_steps: int) -> dict[str, float]:
        return {"val_score": self.scores[step]} if step in self.scores else {}


SETTINGS = LoopSettings(torch.device("cpu"), ckpt_every=3, keep_last=3, log_every=1, progress=False)


def run_toy(path: Path, task: ToyTask, resume: bool = False) -> tuple[RunFolder, dict[str, torch.Tensor]]:
    set_determinism(0, deterministic=False)
    run = RunFolder.open(path, "done.txt", {"toy": 1}, resume=resume)
    train(task, run, SETTINGS, {"toy": 1})
    return run, {k: v.clone() for k, v in task.model.state_dict().items()}


def test_resume_skips_a_truncated_checkpoint_and_matches_the_uninterrupted_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, expected = run_toy(tmp_path / "whole", ToyTask())
    with pytest.raises(Stop):
        run_toy(tmp_path / "cut", ToyTask(stop_at=11))
    ckpts = list_checkpoints(tmp_path / "cut")
    assert [p.name for p in ckpts] == ["ckpt-00000003.pt", "ckpt-00000006.pt", "ckpt-00000009.pt"]
    ckpts[-1].write_bytes(ckpts[-1].read_bytes()[:1000])  # a kill during the write of a later one
    leftover = tmp_path / "cut" / ".ckpt-00000012.pt.abcd.tmp"
    leftover.write_bytes(b"partial")
    _, resumed = run_toy(tmp_path / "cut", ToyTask(), resume=True)
    err = capsys.readouterr().err
    assert "skipped" in err and "ckpt-00000009.pt" in err and "ckpt-00000006.pt" not in err
    assert not leftover.exists()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    rows = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 13))  # steps 7-9 logged once, not twice


def test_best_checkpoint_follows_the_named_validation_metric(tmp_path: Path) -> None:
    run, final = run_toy(tmp_path / "run", ToyTask(scores={4: 0.5, 8: 0.9, 12: 0.7}))
    best = load_checkpoint(run.path / BEST_FILE)
    assert best["best"] == {"metric": "val_score", "value": 0.9, "step": 8}
    assert not all(torch.equal(best["model"][k], final[k]) for k in final)  # step 8's, not the last
    assert load_checkpoint(list_checkpoints(run.path)[-1])["best"]["step"] == 8


def test_a_finished_run_reports_what_it_reached(tmp_path: Path) -> None:
    run, _ = run_toy(tmp_path / "run", ToyTask(scores={6: 0.3}))
    (run.path / "done.txt").write_text("finished")
    result = finished_result(run)
    last = (run.path / "metrics.csv").read_text().splitlines()[-1].split(",")
    assert result.steps == 12 and result.final_loss == pytest.approx(float(last[2]))
    assert math.isfinite(result.final_loss) and result.best["step"] == 6
    assert train(ToyTask(), run, SETTINGS, {"toy": 1}) == result


def test_a_non_finite_loss_is_a_one_line_error_naming_the_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 5 .*ckpt-00000003.pt") as err:
        run_toy(tmp_path / "run", ToyTask(nan_at=5))
    assert "\n" not in str(err.value)


def test_auto_precision_is_fp32_on_the_cpu() -> None:
    """CPU bf16 autocast gave non-finite activations with torch 2.14 (AMX Xeon): ``auto`` must not pick it."""
    from engine.device import select_amp

    cpu = torch.device("cpu")
    assert select_amp("auto", cpu) is None
    assert select_amp("fp32", cpu) is None
    assert select_amp("bf16", cpu) == torch.bfloat16
