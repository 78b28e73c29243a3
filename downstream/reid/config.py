"""Typed re-ID config. YAML files in ``configs/reid/`` fill these dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from twinview.config import (
    Fraction,
    NonNegative,
    NonNegativeInt,
    Positive,
    PositiveInt,
    ProperFraction,
    Range,
    UnitInterval,
)

AtLeastTwo = Annotated[int, Range(ge=2)]


@dataclass
class ReIDDataConfig:
    path: str = ""  # a Market-1501 folder (bounding_box_train/, query/, bounding_box_test/)
    size: list[PositiveInt] = field(default_factory=lambda: [128, 64])  # (H, W); every crop is resized to it
    augment: Literal["baseline", "reid"] = "baseline"  # baseline: flip, pad+crop, random erasing;
    # reid: one view of the contrastive `reid` preset (crop, flip, colour, grey, erasing)


@dataclass
class ReIDModelConfig:
    encoder: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    encoder_weights: str = ""  # a pretraining run folder or its encoder.pt; "" = random init
    last_stride: Literal[1, 2] = 1  # 1 doubles the last feature map (strong baseline); 2 = the ResNet's own
    pooling: Literal["avg", "gem"] = "avg"


@dataclass
class ReIDLossConfig:
    id_weight: NonNegative = 1.0
    triplet_weight: NonNegative = 1.0
    margin: Positive | None = 0.3  # null: soft-margin triplet loss
    label_smoothing: ProperFraction = 0.1


@dataclass
class ReIDOptimConfig:
    lr: Positive = 3.5e-4  # Adam
    weight_decay: NonNegative = 5e-4
    backbone_lr_mult: NonNegative = 1.0
    warmup_epochs: NonNegativeInt = 2  # linear from lr / 10
    schedule: Literal["step", "cosine"] = "cosine"
    # step schedule: the epochs where lr is multiplied by gamma
    milestones: list[NonNegativeInt] = field(default_factory=lambda: [40, 70])
    gamma: Fraction = 0.1
    grad_clip: NonNegative = 0.0  # max global norm; 0 = off


@dataclass
class ReIDTrainConfig:
    epochs: PositiveInt = 60
    p: AtLeastTwo = 16  # identities per batch (>= 2: the triplet loss needs negatives)
    k: AtLeastTwo = 4  # images per identity (>= 2: the triplet loss needs positives)
    labels: Literal["ids", "none"] = "ids"  # none: Cluster Contrast on pseudo-identities (cluster.*)
    seed: NonNegativeInt = 0
    deterministic: bool = False  # deterministic kernels only (slower; for bitwise-repeatable runs)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    ckpt_every_steps: PositiveInt = 200
    keep_last: PositiveInt = 2
    log_every_steps: PositiveInt = 10
    progress: bool = True


@dataclass
class ReIDClusterConfig:
    """Training without identity labels (``train.labels=none``): Cluster Contrast (Dai et al. 2021)."""

    eps: Positive = 0.6  # DBSCAN radius on the k-reciprocal Jaccard distance (0..1)
    min_samples: PositiveInt = 4  # DBSCAN: neighbours (the crop included) that make a core crop
    k1: PositiveInt = 30  # k-reciprocal neighbours of the Jaccard distance
    k2: PositiveInt = 6  # local query expansion
    temperature: Positive = 0.05
    momentum: UnitInterval = 0.1  # memory update: c <- momentum c + (1 - momentum) hardest crop
    iters_per_epoch: PositiveInt = 200  # steps between two clusterings
    eval_every_epochs: NonNegativeInt = 1  # rank-1 / mAP on query/gallery after each clustering (0: off)


@dataclass
class ReIDEvalConfig:
    flip: bool = True  # average the features of each crop and its mirror image
    metric: Literal["cosine", "euclidean"] = "cosine"
    rerank: bool = False  # k-reciprocal re-ranking (Zhong et al. 2017)
    k1: PositiveInt = 20
    k2: PositiveInt = 6
    lambda_value: UnitInterval = 0.3
    batch_size: PositiveInt = 128


@dataclass
class ReIDConfig:
    out_dir: str = "runs/reid"
    data: ReIDDataConfig = field(default_factory=ReIDDataConfig)
    model: ReIDModelConfig = field(default_factory=ReIDModelConfig)
    loss: ReIDLossConfig = field(default_factory=ReIDLossConfig)
    optim: ReIDOptimConfig = field(default_factory=ReIDOptimConfig)
    train: ReIDTrainConfig = field(default_factory=ReIDTrainConfig)
    cluster: ReIDClusterConfig = field(default_factory=ReIDClusterConfig)
    eval: ReIDEvalConfig = field(default_factory=ReIDEvalConfig)
