"""Typed re-ID config. YAML files in ``configs/reid/`` fill these dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ReIDDataConfig:
    path: str = ""  # a Market-1501 folder (bounding_box_train/, query/, bounding_box_test/)
    size: list[int] = field(default_factory=lambda: [128, 64])  # (H, W); every crop is resized to it
    augment: Literal["baseline", "reid"] = "baseline"  # baseline: flip, pad+crop, random erasing;
    # reid: one view of the contrastive `reid` preset (crop, flip, colour, grey, erasing)


@dataclass
class ReIDModelConfig:
    encoder: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    encoder_weights: str = ""  # a pretraining run folder or its encoder.pt; "" = random init
    last_stride: int = 1  # 1 doubles the last feature map (strong baseline); 2 = the ResNet's own
    pooling: Literal["avg", "gem"] = "avg"


@dataclass
class ReIDLossConfig:
    id_weight: float = 1.0
    triplet_weight: float = 1.0
    margin: float | None = 0.3  # null: soft-margin triplet loss
    label_smoothing: float = 0.1


@dataclass
class ReIDOptimConfig:
    lr: float = 3.5e-4  # Adam
    weight_decay: float = 5e-4
    backbone_lr_mult: float = 1.0
    warmup_epochs: int = 2  # linear from lr / 10
    schedule: Literal["step", "cosine"] = "cosine"
    milestones: list[int] = field(default_factory=lambda: [40, 70])  # step schedule: epochs where lr x gamma
    gamma: float = 0.1
    grad_clip: float = 0.0


@dataclass
class ReIDTrainConfig:
    epochs: int = 60
    p: int = 16  # identities per batch
    k: int = 4  # images per identity
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    ckpt_every_steps: int = 200
    keep_last: int = 2
    log_every_steps: int = 10
    progress: bool = True


@dataclass
class ReIDEvalConfig:
    flip: bool = True  # average the features of each crop and its mirror image
    metric: Literal["cosine", "euclidean"] = "cosine"
    rerank: bool = False  # k-reciprocal re-ranking (Zhong et al. 2017)
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    batch_size: int = 128


@dataclass
class ReIDConfig:
    out_dir: str = "runs/reid"
    data: ReIDDataConfig = field(default_factory=ReIDDataConfig)
    model: ReIDModelConfig = field(default_factory=ReIDModelConfig)
    loss: ReIDLossConfig = field(default_factory=ReIDLossConfig)
    optim: ReIDOptimConfig = field(default_factory=ReIDOptimConfig)
    train: ReIDTrainConfig = field(default_factory=ReIDTrainConfig)
    eval: ReIDEvalConfig = field(default_factory=ReIDEvalConfig)
