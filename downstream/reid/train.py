"""Train the re-ID strong baseline (BNNeck, label-smoothed ID loss + batch-hard triplet, PK batches).

:class:`ReIDTrainTask` runs on the one training loop (:mod:`engine.loop`), also under
``torchrun``. Schedule: Adam with a linear warm-up from lr/10 over ``warmup_epochs``, then step decay
at ``milestones`` or cosine decay to 0. After training the run is evaluated on the Market-1501
query/gallery split; the run folder holds ``config.yaml``, ``model.pt`` (weights + metadata),
``model.json`` (its model card), ``metrics.csv``, ``loss_curve.png`` and the evaluation files of
:func:`downstream.reid.evaluate.evaluate_market`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from downstream.reid.config import ReIDConfig
from downstream.reid.data import PersonDataset, camera_counts, train_pipeline
from downstream.reid.losses import batch_hard_triplet_loss, id_loss
from downstream.reid.model import ReIDModel
from downstream.reid.sampler import PKSampler
from engine.checkpoint import atomic_save, load_checkpoint
from engine.device import select_amp
from engine.loop import LoopSettings, Parts, Task, finished_result, session, train
from engine.optim import param_groups
from pretrain.encoders import load_encoder_file
from pretrain.views import preset_metadata
from twinview.config import to_dict
from twinview.model_card import write_card_for


@dataclass
class ReIDResult:
    run_dir: Path
    steps: int
    final_loss: float
    model_path: Path
    metrics: dict[str, float]
    report: str  # the evaluation as Markdown (eval.md)


def model_metadata(cfg: ReIDConfig, num_classes: int, source: str) -> dict[str, Any]:
    m = cfg.model
    return {"encoder": m.encoder, "last_stride": m.last_stride, "pooling": m.pooling,
            "num_classes": num_classes, "size": list(cfg.data.size), "source": source,
            "encoder_weights": m.encoder_weights,
            "preprocessing": preset_metadata("reid", tuple(cfg.data.size)),
            "data": {"name": Path(cfg.data.path).name, "kind": "market1501", "modality": "photo"}}


def load_pretrained_backbone(model: ReIDModel, path: str | Path, encoder: str) -> dict[str, Any]:
    """Load a pretraining run's ``encoder.pt`` into ``model.backbone``; returns its metadata."""
    expected = {"name": encoder, "spatial_dims": 2, "in_channels": 3, "small_stem": False}
    return load_encoder_file(path, model.backbone, expected)


def load_start(model: ReIDModel, path: str | Path, encoder: str) -> dict[str, Any]:
    """Initialise ``model.backbone`` from a pretraining run (``encoder.pt``) or from a re-ID run
    (``model.pt``, e.g. trained with labels on another data set); returns ``{"kind": "pretraining" or
    "reid", "method": the pretraining method behind the weights, or None}``."""
    from downstream.reid.evaluate import load_reid_model
    from twinview.config import ConfigError

    folder = Path(path)
    if (folder / "model.pt").exists() or folder.name == "model.pt":
        source, meta = load_reid_model(folder)
        if meta["encoder"] != encoder:
            raise ConfigError(path, f"a {meta['encoder']} re-ID model; this run's model.encoder is {encoder}")
        model.backbone.load_state_dict(source.backbone.state_dict())
        return {"kind": "reid", "method": meta.get("pretraining_method")}
    return {"kind": "pretraining", "method": load_pretrained_backbone(model, path, encoder).get("method")}


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


class ReIDTrainTask(Task):
    """P x K batches of identity-labelled crops -> label-smoothed ID loss + batch-hard triplet loss."""

    name = "re-ID"

    def __init__(self, cfg: ReIDConfig, records: list, labels: dict[int, int], model: ReIDModel) -> None:
        self.cfg, self.records, self.labels, self.model = cfg, records, labels, model

    def build(self, device: torch.device, rank: int, world: int) -> Parts:
        cfg, t = self.cfg, self.cfg.train
        one_camera = sum(1 for n in camera_counts(self.records).values() if n == 1)
        if one_camera and rank == 0:  # kept: they still teach the ID loss and serve as negatives
            print(f"note: {one_camera} training identities were seen by one camera only (kept)")
        self.dataset = PersonDataset(self.records, train_pipeline(cfg.data.augment, cfg.data.size),
                                     self.labels, seed=t.seed)
        self.sampler = PKSampler([r.pid for r in self.records], t.p, t.k, seed=t.seed, rank=rank, world=world)
        batch = t.p * t.k
        loader = DataLoader(self.dataset, batch_size=batch, sampler=self.sampler, drop_last=True,
                            pin_memory=device.type == "cuda")
        steps_per_epoch = self.sampler.batches_per_epoch
        o = cfg.optim
        optimizer = torch.optim.Adam(param_groups(self.model, o.lr, o.weight_decay, self.model.backbone,
                                                  o.backbone_lr_mult))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                      lambda s: lr_factor(s, steps_per_epoch, cfg))
        self.device = device
        return Parts(self.model, optimizer, scheduler, loader, self.set_epoch, steps_per_epoch,
                     steps_per_epoch * t.epochs, batch * world)

    def set_epoch(self, epoch: int, done: int) -> None:
        self.sampler.set_epoch(epoch, start_batch=done)
        self.dataset.epoch = epoch

    def compute_loss(self, model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        lc = self.cfg.loss
        x = b[0].to(self.device, non_blocking=True).to(memory_format=torch.channels_last)
        y = b[1].to(self.device, non_blocking=True)
        feat, logits = model(x)
        return (lc.id_weight * id_loss(logits.float(), y, lc.label_smoothing)
                + lc.triplet_weight * batch_hard_triplet_loss(feat.float(), y, lc.margin))


def training_data(cfg: ReIDConfig) -> tuple[list, Any | None]:
    """The training crops and the Market-1501 folder they come from (None when there is none). With
    ``train.labels=none`` ``data.path`` may also be a plain folder of crops or a CSV
    (:mod:`twinview.data.person_folder`): nothing to score then."""
    from twinview.data.market1501 import TRAIN, read_market1501

    path = Path(cfg.data.path)
    if cfg.train.labels == "none" and not (path / TRAIN).is_dir():
        from twinview.data.person_folder import read_person_source

        return read_person_source(path, TRAIN), None
    market = read_market1501(path)
    return market.train, market


def run_reid(cfg: ReIDConfig, resume: Path | None = None) -> ReIDResult:
    """Train (or resume) a re-ID run, with identity labels or (``train.labels=none``) without them by
    Cluster Contrast, then evaluate it on the query/gallery split where the data has one."""
    from twinview.data.market1501 import relabel

    records, market = training_data(cfg)
    labels = relabel(records) if cfg.train.labels == "ids" else {}
    with session(cfg, "model.pt", resume) as s:
        amp_dtype = select_amp(cfg.train.amp, s.device)
        model = ReIDModel(len(labels), cfg.model.encoder, cfg.model.last_stride, cfg.model.pooling)
        meta = model_metadata(cfg, len(labels), "reid")
        meta["training_labels"] = cfg.train.labels
        if market is None:
            meta["data"]["kind"] = "person_folder"
        if cfg.model.encoder_weights:
            start = load_start(model, cfg.model.encoder_weights, cfg.model.encoder)
            meta["pretraining_method"], meta["start"] = start["method"], start["kind"]
        model = model.to(s.device).to(memory_format=torch.channels_last)
        model_path = s.run.path / "model.pt"
        if s.run.finished:
            model.load_state_dict(load_checkpoint(model_path, map_location=s.device)["model"])
            result = finished_result(s.run)
        else:
            settings = LoopSettings.from_config(cfg, s.device, amp_dtype)
            if cfg.train.labels == "ids":
                task: Task = ReIDTrainTask(cfg, records, labels, model)
            else:
                from downstream.reid.cluster import ClusterContrastNet, ClusterContrastTask, market_scorer

                net = ClusterContrastNet(model, len(records)).to(s.device)
                scorer = market_scorer(cfg, market, s.device) if market is not None else None
                task = ClusterContrastTask(cfg, records, net, s.run.path, scorer)
            result = train(task, s.run, settings, to_dict(cfg))
            if s.is_main:
                atomic_save({"model": model.state_dict(), "model_config": meta}, model_path)
                write_card_for(model_path, meta, "reid")
        metrics: dict[str, float] = {}
        report = "No query/gallery split in the data: nothing to score.\n"
        if s.is_main and market is not None:
            from downstream.reid.evaluate import evaluate_market

            metrics = evaluate_market(model, meta, cfg.data.path, cfg.eval, s.run.path, s.device,
                                      progress=cfg.train.progress)
            report = (s.run.path / "eval.md").read_text()
    return ReIDResult(s.run.path, result.steps, result.final_loss, model_path, metrics, report)
