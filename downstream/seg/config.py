"""Typed segmentation config. YAML files in ``configs/seg/`` fill these dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from twinview.config import (
    Axis,
    Fraction,
    NonNegative,
    NonNegativeInt,
    Positive,
    PositiveInt,
    Probability,
    ProperFraction,
)


@dataclass
class SegDataConfig:
    """Which labelled cases to read, how to split them and how to preprocess them."""

    # an MSD task, an nnU-Net raw data set, per-case folders, 2D image/mask pairs, or a DSB2018 folder
    path: str = ""
    kind: Literal["auto", "msd", "nnunet", "case_folders", "image_pairs", "dsb2018"] = "auto"
    # per-case folders: a file-name pattern per image channel (in order) and the label's pattern
    image: list[str] = field(default_factory=list)
    label: str = ""
    # per-case folders and image/mask pairs (no dataset.json): class value -> name, 0 = background
    labels: dict[int, str] = field(default_factory=dict)
    mask_suffix: str | None = None  # image/mask pairs: the mask stem's suffix (null: found from the names)
    mask_values: dict[int, int] = field(default_factory=dict)  # image/mask pairs: stored value -> class
    # 2: the model sees 2D slices of the volumes (along slice_axis) or 2D images
    spatial_dims: Literal[2, 3] = 3
    slice_axis: Axis = 2  # volume axis the 2D slices are taken along (after orientation)
    # training patch and inference window (model.arch may need multiples of 16 or 32)
    roi: list[PositiveInt] = field(default_factory=lambda: [64, 64, 64])
    orientation: str = "RAS"  # volumes are reoriented to these axis codes ("" keeps the file's order)
    spacing: list[Positive] | None = None  # resample volumes to this voxel size in mm (null keeps it)
    normalize: Literal["auto", "zscore", "ct_window", "percentile"] = "auto"  # auto: from the modality
    ct_window: list[float] = field(default_factory=lambda: [-175.0, 250.0])  # HU range mapped to [0, 1]
    pos_fraction: Probability = 0.67  # share of training patches centred on foreground
    # patch axes mirrored at random (null: all). Leave out an axis along which the labels depend on
    # position, e.g. anterior/posterior hippocampus along the A-P axis (axis 1 in RAS).
    flip_axes: list[Axis] | None = None
    test_cases: NonNegativeInt = 40  # fixed held-out test cases (seeded by split_seed)
    val_cases: NonNegativeInt = 10  # validation cases, from the rest
    split_seed: NonNegativeInt = 0
    label_fraction: Fraction = 1.0  # share of the remaining labelled cases used for training
    label_cases: NonNegativeInt = 0  # train on this many labelled cases instead (0: use label_fraction)
    split_file: str = ""  # reuse this split.json (its test and val cases) instead of drawing one
    # ram: every training case preprocessed into memory; disk: preprocessed once into cache_dir (default
    # ~/.cache/twinview/seg, or $TWINVIEW_CACHE/seg) and read back as needed, for data larger than memory
    cache: Literal["ram", "disk"] = "ram"
    cache_dir: str = ""
    cache_ram_gb: NonNegative = 2.0  # disk: the most recently used cases kept in memory, up to this size


@dataclass
class SegModelConfig:
    arch: Literal["flexunet", "unet", "smp_unet"] = "flexunet"
    encoder: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"  # flexunet and smp_unet
    encoder_weights: str = ""  # a pretraining run folder or its encoder.pt; "" = random init
    decoder_weights: str = ""  # flexunet: a decoder-pretraining run (method local) or its decoder.pt
    unet_channels: list[PositiveInt] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # plain UNet
    freeze_encoder_steps: NonNegativeInt = 0  # keep the encoder fixed for the first steps
    encoder_lr_mult: NonNegative = 1.0  # encoder learning rate = optim.lr * this


@dataclass
class SegOptimConfig:
    lr: Positive = 1e-3  # AdamW
    weight_decay: NonNegative = 1e-4
    warmup_steps: NonNegativeInt = 50  # then cosine decay to 0
    grad_clip: NonNegative = 1.0  # max global norm; 0 = off


@dataclass
class SegTrainConfig:
    steps: PositiveInt = 2000
    batch_size: PositiveInt = 16
    seed: NonNegativeInt = 0
    deterministic: bool = False  # deterministic kernels only (slower; for bitwise-repeatable runs)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    val_every_steps: NonNegativeInt = 500  # validation Dice on the val cases (0 = off)
    # model.pt (and the test scores) from the last step, or from the step best on the val cases
    final_weights: Literal["last", "best"] = "last"
    ckpt_every_steps: PositiveInt = 250
    keep_last: PositiveInt = 2
    log_every_steps: PositiveInt = 10
    sw_batch_size: PositiveInt = 32  # windows (or slices) per forward pass at inference
    overlap: ProperFraction = 0.25  # sliding-window overlap at inference
    progress: bool = True


@dataclass
class SegConfig:
    out_dir: str = "runs/seg"
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
