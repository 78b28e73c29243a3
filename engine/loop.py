"""The one training loop of twinview: pretraining, segmentation and re-ID all run through :func:`train`.

A task (an instance of :class:`Task`) says what to train: ``build`` makes the model, optimiser,
schedule and loader, ``compute_loss`` turns one batch into a scalar loss, and the optional hooks run
before and after each step (freezing an encoder, momentum encoders), validate, and look at the model
at the end of an epoch. The loop owns the rest: device and precision, DistributedDataParallel under
``torchrun``, gradient scaling and clipping, non-finite loss detection, atomic rotating checkpoints
with exact resume (model, optimiser, schedule, scaler, RNG, step and position in the epoch), ``best.pt``
by a named validation metric, a progress bar with rate and ETA, ``metrics.csv``, TensorBoard, and the
loss plot.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import distributed as dist_utils
from engine.checkpoint import (
    atomic_save,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_rotating,
    set_rng_state,
)
from engine.device import describe_devices, select_device, set_determinism
from engine.metrics_log import MetricsLog, plot_loss_curve, progress_bar
from twinview import provenance
from twinview.config import to_dict
from twinview.errors import TwinviewError, display_path
from twinview.run_folder import RunFolder

BASE_FIELDS = ["step", "epoch", "loss", "lr", "images_per_s"]
BEST_FILE = "best.pt"


class NonFiniteLossError(TwinviewError, RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


@dataclass
class Parts:
    """What a task builds for the loop."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Iterable
    set_epoch: Callable[[int, int], None]  # (epoch, batches of it already done) -> position the sampler
    steps_per_epoch: int
    total_steps: int
    images_per_step: int  # over all processes, for the images/s column


@dataclass
class LoopSettings:
    """How the loop runs, from the task's config."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    grad_clip: float = 0.0
    ckpt_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device, amp_dtype: torch.dtype | None) -> LoopSettings:
        """From a task config with ``optim.grad_clip`` and the ``train`` bookkeeping keys."""
        t = cfg.train
        return cls(device, amp_dtype, cfg.optim.grad_clip, t.ckpt_every_steps, t.keep_last, t.log_every_steps,
                   t.progress)


@dataclass
class Session:
    """A run being worked on by this process."""

    run: RunFolder
    device: torch.device
    is_main: bool  # rank 0: the one process that writes


@contextlib.contextmanager
def session(cfg: Any, final: str, resume: str | os.PathLike[str] | None) -> Iterator[Session]:
    """Open ``cfg.out_dir`` as a new run (or ``resume`` the run there, checked against ``cfg``), choose
    the device, lock the folder, seed, and record ``config.yaml`` and the provenance; the process
    group (under torchrun) is left at the end. ``final`` names the file a finished run has."""
    dist_utils.setup_from_env()
    is_main = dist_utils.rank() == 0
    config = to_dict(cfg)
    path = resume if resume is not None else cfg.out_dir
    # Only the writing process checks the folder: the others would find what it has just created there.
    run = (RunFolder.open(path, final, config, resume=resume is not None, defaults=to_dict(type(cfg)()))
           if is_main
           else RunFolder(Path(path), final))
    device = select_device(cfg.train.device)
    with run.lock() if is_main else contextlib.nullcontext():
        set_determinism(cfg.train.seed, cfg.train.deterministic)
        if is_main:
            run.save_config(config)
            run.record(provenance.collect(devices=describe_devices()))
        yield Session(run, device, is_main)
    dist_utils.cleanup()


@dataclass
class LoopResult:
    steps: int
    final_loss: float  # the loss of the last step (read back from metrics.csv for a finished run)
    best: dict[str, float] | None  # {"step", metric: value} of best.pt, where the task validates


class Task:
    """A task's part of training; subclasses implement ``build`` and ``compute_loss``.

    Randomness comes from per-item seeds (:func:`engine.sampling.sample_seed`), not from the global
    generator during a step: each new loader iterator draws from that generator, so global draws in a
    step would differ after a mid-epoch resume.
    """

    name = "train"  # the progress bar's label and the loss plot's title
    extra_fields: tuple[str, ...] = ()  # more metrics.csv columns (what ``validate`` returns)
    best_metric: str | None = None  # keep best.pt by this ``validate`` value (higher is better)
    find_unused_parameters = False  # DDP: parameters may sit out a step (a frozen encoder)
    model_config: dict[str, Any] | None = None  # stored with best.pt, so it loads like the final model

    def build(self, device: torch.device, rank: int, world: int) -> Parts:
        raise NotImplementedError

    def compute_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """One batch -> scalar loss, inside autocast; ``model`` may be wrapped in DDP."""
        raise NotImplementedError

    def before_step(self, step: int) -> None:
        """Runs before the forward pass of step ``step + 1``."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Runs after optimiser step ``step`` (momentum encoders, EMA targets)."""

    def validate(self, step: int, total_steps: int) -> dict[str, float]:
        """Validation values after step ``step`` (main process only); ``{}`` when not due."""
        return {}

    def end_of_epoch(self, epoch: int, step: int) -> dict[str, float]:
        """Values to log after epoch ``epoch`` ends at ``step`` (main process only)."""
        return {}


def newest_readable_checkpoint(run_dir: Path, device: torch.device) -> dict[str, Any] | None:
    """The newest checkpoint that loads, skipping (and naming) broken ones."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path, map_location=device)
        except TwinviewError as err:
            print(f"twinview: note: skipped {err}", file=sys.stderr)
    return None


def finished_result(run: RunFolder) -> LoopResult:
    """What a finished run reached: its last logged step and loss, and its best validation."""
    rows: list[dict[str, str]] = []
    if (run.path / "metrics.csv").exists():
        with (run.path / "metrics.csv").open() as fh:
            rows = list(csv.DictReader(fh))
    best_path = run.path / BEST_FILE
    best = load_checkpoint(best_path)["best"] if best_path.exists() else None
    if not rows:
        return LoopResult(0, math.nan, best)
    return LoopResult(int(rows[-1]["step"]), float(rows[-1]["loss"]), best)


def train(task: Task, run: RunFolder, settings: LoopSettings, config: dict[str, Any]) -> LoopResult:
    """Train ``task`` in ``run`` until its last step, resuming from the newest readable checkpoint.

    ``config`` (plain values) is stored in every checkpoint. A finished run (its final file exists)
    trains nothing and reports what it reached (:func:`finished_result`).
    """
    if run.finished:
        return finished_result(run)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    is_main = rank == 0
    s, device = settings, settings.device
    if is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        for tmp in run.path.glob(".*.tmp"):  # left by a write that was killed
            tmp.unlink(missing_ok=True)
    parts = task.build(device, rank, world)
    best_path = run.path / BEST_FILE
    model, optimizer, scheduler = parts.model, parts.optimizer, parts.scheduler
    scaler = torch.amp.GradScaler(device.type, enabled=s.amp_dtype == torch.float16)
    step, epoch, step_in_epoch = 0, 0, 0
    best: dict[str, float] | None = None
    resumed = newest_readable_checkpoint(run.path, device)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        set_rng_state(resumed["rng"])
        step, epoch, step_in_epoch = resumed["step"], resumed["epoch"], resumed["step_in_epoch"]
        best = resumed.get("best")
    elif any(run.path.glob("ckpt-*.pt")):
        raise TwinviewError(f"{display_path(run.path)}: no checkpoint here can be read; start a new run")
    method = model
    if world > 1:
        # Buffers (MoCo's queue, BN statistics) are kept per rank: the queue is identical on every rank
        # by construction, and BN statistics are synchronised only with SyncBatchNorm.
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
            find_unused_parameters=task.find_unused_parameters)
    log = MetricsLog(run.path, step, enabled=is_main, fields=BASE_FIELDS + list(task.extra_fields))

    def checkpoint() -> None:
        if not is_main:
            return
        if not all(bool(torch.isfinite(p).all()) for p in method.parameters()):
            raise NonFiniteLossError(
                f"parameters became non-finite by step {step}; not saved. Last good checkpoint: "
                f"{latest_checkpoint(run.path) or 'none yet'}. Lower the learning rate or set "
                "optim.grad_clip.")
        state = {"model": method.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                 "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "config": config,
                 "best": best}
        save_rotating(state, run.path, step, s.keep_last)

    autocast = (torch.autocast(device.type, dtype=s.amp_dtype) if s.amp_dtype is not None
                else contextlib.nullcontext())
    bar = progress_bar(parts.total_steps, step, enabled=s.progress and is_main, desc=task.name)
    last_loss = math.nan
    model.train()
    try:
        while step < parts.total_steps:
            parts.set_epoch(epoch, step_in_epoch)
            tick = time.perf_counter()
            for batch in parts.loader:
                task.before_step(step)
                with autocast:
                    loss = task.compute_loss(model, batch)
                loss_value = _global_mean(loss.detach(), world)
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"loss became {loss_value} at step {step + 1} (epoch {epoch}); stopped. Last good "
                        f"checkpoint: {latest_checkpoint(run.path) or 'none yet'}. Lower the learning rate, "
                        "set optim.grad_clip, or train.amp=fp32.")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if s.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                step_in_epoch += 1
                task.after_step(step, parts.total_steps)
                last_loss = loss_value
                now = time.perf_counter()
                ips = parts.images_per_step / max(now - tick, 1e-9)
                tick = now
                bar.update(1)
                extra = task.validate(step, parts.total_steps) if is_main else {}
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{ips:.0f}", epoch=epoch,
                                **{k: f"{v:.3f}" for k, v in extra.items()})
                if task.best_metric in extra and (best is None or extra[task.best_metric] > best["value"]):
                    best = {"metric": task.best_metric, "value": extra[task.best_metric], "step": step}
                    meta = {"model_config": task.model_config} if task.model_config is not None else {}
                    atomic_save({"model": method.state_dict(), "best": best, **meta}, best_path)
                if step % s.log_every == 0 or step == parts.total_steps or extra:
                    log.log({"step": step, "epoch": epoch, "loss": loss_value,
                             "lr": optimizer.param_groups[0]["lr"], "images_per_s": ips,
                             **{k: extra.get(k, math.nan) for k in task.extra_fields}})
                if step % s.ckpt_every == 0 and step < parts.total_steps:
                    checkpoint()
                if step >= parts.total_steps or step_in_epoch == parts.steps_per_epoch:
                    break
            if step_in_epoch >= parts.steps_per_epoch:  # the epoch is complete
                epoch, step_in_epoch = epoch + 1, 0
                if is_main and step < parts.total_steps:
                    for name, value in task.end_of_epoch(epoch, step).items():
                        log.scalar(f"monitor/{name}", value, step)
        checkpoint()
    finally:
        bar.close()
        log.close()
    if is_main and (run.path / "metrics.csv").exists():
        plot_loss_curve(run.path / "metrics.csv", run.path / "loss_curve.png", title=f"{task.name} loss")
    return LoopResult(step, last_loss, best)


def _global_mean(loss: torch.Tensor, world: int) -> float:
    """The loss averaged over processes, so every rank sees a non-finite value at once."""
    if world > 1:
        loss = loss.clone()
        torch.distributed.all_reduce(loss)
        loss /= world
    return float(loss)
