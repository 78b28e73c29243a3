"""One training loop for every method: views in, loss out, checkpoints, logs and plots around it.

The loop is the same for SimCLR, MoCo v2, BYOL and SimSiam: a method is an ``nn.Module`` whose
``forward(views)`` returns the loss and whose ``step_update(step, total_steps)`` runs after each
optimiser step (momentum encoders, EMA targets). The trainer owns the rest: device and precision,
DDP under ``torchrun``, optimiser and schedule, clipping, atomic checkpoints with exact resume,
non-finite loss detection, progress, ``metrics.csv``, TensorBoard and the loss-curve PNG.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pretrain import distributed as dist_utils
from pretrain.checkpoint import (
    atomic_save,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_rotating,
    set_rng_state,
)
from pretrain.config import PretrainConfig
from pretrain.datasets import ResumableSampler, TwoViewDataset, collate_views, load_samples
from pretrain.encoders import build_encoder
from pretrain.methods import build_method
from pretrain.optim import build_optimizer, warmup_cosine
from pretrain.views import build_views
from twinview.config import save_config, to_dict

METRICS_FIELDS = ["step", "epoch", "loss", "lr", "images_per_s"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_loss: float
    encoder_path: Path
    monitor: dict[str, float]


def select_device(preference: str) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", dist_utils.local_rank())
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); without it bf16 is emulated."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def select_amp(preference: str, device: torch.device, spatial_dims: int = 2) -> torch.dtype | None:
    """The autocast dtype: bf16 where it is fast and safe, fp16 on GPUs without bf16, else fp32.

    ``auto`` on the CPU takes bf16 only for 2D models on CPUs with native bf16: on a Xeon without
    AVX512-BF16, a ResNet-18 SimCLR step ran 2-3x slower in bf16 than in fp32, and torch 2.14's bf16
    ``conv3d`` backward on the CPU gave non-finite gradients (ResNet-18 on 16^3 patches).
    """
    if preference == "fp32":
        return None
    if preference == "fp16":
        return torch.float16
    if preference == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if spatial_dims == 3 or not cpu_has_native_bf16():
            return None
    return torch.bfloat16


def set_determinism(seed: int, deterministic: bool) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def build_model(cfg: PretrainConfig, spatial_dims: int) -> nn.Module:
    """The method module (encoder + heads) that a config describes."""
    encoder = build_encoder(cfg.model.encoder, in_channels=cfg.data.channels, spatial_dims=spatial_dims,
                            small_stem=cfg.model.small_stem)
    m = cfg.method
    return build_method(m.name, encoder, temperature=m.temperature, proj_hidden=m.proj_hidden,
                        proj_out=m.proj_out, pred_hidden=m.pred_hidden, queue_size=m.queue_size,
                        momentum=m.momentum, tau_base=m.tau_base)


class MetricsLog:
    """``metrics.csv`` (appended across resumes, rows past the resumed step dropped) and TensorBoard.

    ``fields`` are the CSV columns (``step`` first); numeric values other than ``step`` and ``epoch``
    also go to TensorBoard under ``train/<field>``.
    """

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool,
                 fields: list[str] | None = None) -> None:
        self.enabled = enabled
        self.fields = fields or METRICS_FIELDS
        self.path = run_dir / "metrics.csv"
        if not enabled:
            return
        rows = []
        if resume_step and self.path.exists():
            with self.path.open() as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(rows)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(run_dir / "tensorboard", purge_step=resume_step + 1 if resume_step else None)

    def log(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.fields).writerow(row)
        for key, value in row.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and value == value:
                self.tb.add_scalar(f"train/{key}", value, row["step"])

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.enabled:
            self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def plot_loss_curve(metrics_csv: Path, out_png: Path, title: str = "pretraining loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with metrics_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    steps = [int(r["step"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, losses, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title} ({metrics_csv.parent.name})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "pretrain"):  # noqa: ANN201 - tqdm
    """A tqdm bar (rate and ETA) over steps; disabled bars cost nothing."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not enabled,
                desc=desc)


def run_pretraining(cfg: PretrainConfig, resume: Path | None = None) -> RunResult:
    """Train (or resume) a run; returns where it wrote its results."""
    dist_utils.setup_from_env()
    rank, world = dist_utils.rank(), dist_utils.world_size()
    is_main = rank == 0
    t = cfg.train
    run_dir = Path(resume) if resume is not None else Path(cfg.out_dir)
    ckpt_path = latest_checkpoint(run_dir) if resume is not None else None
    if resume is not None and ckpt_path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from")
    if resume is None and latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir}: already holds a run; pass --resume {run_dir} or choose out_dir")
    set_determinism(t.seed, t.deterministic)
    device = select_device(t.device)
    samples = load_samples(cfg.data)
    spatial_dims = samples.spatial_dims
    amp_dtype = select_amp(t.amp, device, spatial_dims)
    views = build_views(cfg.data.views, tuple(cfg.data.size), spatial_dims=spatial_dims,
                        channels=cfg.data.channels)
    dataset = TwoViewDataset(samples, views, seed=t.seed)
    global_batch = t.batch_size * world
    if len(dataset) < global_batch:
        raise ValueError(f"{cfg.data.path}: {len(dataset)} samples, fewer than one batch of {global_batch}")
    sampler = ResumableSampler(len(dataset), t.seed, rank, world)
    loader = DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.workers, collate_fn=collate_views,
                        pin_memory=device.type == "cuda")
    steps_per_epoch = len(dataset) // world // t.batch_size
    total_steps = steps_per_epoch * t.epochs
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)

    model = build_model(cfg, spatial_dims).to(device)
    memory_format = torch.channels_last if t.channels_last and spatial_dims == 2 else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if cfg.model.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    lr = cfg.optim.lr * global_batch / 256
    optimizer = build_optimizer(model, cfg.optim, lr)
    scheduler = warmup_cosine(optimizer, round(cfg.optim.warmup_epochs * steps_per_epoch), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step, epoch, step_in_epoch = 0, 0, 0
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
    if world > 1:
        # Buffers (MoCo's queue, BN statistics) are kept per rank: the queue is identical on every rank
        # by construction, and BN statistics are synchronised only with model.sync_bn.
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    method = _unwrap(model)

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    log = MetricsLog(run_dir, step, enabled=is_main)

    def checkpoint() -> Path | None:
        if not is_main:
            return None
        if not all(bool(torch.isfinite(p).all()) for p in method.parameters()):
            raise NonFiniteLossError(
                f"parameters became non-finite by step {step}; not saved. Last good checkpoint: "
                f"{latest_checkpoint(run_dir) or 'none yet'}. Lower optim.lr or set optim.grad_clip.")
        state = {"model": method.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                 "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "config": to_dict(cfg)}
        return save_rotating(state, run_dir, step, t.keep_last)

    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    bar = progress_bar(total_steps, step, enabled=t.progress and is_main)
    last_loss = math.nan
    monitor: dict[str, float] = {}
    model.train()
    try:
        while step < total_steps:
            sampler.set_epoch(epoch, start=step_in_epoch * t.batch_size)
            dataset.epoch = epoch
            tick = time.perf_counter()
            for batch in loader:
                views_b = [v.to(device, non_blocking=True).to(memory_format=memory_format) for v in batch]
                with autocast:
                    loss = model(views_b)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    last = latest_checkpoint(run_dir)
                    raise NonFiniteLossError(
                        f"loss became {loss_value} at step {step + 1} (epoch {epoch}); stopped. Last good "
                        f"checkpoint: {last or 'none yet'}. Lower optim.lr, set optim.grad_clip, or "
                        f"train.amp=fp32.")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.optim.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                step_in_epoch += 1
                method.step_update(step, total_steps)
                last_loss = loss_value
                now = time.perf_counter()
                ips = global_batch / max(now - tick, 1e-9)
                tick = now
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{ips:.0f}", epoch=epoch)
                if step % t.log_every_steps == 0 or step == total_steps:
                    log.log({"step": step, "epoch": epoch, "loss": loss_value,
                             "lr": optimizer.param_groups[0]["lr"], "images_per_s": ips})
                if step % t.ckpt_every_steps == 0 and step < total_steps:
                    checkpoint()
                if step >= total_steps:
                    break
            if step_in_epoch == steps_per_epoch:  # the epoch is complete
                epoch, step_in_epoch = epoch + 1, 0
                if t.knn_every_epochs and epoch % t.knn_every_epochs == 0 and is_main and step < total_steps:
                    monitor = _monitor(cfg, method.encoder, device, amp_dtype)
                    for name, value in monitor.items():
                        log.scalar(f"monitor/{name}", value, step)
        checkpoint()
    finally:
        bar.close()
        log.close()
    encoder_path = run_dir / "encoder.pt"
    if is_main:
        meta = _encoder_meta(cfg, spatial_dims)
        atomic_save({"encoder": method.encoder.state_dict(), "encoder_config": meta}, encoder_path)
        if (run_dir / "metrics.csv").exists():
            plot_loss_curve(run_dir / "metrics.csv", run_dir / "loss_curve.png")
        monitor = _monitor(cfg, method.encoder, device, amp_dtype, plot_dir=run_dir) or monitor
    dist_utils.cleanup()
    return RunResult(run_dir, step, last_loss, encoder_path, monitor)


def _encoder_meta(cfg: PretrainConfig, spatial_dims: int) -> dict[str, Any]:
    """Plain metadata that downstream code needs to rebuild the encoder and its preprocessing."""
    from pretrain.views import preset_metadata

    return {"name": cfg.model.encoder, "in_channels": cfg.data.channels, "spatial_dims": spatial_dims,
            "small_stem": cfg.model.small_stem, "method": cfg.method.name,
            "preprocessing": preset_metadata(cfg.data.views, tuple(cfg.data.size), spatial_dims=spatial_dims)}


def _monitor(cfg: PretrainConfig, encoder: nn.Module, device: torch.device, amp_dtype: torch.dtype | None,
             plot_dir: Path | None = None) -> dict[str, float]:
    from pretrain.monitor import monitor_encoder

    return monitor_encoder(cfg, encoder, device, amp_dtype, plot_dir=plot_dir)
