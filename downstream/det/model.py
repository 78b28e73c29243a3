"""Detectors on a twinview encoder: torchvision Faster R-CNN or RetinaNet with a ResNet + FPN backbone.

Nothing is downloaded: the ResNet body is :func:`pretrain.encoders.build_encoder`'s (random, or loaded
from a pretraining run's ``encoder.pt``), wrapped in torchvision's ``BackboneWithFPN`` (Faster R-CNN:
``layer1``-``layer4`` plus a max-pooled level, P2-P6; RetinaNet: ``layer2``-``layer4`` plus P6-P7 from
P5). The encoder's BatchNorm layers are replaced after loading, so its weights fit every ``norm``.
Stages below ``trainable_layers`` are frozen, their BatchNorm as ``FrozenBatchNorm2d`` too: statistics
that keep moving under fixed weights would drift away from what those weights were trained with.
Both detectors label categories 1..K (0 is the background; RetinaNet never predicts it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from downstream.det.config import FPN_LEVELS, DetModelConfig
from pretrain.encoders import build_encoder, load_encoder_file
from twinview.config import ConfigError

STAGES = ("layer4", "layer3", "layer2", "layer1", "stem")  # trainable_layers counts from the top
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
GREY_MEAN, GREY_STD = [0.5], [0.25]
GN_GROUPS = 32


class NativeScaleTransform(GeneralizedRCNNTransform):
    """torchvision's batching and normalisation without its resizing: objects keep their pixel size,
    which the anchors are chosen for (nuclei of 5-30 px would shrink with a 520 px image resized)."""

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        return image, target


def check_model_config(cfg: DetModelConfig, in_channels: int) -> None:
    """One-line ``ConfigError`` for values the dataclass types cannot rule out."""
    if len(cfg.anchor_sizes) != FPN_LEVELS:
        raise ConfigError(None, f"model.anchor_sizes {cfg.anchor_sizes}: give {FPN_LEVELS} sizes, one per "
                                "FPN level (smallest stride first)")
    if sorted(cfg.anchor_sizes) != list(cfg.anchor_sizes):
        raise ConfigError(None, f"model.anchor_sizes {cfg.anchor_sizes} must increase with the level")
    if not cfg.aspect_ratios:
        raise ConfigError(None, "model.aspect_ratios is empty")
    for key in ("image_mean", "image_std"):
        value = getattr(cfg, key)
        if value is not None and len(value) != in_channels:
            raise ConfigError(None, f"model.{key} {value} needs one value per channel (data.in_channels "
                                    f"{in_channels})")
    if cfg.min_size is not None and cfg.min_size > cfg.max_size:
        raise ConfigError(None, f"model.min_size {cfg.min_size} exceeds model.max_size {cfg.max_size}")


def normalisation(cfg: DetModelConfig, in_channels: int) -> tuple[list[float], list[float]]:
    """The per-channel mean and std the detector subtracts and divides by (inputs in [0, 1])."""
    mean = cfg.image_mean or (IMAGENET_MEAN if in_channels == 3 else GREY_MEAN)
    std = cfg.image_std or (IMAGENET_STD if in_channels == 3 else GREY_STD)
    return [float(v) for v in mean], [float(v) for v in std]


def build_det_model(cfg: DetModelConfig, in_channels: int, num_classes: int
                    ) -> tuple[nn.Module, dict[str, Any] | None]:
    """A detector for ``num_classes`` categories plus the background, with random weights or, when
    ``cfg.encoder_weights`` is set, the pretrained encoder in its backbone body; and that encoder's
    metadata (None for random init)."""
    check_model_config(cfg, in_channels)
    body = build_encoder(cfg.encoder, in_channels=in_channels, spatial_dims=2)
    encoder_meta = None
    if cfg.encoder_weights:
        expected = {"name": cfg.encoder, "spatial_dims": 2, "in_channels": in_channels, "small_stem": False}
        encoder_meta = load_encoder_file(cfg.encoder_weights, body, expected)
    frozen = _frozen_prefixes(cfg.trainable_layers)
    for name, param in body.named_parameters():
        if name.startswith(frozen):
            param.requires_grad_(False)
    body = _replace_norms(body, cfg.norm, frozen)
    retina = cfg.arch == "retinanet"
    levels = (2, 3, 4) if retina else (1, 2, 3, 4)
    widths = {1: 64, 2: 128, 3: 256, 4: 512}
    scale = 4 if cfg.encoder == "resnet50" else 1  # Bottleneck stages are 4x wider
    extra = LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels) if retina else LastLevelMaxPool()
    backbone = BackboneWithFPN(body, {f"layer{k}": str(i) for i, k in enumerate(levels)},
                               [widths[k] * scale for k in levels], cfg.fpn_channels, extra_blocks=extra)
    ratios = tuple(float(r) for r in cfg.aspect_ratios)
    if retina:  # three scales per level, as torchvision's RetinaNet
        sizes = tuple(tuple(int(s * 2 ** (k / 3)) for k in range(3)) for s in cfg.anchor_sizes)
    else:
        sizes = tuple((int(s),) for s in cfg.anchor_sizes)
    anchors = AnchorGenerator(sizes, (ratios,) * FPN_LEVELS)
    mean, std = normalisation(cfg, in_channels)
    min_size = cfg.min_size or 800  # unused when the transform keeps the native scale
    common: dict[str, Any] = {"min_size": min_size, "max_size": cfg.max_size, "image_mean": mean,
                              "image_std": std}
    if retina:
        model: nn.Module = RetinaNet(backbone, num_classes + 1, anchor_generator=anchors,
                                     score_thresh=cfg.score_thresh, detections_per_img=cfg.detections_per_img,
                                     **common)
    else:
        model = FasterRCNN(backbone, num_classes + 1, rpn_anchor_generator=anchors,
                           box_score_thresh=cfg.score_thresh, box_detections_per_img=cfg.detections_per_img,
                           box_batch_size_per_image=cfg.box_batch_size_per_image, **common)
    if cfg.min_size is None:
        model.transform = NativeScaleTransform(min_size, cfg.max_size, mean, std)
    return model, encoder_meta


def backbone_body(model: nn.Module) -> nn.Module:
    """The ResNet body (the pretrained encoder's part) of a detector."""
    return model.backbone.body


def _frozen_prefixes(trainable_layers: int) -> tuple[str, ...]:
    frozen = STAGES[trainable_layers:]
    return tuple(p for s in frozen for p in (("conv1.", "bn1.") if s == "stem" else (f"{s}.",)))


def _replace_norms(body: nn.Module, norm: str, frozen: tuple[str, ...]) -> nn.Module:
    """Swap each BatchNorm2d for the chosen norm, carrying over its affine weights (and, where frozen,
    its running statistics)."""
    for name, module in list(body.named_modules()):
        if not isinstance(module, nn.BatchNorm2d):
            continue
        if norm == "frozen" or f"{name}.".startswith(frozen):
            new: nn.Module = FrozenBatchNorm2d(module.num_features)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(new, key).copy_(getattr(module, key))
        elif norm == "gn":
            new = nn.GroupNorm(GN_GROUPS, module.num_features)
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
            new.requires_grad_(module.weight.requires_grad)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(body.get_submodule(parent) if parent else body, child, new)
    return body
