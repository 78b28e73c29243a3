"""Fine-tune a detector (optionally from a pretrained encoder) and evaluate it on the test images.

:class:`DetTrainTask` runs on the one training loop (:mod:`engine.loop`): the loss is the sum of
torchvision's loss terms, each also logged to ``metrics.csv``; AdamW with linear warm-up then cosine
decay; AP50 on the val images keeps ``best.pt``. The detector's own sampling (RPN and RoI minibatches)
draws from torch's global generator, so each step runs under a generator seeded from ``(seed, step,
rank)``: a resumed run then repeats the uninterrupted one exactly. The run folder holds ``config.yaml``,
``split.json``, ``model.pt`` (weights and the plain metadata that rebuilds the detector), ``model.json``
(its model card), ``eval.json`` and ``results.json`` (COCO metrics and detections on the test images).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from downstream.det.config import DetConfig
from downstream.det.data import DetDataset, category_ids, collate, read_det_set, select, split_ids
from downstream.det.evaluate import MODEL_KEYS, evaluate_images, write_eval
from downstream.det.model import backbone_body, build_det_model, check_model_config, normalisation
from engine.checkpoint import atomic_save, load_checkpoint
from engine.device import select_amp
from engine.loop import LoopSettings, Parts, Task, finished_result, session, train
from engine.optim import param_groups, warmup_cosine
from engine.sampling import ResumableSampler, sample_seed
from twinview.config import ConfigError, to_dict
from twinview.data.coco import DetImage, DetSet
from twinview.model_card import write_card_for

LOSS_PARTS = {"faster_rcnn": ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"),
              "retinanet": ("classification", "bbox_regression")}


@dataclass
class DetResult:
    run_dir: Path
    steps: int
    final_loss: float
    model_path: Path
    test: dict[str, float | None]  # COCO metrics on the test images (empty without test images)


def check_config(cfg: DetConfig) -> None:
    """One-line ``ConfigError`` for settings that do not fit together."""
    check_model_config(cfg.model, cfg.data.in_channels)
    if not cfg.data.path:
        raise ConfigError(None, "data.path is empty: give a COCO JSON file (data.kind=coco) or a DSB2018 "
                                "folder")


def model_metadata(cfg: DetConfig, det_set: DetSet) -> dict[str, Any]:
    """What ``model.pt`` needs besides the weights: the detector, its categories and preprocessing."""
    m, d = to_dict(cfg.model), cfg.data
    mean, std = normalisation(cfg.model, d.in_channels)
    ids = category_ids(det_set)
    return {**{k: m[k] for k in MODEL_KEYS}, "image_mean": mean, "image_std": std,
            "in_channels": d.in_channels, "max_value": d.max_value, "category_ids": ids,
            "labels": {"0": "background", **{str(k): det_set.categories[c] for k, c in enumerate(ids, 1)}},
            "kind": d.kind, "data_name": Path(d.path).name or d.path, "size": d.size,
            "encoder_weights": m["encoder_weights"]}


def load_split(run_dir: Path, cfg: DetConfig, det_set: DetSet) -> dict[str, Any]:
    """The run's split: drawn once and written to ``split.json``; a resumed run reads it back."""
    path = run_dir / "split.json"
    if path.exists():
        return json.loads(path.read_text())
    split = split_ids(det_set, cfg.data, cfg.train.seed)
    path.write_text(json.dumps(split, indent=1) + "\n")
    return split


class DetTrainTask(Task):
    """Augmented crops of the training images -> torchvision's detection losses; val AP50."""

    name = "detect"
    best_metric = "val_ap50"

    def __init__(self, cfg: DetConfig, det_set: DetSet, split: dict[str, Any], model: nn.Module,
                 amp_dtype: torch.dtype | None) -> None:
        self.cfg, self.det_set, self.split, self.model, self.amp_dtype = cfg, det_set, split, model, amp_dtype
        self.parts = LOSS_PARTS[cfg.model.arch]
        self.extra_fields = (*self.parts, "val_ap50", "val_ap")
        self.val_images: list[DetImage] = select(det_set, split["val"]) if cfg.train.val_every_steps else []
        self.last_parts: dict[str, torch.Tensor] = {}
        self.step = 0

    def build(self, device: torch.device, rank: int, world: int) -> Parts:
        cfg, t = self.cfg, self.cfg.train
        images = select(self.det_set, self.split["train"])
        self.dataset = DetDataset(images, category_ids(self.det_set), cfg.data, augment=True, seed=t.seed,
                                  length=max(len(images), t.batch_size * world))
        self.sampler = ResumableSampler(len(self.dataset), t.seed, rank, world)
        loader = DataLoader(self.dataset, batch_size=t.batch_size, sampler=self.sampler, drop_last=True,
                            collate_fn=collate, pin_memory=device.type == "cuda")
        self.device, self.rank = device, rank
        optimizer = torch.optim.AdamW(param_groups(self.model, cfg.optim.lr, cfg.optim.weight_decay,
                                                   backbone_body(self.model), cfg.model.encoder_lr_mult))
        steps_per_epoch = len(self.dataset) // world // t.batch_size
        return Parts(self.model, optimizer, warmup_cosine(optimizer, cfg.optim.warmup_steps, t.steps), loader,
                     self.set_epoch, steps_per_epoch, t.steps, t.batch_size * world)

    def set_epoch(self, epoch: int, done: int) -> None:
        self.sampler.set_epoch(epoch, start=done * self.cfg.train.batch_size)
        self.dataset.epoch = epoch

    def before_step(self, step: int) -> None:
        self.step = step

    def compute_loss(self, model: nn.Module, batch: tuple[tuple[torch.Tensor, ...], tuple[dict, ...]]
                     ) -> torch.Tensor:
        images = [x.to(self.device, non_blocking=True) for x in batch[0]]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in batch[1]]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(sample_seed(self.cfg.train.seed, self.step, self.rank))
            losses = model(images, targets)
        self.last_parts = {k: v.detach() for k, v in losses.items()}
        return sum(v.float() for v in losses.values())

    def validate(self, step: int, total_steps: int) -> dict[str, float]:
        t = self.cfg.train
        out: dict[str, float] = {}
        if step % t.log_every_steps == 0 or step == total_steps:
            out.update({k: float(v) for k, v in self.last_parts.items()})
        if self.val_images and (step % t.val_every_steps == 0 or step == total_steps):
            metrics, _ = evaluate_images(self.model, self.model_config or {}, self.val_images,
                                         self.det_set.categories, self.device, self.amp_dtype)
            out.update(val_ap50=_or_zero(metrics["AP50"]), val_ap=_or_zero(metrics["AP"]))
        return out


def _or_zero(value: float | None) -> float:
    """AP where the val images hold no boxes at all (COCO's -1): 0, so that best.pt stays comparable."""
    return 0.0 if value is None else value


def run_detection(cfg: DetConfig, resume: Path | None = None) -> DetResult:
    """Train (or resume) a detection run, then evaluate it on its test images."""
    check_config(cfg)
    t = cfg.train
    det_set = read_det_set(cfg.data)
    with session(cfg, "model.pt", resume) as s:
        amp_dtype = select_amp(t.amp, s.device)
        split = load_split(s.run.path, cfg, det_set)
        meta = model_metadata(cfg, det_set)
        model, encoder_meta = build_det_model(cfg.model, cfg.data.in_channels, len(meta["category_ids"]))
        if encoder_meta is not None:
            meta["pretraining_method"] = encoder_meta.get("method")
        model = model.to(s.device)
        model_path = s.run.path / "model.pt"
        if s.run.finished:  # training finished earlier; only the evaluation may be left
            model.load_state_dict(load_checkpoint(model_path, map_location=s.device)["model"])
            result = finished_result(s.run)
        else:
            task = DetTrainTask(cfg, det_set, split, model, amp_dtype)
            task.model_config = meta
            result = train(task, s.run, LoopSettings.from_config(cfg, s.device, amp_dtype), to_dict(cfg))
            if s.is_main:
                atomic_save({"model": model.state_dict(), "model_config": meta}, model_path)
                write_card_for(model_path, meta, "detection")
        test: dict[str, float | None] = {}
        if split["test"] and s.is_main:
            images = select(det_set, split["test"])
            test, results = evaluate_images(model, meta, images, det_set.categories, s.device, amp_dtype,
                                            progress=t.progress)
            write_eval(s.run.path, test, results, {
                "images": len(images), "split": "test", "train_images": len(split["train"]),
                "label_fraction": cfg.data.label_fraction, "steps": result.steps, "best": result.best})
    return DetResult(s.run.path, result.steps, result.final_loss, model_path, test)

