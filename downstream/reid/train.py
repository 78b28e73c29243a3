"""Train the re-ID strong baseline (BNNeck, label-smoothed ID loss + batch-hard triplet, PK batches).

The loop is ``downstream.loop`` (checkpoints, exact resume, progress, ``metrics.csv``). Schedule: Adam
with a linear warm-up from lr/10 over ``warmup_epochs``, then step decay at ``milestones`` or cosine
decay to 0. After training the run is evaluated on the Market-1501 query/gallery split; the run folder
holds ``config.yaml``, ``model.pt`` (weights + metadata), ``metrics.csv``, ``loss_curve.png`` and the
evaluation files of :func:`downstream.reid.evaluate.evaluate_market`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from downstream.loop import LoopSpec, run_loop
from downstream.reid.config import ReIDConfig
from downstream.reid.data import PersonDataset, camera_counts, train_pipeline
from downstream.reid.losses import batch_hard_triplet_loss, id_loss
from downstream.reid.model import ReIDModel
from downstream.reid.sampler import PKSampler
from pretrain.checkpoint import atomic_save, latest_checkpoint, load_checkpoint
from pretrain.encoders import load_encoder_file
from pretrain.trainer import plot_loss_curve, select_amp, select_device, set_determinism
from pretrain.views import preset_metadata
from twinview.config import save_config, to_dict


@dataclass
class ReIDResult:
    run_dir: Path
    steps: int
    final_loss: float
    model_path: Path
    metrics: dict[str, float]


def model_metadata(cfg: ReIDConfig, num_classes: int, source: str) -> dict[str, Any]:
    m = cfg.model
    return {"encoder": m.encoder, "last_stride": m.last_stride, "pooling": m.pooling,
            "num_classes": num_classes, "size": list(cfg.data.size), "source": source,
            "encoder_weights": m.encoder_weights,
            "preprocessing": preset_metadata("reid", tuple(cfg.data.size))}


def load_pretrained_backbone(model: ReIDModel, path: str | Path, encoder: str) -> dict[str, Any]:
    """Load a pretraining run's ``encoder.pt`` into ``model.backbone``; returns its metadata."""
    expected = {"name": encoder, "spatial_dims": 2, "in_channels": 3, "small_stem": False}
    return load_encoder_file(path, model.backbone, expected)


def lr_factor(step: int, steps_per_epoch: int, cfg: ReIDConfig) -> float:
    """Multiplier of the base learning rate at ``step``: warm-up from 0.1, then step or cosine."""
    o, total = cfg.optim, cfg.train.epochs * steps_per_epoch
    warmup = o.warmup_epochs * steps_per_epoch
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    if o.schedule == "step":
        epoch = step / steps_per_epoch
        return o.gamma ** sum(epoch >= m for m in o.milestones)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: ReIDModel, cfg: ReIDConfig) -> list[dict]:
    """Backbone and head learning rates; no weight decay on norms, biases and GeM's p."""
    backbone = {id(p) for p in model.backbone.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in backbone, p.ndim <= 1), []).append(p)
    return [{"params": ps, "lr": cfg.optim.lr * (cfg.optim.backbone_lr_mult if in_backbone else 1.0),
             "weight_decay": 0.0 if no_decay else cfg.optim.weight_decay}
            for (in_backbone, no_decay), ps in sorted(groups.items())]


def run_reid(cfg: ReIDConfig, resume: Path | None = None) -> ReIDResult:
    """Train (or resume) a re-ID run, then evaluate it on the query/gallery split."""
    from twinview.data.market1501 import read_market1501, relabel

    t = cfg.train
    run_dir = Path(resume) if resume is not None else Path(cfg.out_dir)
    ckpt_path = latest_checkpoint(run_dir) if resume is not None else None
    done = (run_dir / "model.pt").exists()
    if resume is not None and ckpt_path is None and not done:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from")
    if resume is None and (latest_checkpoint(run_dir) is not None or done):
        raise FileExistsError(f"{run_dir}: already holds a run; pass --resume {run_dir} or choose out_dir")
    market = read_market1501(Path(cfg.data.path))
    labels = relabel(market.train)
    set_determinism(t.seed, deterministic=False)
    device = select_device(t.device)
    amp_dtype = select_amp(t.amp, device, 2)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    model = ReIDModel(len(labels), cfg.model.encoder, cfg.model.last_stride, cfg.model.pooling)
    if cfg.model.encoder_weights:
        load_pretrained_backbone(model, cfg.model.encoder_weights, cfg.model.encoder)
    model = model.to(device).to(memory_format=torch.channels_last)
    meta = model_metadata(cfg, len(labels), "reid")
    if done:
        model.load_state_dict(load_checkpoint(run_dir / "model.pt", map_location=device)["model"])
        steps, last_loss = -1, math.nan
    else:
        steps, last_loss = _train(cfg, market.train, labels, model, device, amp_dtype, run_dir, ckpt_path)
        atomic_save({"model": model.state_dict(), "model_config": meta}, run_dir / "model.pt")
        plot_loss_curve(run_dir / "metrics.csv", run_dir / "loss_curve.png", title="re-ID loss")
    from downstream.reid.evaluate import evaluate_market

    metrics = evaluate_market(model, meta, cfg.data.path, cfg.eval, run_dir, device, progress=t.progress)
    return ReIDResult(run_dir, steps, last_loss, run_dir / "model.pt", metrics)


def _train(cfg: ReIDConfig, records: list, labels: dict[int, int], model: ReIDModel, device: torch.device,
           amp_dtype: torch.dtype | None, run_dir: Path, ckpt_path: Path | None) -> tuple[int, float]:
    t, lc = cfg.train, cfg.loss
    one_camera = sum(1 for n in camera_counts(records).values() if n == 1)
    if one_camera:  # kept: they still teach the ID loss and serve as negatives
        print(f"note: {one_camera} training identities were seen by one camera only (kept)")
    dataset = PersonDataset(records, train_pipeline(cfg.data.augment, cfg.data.size), labels, seed=t.seed)
    sampler = PKSampler([r.pid for r in records], t.p, t.k, seed=t.seed)
    batch = t.p * t.k
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True,
                        pin_memory=device.type == "cuda")
    steps_per_epoch = sampler.batches_per_epoch
    optimizer = torch.optim.Adam(param_groups(model, cfg))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps_per_epoch, cfg))

    def set_epoch(epoch: int, done: int) -> None:
        sampler.set_epoch(epoch, start_batch=done)
        dataset.epoch = epoch

    def compute_loss(b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = b[0].to(device, non_blocking=True).to(memory_format=torch.channels_last)
        y = b[1].to(device, non_blocking=True)
        feat, logits = model(x)
        return (lc.id_weight * id_loss(logits.float(), y, lc.label_smoothing)
                + lc.triplet_weight * batch_hard_triplet_loss(feat.float(), y, lc.margin))

    spec = LoopSpec(
        model=model, optimizer=optimizer, scheduler=scheduler, loader=loader, set_epoch=set_epoch,
        steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * t.epochs, compute_loss=compute_loss,
        batch_size=batch, run_dir=run_dir, config=to_dict(cfg), device=device, amp_dtype=amp_dtype,
        grad_clip=cfg.optim.grad_clip, ckpt_every=t.ckpt_every_steps, keep_last=t.keep_last,
        log_every=t.log_every_steps, progress=t.progress, desc="re-ID")
    return run_loop(spec, resume_from=ckpt_path)
