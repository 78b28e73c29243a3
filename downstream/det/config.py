"""Typed detection config. YAML files in ``configs/det/`` fill these dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from twinview.config import Fraction, NonNegative, NonNegativeInt, Positive, PositiveInt, Probability, Range

FPN_LEVELS = 5  # both detectors see five FPN maps: P2-P6 (Faster R-CNN) or P3-P7 (RetinaNet)


@dataclass
class DetDataConfig:
    """Which boxes to read, how to split the images and how to crop them for training."""

    path: str = ""  # a COCO JSON file (kind coco) or a DSB2018 folder (kind dsb2018)
    kind: Literal["coco", "dsb2018"] = "dsb2018"
    image_root: str = ""  # coco: the folder file_name is relative to ("" = beside the JSON, or its images/)
    in_channels: Literal[1, 3] = 3  # images are read as grey (1: CT, fluorescence) or RGB (3)
    max_value: Positive = 255.0  # pixel values are divided by this (65535 for 16-bit images)
    size: PositiveInt | None = 256  # training images are cropped/padded to size x size (null: whole)
    rotate90: bool = True  # training augmentation adds 90-degree turns (no preferred orientation)
    test_cases: NonNegativeInt = 10  # fixed held-out test images (seeded by split_seed)
    val_cases: NonNegativeInt = 5  # validation images, from the rest
    split_seed: NonNegativeInt = 0
    label_fraction: Fraction = 1.0  # share of the remaining images used for training
    split_file: str = ""  # reuse this split.json (its test and val images) instead of drawing one


@dataclass
class DetModelConfig:
    arch: Literal["faster_rcnn", "retinanet"] = "faster_rcnn"
    encoder: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    encoder_weights: str = ""  # a pretraining run folder or its encoder.pt; "" = random init
    # Backbone normalisation. frozen: FrozenBatchNorm2d (ImageNet habit; keeps the statistics it was
    # pretrained with), bn: trainable BatchNorm (default: a contrastive encoder's statistics come from
    # other views and data), gn: GroupNorm(32) (small batches).
    norm: Literal["frozen", "bn", "gn"] = "bn"
    trainable_layers: Annotated[int, Range(ge=0, le=5)] = 5  # from the top: layer4..layer1, stem; rest frozen
    anchor_sizes: list[PositiveInt] = field(default_factory=lambda: [8, 16, 32, 64, 128])  # one per level
    # Width of every FPN map (torchvision's 256); the 3x3 convolutions on the stride-4 map dominate the
    # cost of small-object detection on a CPU and shrink with the square of this
    fpn_channels: PositiveInt = 256
    aspect_ratios: list[Positive] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    # null: images keep their own scale (nuclei: the anchors are sized in pixels); else torchvision's
    # resize of the shorter side to min_size (the longer at most max_size)
    min_size: PositiveInt | None = None
    max_size: PositiveInt = 1333
    image_mean: list[float] | None = None  # per channel, after max_value (null: ImageNet's; 0.5 for grey)
    image_std: list[Positive] | None = None  # null: ImageNet's; 0.25 for grey
    score_thresh: Probability = 0.05  # detections kept at inference
    detections_per_img: PositiveInt = 300  # DSB2018 images hold up to a few hundred nuclei
    # Faster R-CNN: proposals sampled per training image for the box head's loss; RoIAlign and the box
    # head's cost grow with it (512 is torchvision's; a 256 px crop with tens of objects needs fewer)
    box_batch_size_per_image: PositiveInt = 512
    encoder_lr_mult: NonNegative = 1.0  # backbone body learning rate = optim.lr * this


@dataclass
class DetOptimConfig:
    lr: Positive = 1e-4  # AdamW
    weight_decay: NonNegative = 1e-4
    warmup_steps: NonNegativeInt = 100  # then cosine decay to 0
    grad_clip: NonNegative = 10.0  # max global norm; 0 = off


@dataclass
class DetTrainConfig:
    steps: PositiveInt = 2000
    batch_size: PositiveInt = 4
    seed: NonNegativeInt = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    val_every_steps: NonNegativeInt = 500  # AP50 on the val images, keeps best.pt (0 = off)
    ckpt_every_steps: PositiveInt = 250
    keep_last: PositiveInt = 2
    log_every_steps: PositiveInt = 10
    progress: bool = True


@dataclass
class DetConfig:
    out_dir: str = "runs/det"
    data: DetDataConfig = field(default_factory=DetDataConfig)
    model: DetModelConfig = field(default_factory=DetModelConfig)
    optim: DetOptimConfig = field(default_factory=DetOptimConfig)
    train: DetTrainConfig = field(default_factory=DetTrainConfig)
