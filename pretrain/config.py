"""Typed pretraining config. YAML files in ``configs/pretrain/`` fill these dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from twinview.config import (
    Axis,
    NonNegative,
    NonNegativeInt,
    Positive,
    PositiveInt,
    ProperFraction,
    UnitInterval,
)


@dataclass
class DataConfig:
    """What to read and how to make views of it."""

    path: str = ""  # a folder in any layout twinview reads (see `twinview data inspect`)
    kind: Literal["auto", "images", "market1501", "msd_slices", "msd_3d", "dsb2018"] = "auto"
    views: Literal["ct", "mri", "microscopy", "reid", "natural"] = "natural"
    size: list[PositiveInt] = field(default_factory=lambda: [64, 64])  # (H, W) or (D, H, W)
    channels: PositiveInt = 3
    workers: NonNegativeInt = 0
    slice_axis: Axis = 2  # for msd_slices: the axis slices are taken along
    # msd_slices and msd_3d read MSD tasks, nnU-Net raw sets and per-case folders (with the image
    # patterns): every modality when channels is their number, else the first one
    image: list[str] = field(default_factory=list)  # per-case folders: a file-name pattern per channel
    exclude_cases: list[str] = field(default_factory=list)  # MSD case / DSB2018 sample ids held out
    # ram: volumes loaded into memory; disk: written once to cache_dir (default ~/.cache/twinview/pretrain)
    # and read back per sample (a slice through a memory map), for volume sets larger than memory
    cache: Literal["ram", "disk"] = "ram"
    cache_dir: str = ""


@dataclass
class ModelConfig:
    encoder: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    small_stem: bool = False  # 3x3 stride-1 first conv and no max-pool, for small images
    sync_bn: bool = False  # SyncBatchNorm across ranks under torchrun
    # A pretraining run (or its encoder.pt) to start from; method local keeps it fixed (and needs it)
    encoder_weights: str = ""


@dataclass
class MethodConfig:
    """Method and head sizes; a value left as null takes the method's paper default
    (``pretrain.methods.PAPER_DEFAULTS``)."""

    # gcl/pcl: global contrast with positional positives (slices of volumes, data.kind msd_slices);
    # local: decoder pretraining on a fixed encoder (model.encoder_weights), aligned mri views
    name: Literal["simclr", "moco", "byol", "simsiam", "gcl", "pcl", "local"] = "simclr"
    temperature: Positive | None = None  # SimCLR 0.1, MoCo 0.2, gcl/pcl/local 0.1
    proj_hidden: PositiveInt | None = None
    proj_out: PositiveInt | None = None
    pred_hidden: PositiveInt | None = None  # BYOL, SimSiam
    queue_size: PositiveInt | None = None  # MoCo
    momentum: UnitInterval | None = None  # MoCo key encoder EMA decay (1 = frozen)
    tau_base: UnitInterval | None = None  # BYOL target EMA at step 0
    partitions: PositiveInt | None = None  # gcl: equal partitions along the slice axis (4)
    position_threshold: ProperFraction | None = None  # pcl: positives closer than this (0.1 of the volume)
    local_grid: PositiveInt | None = None  # local: regions per side the decoder map is averaged over (4)


@dataclass
class OptimConfig:
    name: Literal["sgd", "lars", "adamw"] = "sgd"
    lr: Positive = 0.06  # for a batch of 256; scaled linearly with the global batch
    weight_decay: NonNegative = 5e-4
    momentum: ProperFraction = 0.9  # sgd and lars
    warmup_epochs: NonNegative = 1.0
    grad_clip: NonNegative = 0.0  # max global norm; 0 = off


@dataclass
class TrainConfig:
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 64  # per process
    max_steps: NonNegativeInt = 0  # stop after this many steps in total (0 = run all epochs)
    seed: NonNegativeInt = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # fp32 = no autocast
    channels_last: bool = True
    ckpt_every_steps: PositiveInt = 200
    keep_last: PositiveInt = 2
    log_every_steps: PositiveInt = 10
    knn_every_epochs: NonNegativeInt = 1  # kNN monitor when the data has labels (0 = off)
    knn_k: PositiveInt = 20
    knn_temperature: Positive = 0.1
    progress: bool = True


@dataclass
class PretrainConfig:
    out_dir: str = "runs/pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
