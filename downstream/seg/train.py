"""Fine-tune a segmentation network (optionally from a pretrained encoder) and evaluate it on test cases.

The loop is ``downstream.loop`` (shared with re-ID, built on the pretraining pieces): precision choice,
atomic rotating checkpoints with exact resume, non-finite loss detection, a progress bar,
``metrics.csv`` + TensorBoard; the loss-curve PNG follows. Loss: Dice (over the batch) + cross-entropy
(MONAI ``DiceCELoss``); AdamW with linear warm-up then cosine decay; validation Dice on the val cases by
sliding-window inference. The run folder holds ``config.yaml``, ``split.json``, ``model.pt`` (weights
and the plain metadata needed to rebuild the network and its preprocessing), ``test_metrics.csv``,
``summary.json`` and overlay PNGs of test cases.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader

from downstream.loop import LoopSpec, run_loop
from downstream.seg.config import SegConfig
from downstream.seg.data import (
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
    load_pretrained_encoder,
    param_groups,
    set_encoder_frozen,
)
from pretrain.checkpoint import atomic_save, latest_checkpoint, load_checkpoint
from pretrain.datasets import ResumableSampler
from pretrain.optim import warmup_cosine
from pretrain.trainer import plot_loss_curve, select_amp, select_device, set_determinism
from twinview.config import ConfigError, save_config, to_dict


@dataclass
class SegResult:
    run_dir: Path
    steps: int
    final_loss: float
    model_path: Path
    summary: dict[str, float]  # test-set means (empty when there are no test cases)


def check_config(cfg: SegConfig, task: SegTask) -> None:
    d, m = cfg.data, cfg.model
    if d.spatial_dims not in (2, 3):
        raise ConfigError(None, f"data.spatial_dims must be 2 or 3, got {d.spatial_dims}")
    if d.spatial_dims == 3 and task.image_dims == 2:
        raise ConfigError(None, f"{d.path}: {task.name} has 2D images; set data.spatial_dims=2")
    if len(d.roi) != d.spatial_dims:
        raise ConfigError(None, f"data.roi {d.roi} needs {d.spatial_dims} sizes for data.spatial_dims="
                                f"{d.spatial_dims}")
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
            "preprocessing": preprocess_metadata(cfg.data, task),
            "encoder_weights": cfg.model.encoder_weights}


def load_split(run_dir: Path, cfg: SegConfig, task: SegTask, resuming: bool) -> dict[str, Any]:
    path = run_dir / "split.json"
    if resuming and path.exists():
        return json.loads(path.read_text())
    split = make_split([c.case_id for c in task.cases], cfg.data, cfg.train.seed)
    path.write_text(json.dumps(split, indent=1) + "\n")
    return split


def run_segmentation(cfg: SegConfig, resume: Path | None = None) -> SegResult:
    """Train (or resume) a segmentation run, then evaluate it on its test cases."""
    t, d = cfg.train, cfg.data
    run_dir = Path(resume) if resume is not None else Path(cfg.out_dir)
    ckpt_path = latest_checkpoint(run_dir) if resume is not None else None
    if resume is not None and ckpt_path is None and not (run_dir / "model.pt").exists():
        raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from")
    if resume is None and (latest_checkpoint(run_dir) is not None or (run_dir / "model.pt").exists()):
        raise FileExistsError(f"{run_dir}: already holds a run; pass --resume {run_dir} or choose out_dir")
    task = read_task(d)
    check_config(cfg, task)
    set_determinism(t.seed, deterministic=False)
    device = select_device(t.device)
    amp_dtype = select_amp(t.amp, device, d.spatial_dims)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    split = load_split(run_dir, cfg, task, resuming=resume is not None)
    meta = model_metadata(cfg, task)

    model = build_seg_model(cfg.model, d.spatial_dims, task.in_channels, meta["out_channels"])
    if cfg.model.encoder_weights:
        load_pretrained_encoder(model, cfg.model, d.spatial_dims, task.in_channels)
    model = model.to(device)
    if (run_dir / "model.pt").exists():  # training finished earlier; only the evaluation is left
        model.load_state_dict(load_checkpoint(run_dir / "model.pt", map_location=device)["model"])
        steps, last_loss = t.steps, math.nan
    else:
        steps, last_loss = _train(cfg, task, split, model, device, amp_dtype, run_dir, ckpt_path)
        atomic_save({"model": model.state_dict(), "model_config": meta}, run_dir / "model.pt")
        plot_loss_curve(run_dir / "metrics.csv", run_dir / "loss_curve.png", title="segmentation loss")
    summary: dict[str, float] = {}
    if split["test"]:
        from downstream.seg.evaluate import evaluate_cases

        rows, summary = evaluate_cases(model, meta, task, d, split["test"], run_dir, device, t, amp_dtype,
                                       progress=t.progress)
        (run_dir / "summary.json").write_text(json.dumps(
            {"test": summary, "train_cases": len(split["train"]), "label_fraction": d.label_fraction,
             "steps": steps}, indent=2) + "\n")
    return SegResult(run_dir, steps, last_loss, run_dir / "model.pt", summary)


def _train_items(cfg: SegConfig, task: SegTask, ids: list[str]) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    cases = [preprocess_case(task.case(i), task, cfg.data)
             for i in tqdm(ids, desc="load train", disable=not cfg.train.progress, unit="case")]
    if cfg.data.spatial_dims == 2 and task.image_dims == 3:
        return to_slices(cases, cfg.data.slice_axis)
    return [{"image": c["image"].as_tensor(), "label": c["label"].as_tensor()} for c in cases]


def _train(cfg: SegConfig, task: SegTask, split: dict[str, Any], model: nn.Module, device: torch.device,
           amp_dtype: torch.dtype | None, run_dir: Path, ckpt_path: Path | None) -> tuple[int, float]:
    t, d = cfg.train, cfg.data
    items = _train_items(cfg, task, split["train"])
    val_cases = [preprocess_case(task.case(i), task, d) for i in split["val"]] if t.val_every_steps else []
    dataset = PatchDataset(items, train_transform(d.roi, d.pos_fraction, d.flip_axes), seed=t.seed,
                           length=max(len(items), t.batch_size))
    sampler = ResumableSampler(len(dataset), t.seed)
    loader = DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, drop_last=True,
                        pin_memory=device.type == "cuda")
    memory_format = torch.channels_last if d.spatial_dims == 2 else torch.contiguous_format
    model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.lr, cfg.optim.weight_decay,
                                               cfg.model.encoder_lr_mult))
    # As nnU-Net: Dice over the whole batch ("batch Dice") and over the foreground classes only. Per-sample
    # Dice rewards predicting nothing on the many slices without the structure, and the background term
    # lets a short run settle on all-background; both made 100-step runs collapse to empty masks.
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, include_background=False)

    def set_epoch(epoch: int, done: int) -> None:
        sampler.set_epoch(epoch, start=done * t.batch_size)
        dataset.epoch = epoch

    def compute_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        image = batch[0].to(device, non_blocking=True).to(memory_format=memory_format)
        return loss_fn(model(image).float(), batch[1].to(device, non_blocking=True))

    def validate(step: int) -> dict[str, float]:
        if val_cases and (step % t.val_every_steps == 0 or step == t.steps):
            return {"val_dice": _validate(model, val_cases, task, cfg, amp_dtype)}
        return {}

    spec = LoopSpec(
        model=model, optimizer=optimizer,
        scheduler=warmup_cosine(optimizer, cfg.optim.warmup_steps, t.steps), loader=loader,
        set_epoch=set_epoch, steps_per_epoch=len(dataset) // t.batch_size, total_steps=t.steps,
        compute_loss=compute_loss, batch_size=t.batch_size, run_dir=run_dir, config=to_dict(cfg),
        device=device, amp_dtype=amp_dtype, grad_clip=cfg.optim.grad_clip, ckpt_every=t.ckpt_every_steps,
        keep_last=t.keep_last, log_every=t.log_every_steps, progress=t.progress, desc="segment",
        extra_fields=["val_dice"],
        before_step=lambda step: set_encoder_frozen(model, step < cfg.model.freeze_encoder_steps),
        after_step=validate)
    steps, last_loss = run_loop(spec, resume_from=ckpt_path)
    set_encoder_frozen(model, False)
    return steps, last_loss


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
