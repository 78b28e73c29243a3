"""Fine-tune a segmentation network (optionally from a pretrained encoder) and evaluate it on test cases.

:class:`SegTrainTask` runs on the one training loop (:mod:`engine.loop`), which also runs under
``torchrun``; validation keeps ``best.pt`` by validation Dice. Loss: Dice (over the batch) + cross-entropy
(MONAI ``DiceCELoss``); AdamW with linear warm-up then cosine decay; validation Dice on the val cases by
sliding-window inference. The run folder holds ``config.yaml``, ``split.json``, ``model.pt`` (weights
and the plain metadata needed to rebuild the network), ``model.json`` (its model card),
``test_metrics.csv``, ``summary.json`` and overlay PNGs of test cases.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader

from downstream.seg.config import SegConfig, SegDataConfig
from downstream.seg.data import (
    Case,
    PatchDataset,
    SegTask,
    make_split,
    preprocess_case,
    preprocess_metadata,
    read_task,
    to_slices,
    train_transform,
)
from downstream.seg.model import (
    build_seg_model,
    divisor,
    encoder_of,
    load_pretrained_decoder,
    load_pretrained_encoder,
    set_encoder_frozen,
)
from engine.checkpoint import atomic_save, load_checkpoint
from engine.device import select_amp
from engine.loop import BEST_FILE, LoopSettings, Parts, Task, finished_result, session, train
from engine.optim import param_groups, warmup_cosine
from engine.sampling import ResumableSampler
from twinview.config import ConfigError, to_dict
from twinview.model_card import write_card_for

LAYOUTS_WITHOUT_JSON = ("case_folders", "image_pairs")  # their patterns and classes go into model.pt


@dataclass
class SegResult:
    run_dir: Path
    steps: int
    final_loss: float
    model_path: Path
    summary: dict[str, float]  # test-set means (empty when there are no test cases)
    table: str  # the test metrics as a Markdown table ("" without test cases)


def check_config(cfg: SegConfig, task: SegTask) -> None:
    d, m = cfg.data, cfg.model
    if d.spatial_dims not in (2, 3):
        raise ConfigError(None, f"data.spatial_dims must be 2 or 3, got {d.spatial_dims}")
    if d.spatial_dims == 3 and task.image_dims == 2:
        raise ConfigError(None, f"{d.path}: {task.name} has 2D images; set data.spatial_dims=2")
    if len(d.roi) != d.spatial_dims:
        raise ConfigError(None, f"data.roi {d.roi} needs {d.spatial_dims} sizes for data.spatial_dims="
                                f"{d.spatial_dims}")
    if cfg.train.final_weights == "best" and not (cfg.train.val_every_steps and d.val_cases):
        raise ConfigError(None, "train.final_weights=best picks the step best on the val cases: set "
                                "train.val_every_steps and data.val_cases above 0")
    k = divisor(m.arch)
    if any(s % k for s in d.roi):
        raise ConfigError(None, f"data.roi {d.roi}: model.arch={m.arch} needs every size divisible by {k}")
    if not 0 <= d.slice_axis <= 2:
        raise ConfigError(None, f"data.slice_axis must be 0, 1 or 2, got {d.slice_axis}")
    if d.flip_axes is not None and any(not 0 <= a < d.spatial_dims for a in d.flip_axes):
        raise ConfigError(None, f"data.flip_axes {d.flip_axes}: a {d.spatial_dims}D patch has axes "
                                f"0-{d.spatial_dims - 1}")


def model_metadata(cfg: SegConfig, task: SegTask) -> dict[str, Any]:
    """What ``model.pt`` needs besides the weights: the network, labels and preprocessing."""
    return {"arch": cfg.model.arch, "encoder": cfg.model.encoder,
            "unet_channels": list(cfg.model.unet_channels),
            "spatial_dims": cfg.data.spatial_dims, "in_channels": task.in_channels,
            "out_channels": max(task.labels) + 1, "labels": {str(k): v for k, v in task.labels.items()},
            "task": task.name, "kind": task.kind, "modality": task.modality,
            "preprocessing": preprocess_metadata(cfg.data, task), "roi": list(cfg.data.roi),
            "encoder_weights": cfg.model.encoder_weights, "decoder_weights": cfg.model.decoder_weights,
            **({"layout": _layout_metadata(cfg.data)} if task.kind in LAYOUTS_WITHOUT_JSON else {})}


def _layout_metadata(d: SegDataConfig) -> dict[str, Any]:
    """What reads another copy of a layout without a dataset.json: the patterns and the mask mapping."""
    return {"image": list(d.image), "label": d.label, "mask_suffix": d.mask_suffix,
            "mask_values": {str(k): int(v) for k, v in d.mask_values.items()}}


def load_split(run_dir: Path, cfg: SegConfig, task: SegTask) -> dict[str, Any]:
    """The run's split: drawn once and written to ``split.json``; a resumed run reads it back."""
    path = run_dir / "split.json"
    if path.exists():
        return json.loads(path.read_text())
    split = make_split([c.case_id for c in task.cases], cfg.data, cfg.train.seed)
    path.write_text(json.dumps(split, indent=1) + "\n")
    return split


class SegTrainTask(Task):
    """Patches of the labelled training cases -> Dice + cross-entropy; validation Dice on the val cases."""

    name = "segment"
    extra_fields = ("val_dice",)
    best_metric = "val_dice"

    def __init__(self, cfg: SegConfig, task: SegTask, split: dict[str, Any], model: nn.Module,
                 amp_dtype: torch.dtype | None) -> None:
        self.cfg, self.task, self.split, self.model, self.amp_dtype = cfg, task, split, model, amp_dtype
        self.find_unused_parameters = cfg.model.freeze_encoder_steps > 0

    def build(self, device: torch.device, rank: int, world: int) -> Parts:
        cfg, t, d = self.cfg, self.cfg.train, self.cfg.data
        items = _train_items(cfg, self.task, self.split["train"])
        val = [self.task.case(i) for i in self.split["val"]] if t.val_every_steps else []
        self.val_cases = ([preprocess_case(c, self.task, d) for c in val] if d.cache == "ram"
                          else _Preprocessed(val, self.task, d))
        self.dataset = PatchDataset(items, train_transform(d.roi, d.pos_fraction, d.flip_axes), seed=t.seed,
                                    length=max(len(items), t.batch_size * world))
        self.sampler = ResumableSampler(len(self.dataset), t.seed, rank, world)
        loader = DataLoader(self.dataset, batch_size=t.batch_size, sampler=self.sampler, drop_last=True,
                            pin_memory=device.type == "cuda")
        self.device = device
        self.memory_format = torch.channels_last if d.spatial_dims == 2 else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        optimizer = torch.optim.AdamW(param_groups(self.model, cfg.optim.lr, cfg.optim.weight_decay,
                                                   encoder_of(self.model), cfg.model.encoder_lr_mult))
        # As nnU-Net: Dice over the whole batch ("batch Dice") and over the foreground classes only.
        # Per-sample Dice rewards predicting nothing on the many slices without the structure, and the
        # background term lets a short run settle on all-background; both made 100-step runs collapse to
        # empty masks.
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, include_background=False)
        steps_per_epoch = len(self.dataset) // world // t.batch_size
        return Parts(self.model, optimizer, warmup_cosine(optimizer, cfg.optim.warmup_steps, t.steps), loader,
                     self.set_epoch, steps_per_epoch, t.steps, t.batch_size * world)

    def set_epoch(self, epoch: int, done: int) -> None:
        self.sampler.set_epoch(epoch, start=done * self.cfg.train.batch_size)
        self.dataset.epoch = epoch

    def compute_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        image = batch[0].to(self.device, non_blocking=True).to(memory_format=self.memory_format)
        return self.loss_fn(model(image).float(), batch[1].to(self.device, non_blocking=True))

    def before_step(self, step: int) -> None:
        set_encoder_frozen(self.model, step < self.cfg.model.freeze_encoder_steps)

    def validate(self, step: int, total_steps: int) -> dict[str, float]:
        every = self.cfg.train.val_every_steps
        if self.val_cases and (step % every == 0 or step == total_steps):
            return {"val_dice": _validate(self.model, self.val_cases, self.task, self.cfg, self.amp_dtype)}
        return {}


def run_segmentation(cfg: SegConfig, resume: Path | None = None) -> SegResult:
    """Train (or resume) a segmentation run, then evaluate it on its test cases."""
    t, d = cfg.train, cfg.data
    task = read_task(d)
    check_config(cfg, task)
    with session(cfg, "model.pt", resume) as s:
        amp_dtype = select_amp(t.amp, s.device)
        split = load_split(s.run.path, cfg, task)
        meta = model_metadata(cfg, task)
        model = build_seg_model(cfg.model, d.spatial_dims, task.in_channels, meta["out_channels"])
        if cfg.model.encoder_weights:
            meta["pretraining_method"] = load_pretrained_encoder(model, cfg.model, d.spatial_dims,
                                                                 task.in_channels).get("method")
        if cfg.model.decoder_weights:
            meta["decoder_pretraining_method"] = load_pretrained_decoder(model, cfg.model, d.spatial_dims,
                                                                         task.in_channels).get("method")
        model = model.to(s.device)
        model_path = s.run.path / "model.pt"
        if s.run.finished:  # training finished earlier; only the evaluation may be left
            model.load_state_dict(load_checkpoint(model_path, map_location=s.device)["model"])
            result = finished_result(s.run)
        else:
            seg_task = SegTrainTask(cfg, task, split, model, amp_dtype)
            seg_task.model_config = meta
            result = train(seg_task, s.run, LoopSettings.from_config(cfg, s.device, amp_dtype), to_dict(cfg))
            set_encoder_frozen(model, False)
            if s.is_main:
                if t.final_weights == "best" and result.best is not None:
                    best = load_checkpoint(s.run.path / BEST_FILE, map_location=s.device)
                    model.load_state_dict(best["model"])
                    meta["selected_step"] = int(result.best["step"])
                atomic_save({"model": model.state_dict(), "model_config": meta}, model_path)
                write_card_for(model_path, meta, "segmentation")
        summary: dict[str, float] = {}
        table = ""
        if split["test"] and s.is_main:
            from downstream.seg.evaluate import evaluate_cases, metrics_table

            _, summary = evaluate_cases(model, meta, task, d, split["test"], s.run.path, s.device, t,
                                        amp_dtype, progress=t.progress)
            table = metrics_table(summary, task.labels)
            (s.run.path / "summary.json").write_text(json.dumps(
                {"test": summary, "train_cases": len(split["train"]), "label_fraction": d.label_fraction,
                 "label_cases": d.label_cases, "steps": result.steps, "best": result.best}, indent=2) + "\n")
    return SegResult(s.run.path, result.steps, result.final_loss, model_path, summary, table)


class _Preprocessed(Sequence):
    """Cases preprocessed each time they are read (validation with ``data.cache: disk``)."""

    def __init__(self, cases: list[Case], task: SegTask, data: SegDataConfig) -> None:
        self.cases, self.task, self.data = cases, task, data

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        return preprocess_case(self.cases[i], self.task, self.data)


def _train_items(cfg: SegConfig, task: SegTask, ids: list[str]) -> Sequence[dict[str, Any]]:
    from tqdm.auto import tqdm

    slices = cfg.data.spatial_dims == 2 and task.image_dims == 3
    if cfg.data.cache == "disk":
        from downstream.seg.store import CaseStore, StoredItems

        store = CaseStore.build([task.case(i) for i in ids], task, cfg.data, progress=cfg.train.progress)
        return StoredItems(store, ids, slices)
    cases = [preprocess_case(task.case(i), task, cfg.data)
             for i in tqdm(ids, desc="load train", disable=not cfg.train.progress, unit="case")]
    if slices:
        return to_slices(cases, cfg.data.slice_axis)
    return [{"image": c["image"].as_tensor(), "label": c["label"].as_tensor()} for c in cases]


def _validate(model: nn.Module, cases: list[dict[str, Any]], task: SegTask, cfg: SegConfig,
              amp_dtype: torch.dtype | None) -> float:
    """Mean foreground Dice over the validation cases."""
    from downstream.seg.data import spacing_of
    from downstream.seg.inference import predict_logits
    from downstream.seg.metrics import case_metrics

    scores = []
    for case in cases:
        logits = predict_logits(model, case["image"], cfg.data.spatial_dims, cfg.data.roi,
                                cfg.data.slice_axis, cfg.train.sw_batch_size, cfg.train.overlap, amp_dtype)
        pred = logits.argmax(0).numpy()
        truth = case["label"].as_tensor()[0].numpy().astype(np.int64)
        scores.append(case_metrics(pred, truth, task.labels, spacing_of(case["image"]))["dice_mean"])
    return float(np.mean(scores))
