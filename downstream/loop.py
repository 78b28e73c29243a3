"""The fine-tuning loop shared by the downstream tasks (segmentation, re-ID).

A task supplies the model, optimiser, schedule, a loader and a ``compute_loss(batch)``; the loop owns
what every run needs and pretraining already does: autocast, gradient scaling and clipping, non-finite
loss detection, atomic rotating checkpoints with exact resume (model, optimiser, schedule, scaler,
RNG, step, position in the epoch), a progress bar with rate and ETA, and ``metrics.csv`` +
TensorBoard.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_rotating, set_rng_state
from pretrain.trainer import MetricsLog, NonFiniteLossError, progress_bar

BASE_FIELDS = ["step", "epoch", "loss", "lr", "images_per_s"]


@dataclass
class LoopSpec:
    """What the loop runs; the callables are the task's own parts."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Iterable
    set_epoch: Callable[[int, int], None]  # (epoch, batches already done in it) -> position the sampler
    steps_per_epoch: int
    total_steps: int
    compute_loss: Callable[[Any], torch.Tensor]  # one batch -> scalar loss (inside autocast)
    batch_size: int
    run_dir: Path
    config: dict[str, Any]  # saved in every checkpoint
    device: torch.device
    amp_dtype: torch.dtype | None = None
    grad_clip: float = 0.0
    ckpt_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    progress: bool = True
    desc: str = "train"
    extra_fields: list[str] = field(default_factory=list)
    before_step: Callable[[int], None] | None = None  # step index about to run (e.g. freeze an encoder)
    after_step: Callable[[int], dict[str, float]] | None = None  # finished step -> extra logged values


def run_loop(spec: LoopSpec, resume_from: Path | None = None) -> tuple[int, float]:
    """Train until ``total_steps``; returns ``(steps, last loss)``. Resumes from ``resume_from``."""
    s = spec
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.amp_dtype == torch.float16)
    step, epoch, step_in_epoch = 0, 0, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, map_location=s.device)
        s.model.load_state_dict(state["model"])
        s.optimizer.load_state_dict(state["optimizer"])
        s.scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
    log = MetricsLog(s.run_dir, step, enabled=True, fields=BASE_FIELDS + s.extra_fields)

    def checkpoint() -> None:
        state = {"model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
                 "scheduler": s.scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                 "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "config": s.config}
        save_rotating(state, s.run_dir, step, s.keep_last)

    autocast = (torch.autocast(s.device.type, dtype=s.amp_dtype) if s.amp_dtype is not None
                else contextlib.nullcontext())
    bar = progress_bar(s.total_steps, step, enabled=s.progress, desc=s.desc)
    last_loss = math.nan
    s.model.train()
    try:
        while step < s.total_steps:
            s.set_epoch(epoch, step_in_epoch)
            tick = time.perf_counter()
            for batch in s.loader:
                if s.before_step is not None:
                    s.before_step(step)
                with autocast:
                    loss = s.compute_loss(batch)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"loss became {loss_value} at step {step + 1}; stopped. Last good checkpoint: "
                        f"{latest_checkpoint(s.run_dir) or 'none yet'}. Lower the learning rate or use fp32.")
                s.optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if s.grad_clip > 0:
                    scaler.unscale_(s.optimizer)
                    nn.utils.clip_grad_norm_(s.model.parameters(), s.grad_clip)
                scaler.step(s.optimizer)
                scaler.update()
                s.scheduler.step()
                step += 1
                step_in_epoch += 1
                last_loss = loss_value
                now = time.perf_counter()
                ips = s.batch_size / max(now - tick, 1e-9)
                tick = now
                bar.update(1)
                extra = s.after_step(step) if s.after_step is not None else {}
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{ips:.0f}",
                                **{k: f"{v:.3f}" for k, v in extra.items()})
                if step % s.log_every == 0 or step == s.total_steps or extra:
                    row = {"step": step, "epoch": epoch, "loss": loss_value,
                           "lr": s.optimizer.param_groups[-1]["lr"], "images_per_s": ips}
                    log.log({**row, **{k: extra.get(k, math.nan) for k in s.extra_fields}})
                if step % s.ckpt_every == 0 and step < s.total_steps:
                    checkpoint()
                if step >= s.total_steps or step_in_epoch == s.steps_per_epoch:
                    break
            if step_in_epoch >= s.steps_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0
        checkpoint()
    finally:
        bar.close()
        log.close()
    return step, last_loss
