"""Typed pretraining config. YAML files in ``configs/pretrain/`` fill these dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    """What to read and how to make views of it."""

    path: str = ""  # a folder in any layout twinview reads (see `twinview data inspect`)
    kind: Literal["auto", "images", "market1501", "msd_slices", "msd_3d", "dsb2018"] = "auto"
    views: Literal["ct", "mri", "microscopy", "reid", "natural"] = "natural"
    size: list[int] = field(default_factory=lambda: [64, 64])  # (H, W) or (D, H, W)
    channels: int = 3
    workers: int = 0
    slice_axis: int = 2  # for msd_slices: the axis slices are taken along
    exclude_cases: list[str] = field(default_factory=list)  # MSD case ids left out (a held-out test split)


@dataclass
class ModelConfig:
    encoder: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    small_stem: bool = False  # 3x3 stride-1 first conv and no max-pool, for small images
    sync_bn: bool = False  # SyncBatchNorm across ranks under torchrun


@dataclass
class MethodConfig:
    """Method and head sizes; a value left as null takes the method's paper default
    (``pretrain.methods.PAPER_DEFAULTS``)."""

    name: Literal["simclr", "moco", "byol", "simsiam"] = "simclr"
    temperature: float | None = None  # SimCLR 0.1, MoCo 0.2
    proj_hidden: int | None = None
    proj_out: int | None = None
    pred_hidden: int | None = None  # BYOL, SimSiam
    queue_size: int | None = None  # MoCo
    momentum: float | None = None  # MoCo key encoder
    tau_base: float | None = None  # BYOL target EMA at step 0


@dataclass
class OptimConfig:
    name: Literal["sgd", "lars", "adamw"] = "sgd"
    lr: float = 0.06  # for a batch of 256; scaled linearly with the global batch
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    grad_clip: float = 0.0  # max global norm; 0 = off


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # per process
    max_steps: int = 0  # stop after this many steps in total (0 = run all epochs)
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # fp32 = no autocast
    channels_last: bool = True
    ckpt_every_steps: int = 200
    keep_last: int = 2
    log_every_steps: int = 10
    knn_every_epochs: int = 1  # kNN monitor when the data has labels (0 = off)
    knn_k: int = 20
    knn_temperature: float = 0.1
    progress: bool = True


@dataclass
class PretrainConfig:
    out_dir: str = "runs/pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
