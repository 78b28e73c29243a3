"""Typed segmentation config. YAML files in ``configs/seg/`` fill these dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class SegDataConfig:
    """Which labelled cases to read, how to split them and how to preprocess them."""

    path: str = ""  # an MSD task folder, or a DSB2018 folder (2D)
    kind: Literal["auto", "msd", "dsb2018"] = "auto"
    spatial_dims: int = 3  # 2: the model sees 2D slices of the volumes (along slice_axis) or 2D images
    slice_axis: int = 2  # volume axis the 2D slices are taken along (after orientation)
    roi: list[int] = field(default_factory=lambda: [64, 64, 64])  # training patch and inference window
    orientation: str = "RAS"  # volumes are reoriented to these axis codes ("" keeps the file's order)
    spacing: list[float] | None = None  # resample volumes to this voxel size in mm (null keeps it)
    normalize: Literal["auto", "zscore", "ct_window", "percentile"] = "auto"  # auto: from the modality
    ct_window: list[float] = field(default_factory=lambda: [-175.0, 250.0])  # HU range mapped to [0, 1]
    pos_fraction: float = 0.67  # share of training patches centred on foreground
    # patch axes mirrored at random (null: all). Leave out an axis along which the labels depend on
    # position, e.g. anterior/posterior hippocampus along the A-P axis (axis 1 in RAS).
    flip_axes: list[int] | None = None
    test_cases: int = 40  # fixed held-out test cases (seeded by split_seed)
    val_cases: int = 10  # validation cases, from the rest
    split_seed: int = 0
    label_fraction: float = 1.0  # share of the remaining labelled cases used for training
    split_file: str = ""  # reuse this split.json (its test and val cases) instead of drawing one


@dataclass
class SegModelConfig:
    arch: Literal["flexunet", "unet", "smp_unet"] = "flexunet"
    encoder: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"  # flexunet and smp_unet
    encoder_weights: str = ""  # a pretraining run folder or its encoder.pt; "" = random init
    unet_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # plain UNet
    freeze_encoder_steps: int = 0  # keep the encoder fixed for the first steps
    encoder_lr_mult: float = 1.0  # encoder learning rate = optim.lr * this


@dataclass
class SegOptimConfig:
    lr: float = 1e-3  # AdamW
    weight_decay: float = 1e-4
    warmup_steps: int = 50  # then cosine decay to 0
    grad_clip: float = 1.0


@dataclass
class SegTrainConfig:
    steps: int = 2000
    batch_size: int = 16
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    val_every_steps: int = 500  # validation Dice on the val cases (0 = off)
    ckpt_every_steps: int = 250
    keep_last: int = 2
    log_every_steps: int = 10
    sw_batch_size: int = 32  # windows (or slices) per forward pass at inference
    overlap: float = 0.25  # sliding-window overlap at inference
    progress: bool = True


@dataclass
class SegConfig:
    out_dir: str = "runs/seg"
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
