"""Contrastive pretraining as a task of the one training loop (:mod:`engine.loop`).

A method is an ``nn.Module`` whose ``forward(views)`` returns the loss and whose
``step_update(step, total_steps)`` runs after each optimiser step (momentum encoders, EMA targets);
:class:`PretrainTask` feeds it pairs of views, and the loop does the rest. A finished run leaves
``encoder.pt`` (the encoder's weights for the downstream tasks), ``model.json`` (its model card) and,
after decoder pretraining (method ``local``), ``decoder.pt`` for the segmentation U-Net's decoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from engine.checkpoint import atomic_save
from engine.device import select_amp
from engine.loop import LoopSettings, NonFiniteLossError, Parts, Task, session, train
from engine.optim import warmup_cosine
from engine.sampling import ResumableSampler
from pretrain.config import PretrainConfig
from pretrain.datasets import TwoViewDataset, collate_views, load_samples
from pretrain.encoders import build_encoder, load_encoder_file
from pretrain.methods import POSITIONAL, LocalContrast, build_method
from pretrain.optim import build_optimizer
from pretrain.unet import DECODER_FILE, UNET_DIVISOR, build_flexible_unet, decoder_meta
from pretrain.views import ALIGNABLE, build_views
from twinview.config import ConfigError, to_dict
from twinview.errors import DataError
from twinview.model_card import write_card_for

__all__ = ["NonFiniteLossError", "PretrainTask", "RunResult", "build_model", "run_pretraining"]


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_loss: float
    encoder_path: Path
    monitor: dict[str, float]


def build_model(cfg: PretrainConfig, spatial_dims: int) -> nn.Module:
    """The method module (encoder + heads, or for ``local`` the U-Net decoder on the fixed encoder) that
    a config describes, with ``model.encoder_weights`` loaded into the encoder when set."""
    encoder = build_encoder(cfg.model.encoder, in_channels=cfg.data.channels, spatial_dims=spatial_dims,
                            small_stem=cfg.model.small_stem)
    m = cfg.method
    unet, encoder_method = None, ""
    expected = {"name": cfg.model.encoder, "spatial_dims": spatial_dims, "in_channels": cfg.data.channels,
                "small_stem": cfg.model.small_stem}
    if m.name == "local":
        _check_local(cfg)
        unet = build_flexible_unet(cfg.model.encoder, spatial_dims, cfg.data.channels, 1)
        loaded = load_encoder_file(cfg.model.encoder_weights, unet.encoder, expected)
        encoder_method = loaded.get("method", "")
    elif cfg.model.encoder_weights:
        load_encoder_file(cfg.model.encoder_weights, encoder, expected)
    return build_method(m.name, encoder, unet, encoder_method, temperature=m.temperature,
                        proj_hidden=m.proj_hidden, proj_out=m.proj_out, pred_hidden=m.pred_hidden,
                        queue_size=m.queue_size, momentum=m.momentum, tau_base=m.tau_base,
                        partitions=m.partitions, position_threshold=m.position_threshold,
                        local_grid=m.local_grid)


def _check_local(cfg: PretrainConfig) -> None:
    """Decoder pretraining runs the segmentation U-Net on a fixed encoder with views of one geometry."""
    if not cfg.model.encoder_weights:
        raise ConfigError(None, "method local pretrains a decoder on a fixed, pretrained encoder: set "
                                "model.encoder_weights to an encoder pretraining run")
    if cfg.model.small_stem:
        raise ConfigError(None, "method local trains the segmentation U-Net's decoder, whose encoder has "
                                "the standard stem; set model.small_stem=false")
    if cfg.data.views not in ALIGNABLE:
        raise ConfigError(None, f"method local needs views with one geometry for both views; data.views "
                                f"{cfg.data.views!r} has none (choose from {sorted(ALIGNABLE)})")
    if any(s % UNET_DIVISOR for s in cfg.data.size):
        raise ConfigError(None, f"data.size {cfg.data.size}: method local runs the U-Net, whose input "
                                f"sides must be multiples of {UNET_DIVISOR}")


class PretrainTask(Task):
    """Pairs of views of unlabelled samples -> the method's contrastive loss."""

    name = "pretrain"

    def __init__(self, cfg: PretrainConfig, amp_dtype: torch.dtype | None) -> None:
        self.cfg, self.amp_dtype = cfg, amp_dtype
        self.samples = load_samples(cfg.data)
        self.spatial_dims = self.samples.spatial_dims
        self.method: nn.Module | None = None

    def build(self, device: torch.device, rank: int, world: int) -> Parts:
        cfg, t = self.cfg, self.cfg.train
        model = build_model(cfg, self.spatial_dims)  # checks the method's settings before any data work
        local = isinstance(model, LocalContrast)
        views = build_views(cfg.data.views, tuple(cfg.data.size), spatial_dims=self.spatial_dims,
                            channels=cfg.data.channels, aligned=local)
        positional = cfg.method.name in POSITIONAL
        if positional and self.samples.positions is None:
            raise DataError(cfg.data.path, f"method {cfg.method.name} contrasts slices by their place in the "
                                           "volume: read volumes as slices (data.kind msd_slices)")
        self.dataset = TwoViewDataset(self.samples, views, seed=t.seed, positions=positional)
        global_batch = t.batch_size * world
        if len(self.dataset) < global_batch:
            raise DataError(cfg.data.path, f"{len(self.dataset)} samples, fewer than one batch of "
                                           f"{global_batch}; lower train.batch_size")
        self.sampler = ResumableSampler(len(self.dataset), t.seed, rank, world)
        loader = DataLoader(self.dataset, batch_size=t.batch_size, sampler=self.sampler, drop_last=True,
                            num_workers=cfg.data.workers, collate_fn=collate_views,
                            pin_memory=device.type == "cuda")
        steps_per_epoch = len(self.dataset) // world // t.batch_size
        total_steps = steps_per_epoch * t.epochs
        if t.max_steps:
            total_steps = min(total_steps, t.max_steps)
        model = model.to(device)
        self.memory_format = (torch.channels_last if t.channels_last and self.spatial_dims == 2
                              else torch.contiguous_format)
        model = model.to(memory_format=self.memory_format)
        if cfg.model.sync_bn and world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.method, self.device = model, device
        optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr * global_batch / 256)
        scheduler = warmup_cosine(optimizer, round(cfg.optim.warmup_epochs * steps_per_epoch), total_steps)
        return Parts(model, optimizer, scheduler, loader, self.set_epoch, steps_per_epoch, total_steps,
                     global_batch)

    def set_epoch(self, epoch: int, done: int) -> None:
        self.sampler.set_epoch(epoch, start=done * self.cfg.train.batch_size)
        self.dataset.epoch = epoch

    def compute_loss(self, model: nn.Module, batch: tuple[list[torch.Tensor], torch.Tensor | None]
                     ) -> torch.Tensor:
        views, positions = batch
        views = [v.to(self.device, non_blocking=True).to(memory_format=self.memory_format) for v in views]
        return model(views) if positions is None else model(views, positions.to(self.device))

    def after_step(self, step: int, total_steps: int) -> None:
        self.method.step_update(step, total_steps)

    def end_of_epoch(self, epoch: int, step: int) -> dict[str, float]:
        every = self.cfg.train.knn_every_epochs
        if every and epoch % every == 0:
            return _monitor(self.cfg, self.method.encoder, self.device, self.amp_dtype)
        return {}


def run_pretraining(cfg: PretrainConfig, resume: Path | None = None) -> RunResult:
    """Train (or resume) a run; returns where it wrote its results."""
    with session(cfg, "encoder.pt", resume) as s:
        task = PretrainTask(cfg, None)
        task.amp_dtype = amp_dtype = select_amp(cfg.train.amp, s.device)
        result = train(task, s.run, LoopSettings.from_config(cfg, s.device, amp_dtype), to_dict(cfg))
        encoder_path = s.run.path / "encoder.pt"
        monitor: dict[str, float] = {}
        if s.is_main and task.method is not None:
            trained_by = (task.method.encoder_method if isinstance(task.method, LocalContrast)
                          else cfg.method.name)  # a fixed encoder is the product of its own stage
            meta = {**_encoder_meta(cfg, task.spatial_dims), "method": trained_by}
            atomic_save({"encoder": task.method.encoder.state_dict(), "encoder_config": meta}, encoder_path)
            write_card_for(encoder_path, meta, "encoder")
            if isinstance(task.method, LocalContrast):
                atomic_save({"decoder": task.method.decoder.state_dict(),
                             "decoder_config": {**decoder_meta(cfg.model.encoder, task.spatial_dims,
                                                               cfg.data.channels), "method": cfg.method.name,
                                                "encoder_weights": cfg.model.encoder_weights}},
                            s.run.path / DECODER_FILE)
            monitor = _monitor(cfg, task.method.encoder, s.device, amp_dtype, plot_dir=s.run.path)
        elif (s.run.path / "monitor.json").exists():
            monitor = json.loads((s.run.path / "monitor.json").read_text())
    return RunResult(s.run.path, result.steps, result.final_loss, encoder_path, monitor)


def _encoder_meta(cfg: PretrainConfig, spatial_dims: int) -> dict[str, Any]:
    """Plain metadata that downstream code needs to rebuild the encoder and its preprocessing."""
    from pretrain.views import preset_metadata

    return {"name": cfg.model.encoder, "in_channels": cfg.data.channels, "spatial_dims": spatial_dims,
            "small_stem": cfg.model.small_stem, "method": cfg.method.name, "size": list(cfg.data.size),
            "preprocessing": preset_metadata(cfg.data.views, tuple(cfg.data.size), spatial_dims=spatial_dims,
                                             channels=cfg.data.channels)}


def _monitor(cfg: PretrainConfig, encoder: nn.Module, device: torch.device, amp_dtype: torch.dtype | None,
             plot_dir: Path | None = None) -> dict[str, float]:
    from pretrain.monitor import monitor_encoder

    return monitor_encoder(cfg, encoder, device, amp_dtype, plot_dir=plot_dir)
