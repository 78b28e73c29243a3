"""Backbones for pretraining whose state dicts load unchanged into the downstream models.

An encoder maps images (B, C, *spatial) to pooled features (B, ``feat_dim``). Its ``state_dict()``
keys are those of the downstream backbone's own module, so ``load_encoder_weights`` needs no renaming:

* 2D (``ResNet2dEncoder``): torchvision ResNet layout (``conv1.weight``, ``bn1.*``,
  ``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``, ...; ``fc`` removed). Loads into an
  smp ``Unet(encoder_name="resnet18").encoder`` (a torchvision ResNet subclass), a torchvision
  detection ``resnet_fpn_backbone(...).body`` (``IntermediateLayerGetter``; its ``FrozenBatchNorm2d``
  has no ``num_batches_tracked``), a torchvision ResNet (re-ID) and a MONAI ``FlexibleUNet`` built
  with ``backbone=flexible_unet_backbone(name, 2)``, i.e. ``"tv-resnet18"`` (registered here).
* 3D (``ResNet3dEncoder``): MONAI ``ResNetFeatures`` layout, identical to the stock
  ``FlexibleUNet(backbone="resnet18", spatial_dims=3).encoder`` and to MedicalNet checkpoints.

The key names of MONAI's and torchvision's ResNets are the same; the architectures are not. MONAI's
resnet18/34 (``resnet_params``) use shortcut type "A" (parameter-free: strided pooling plus zero
channels), so they have no ``layerN.0.downsample.*`` tensors, while torchvision (and smp) use type
"B" (1x1 conv + BN, no bias). MONAI's ``nets.resnet18()`` factory uses "B" *with* a conv bias, which
matches neither. A 2D torchvision-layout encoder therefore cannot load into the stock 2D
``FlexibleUNet(backbone="resnet18")``: ``TorchvisionLayoutResNetBackbone`` registers MONAI ResNets with
torchvision's shortcut as FlexibleUNet backbones ``tv-resnet18``/``tv-resnet34``/``tv-resnet50``.
(For resnet50 MONAI's stock layout equals torchvision's.)

``small_stem`` (3x3 stride-1 ``conv1``, no max-pool, for tiny images) changes ``conv1.weight``'s
shape; such weights only load into a model with the same stem, otherwise ``load_encoder_weights``
reports the shape mismatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from monai.networks.nets.resnet import ResNet, ResNetEncoder, get_inplanes, resnet_params
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from twinview.errors import TwinviewError

_TORCHVISION_ARCHS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}

# Tensors that may be present on one side only: the classification head of a torchvision ResNet and
# BatchNorm's step counter (absent from FrozenBatchNorm2d; never used by BN in train or eval mode
# since ``momentum`` is set).
IGNORED_HEADS = ("fc.",)
IGNORED_SUFFIXES = ("num_batches_tracked",)


class ResNet2dEncoder(torchvision.models.ResNet):
    """A torchvision ResNet without ``fc``: (B, C, H, W) -> (B, feat_dim)."""

    def __init__(self, name: str = "resnet18", in_channels: int = 3, small_stem: bool = False):
        if name not in _TORCHVISION_ARCHS:
            raise ValueError(f"unknown 2D encoder {name!r}; choose from {sorted(_TORCHVISION_ARCHS)}")
        block, layers = _TORCHVISION_ARCHS[name]
        super().__init__(block, layers)
        if small_stem or in_channels != 3:
            kernel, stride = (3, 1) if small_stem else (7, 2)
            self.conv1 = nn.Conv2d(in_channels, 64, kernel, stride, padding=kernel // 2, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        if small_stem:
            self.maxpool = nn.Identity()
        self.feat_dim: int = self.fc.in_features
        del self.fc

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class ResNet3dEncoder(ResNet):
    """A MONAI ResNet in FlexibleUNet's ``ResNetFeatures`` layout: (B, C, D, H, W) -> (B, feat_dim)."""

    def __init__(self, name: str = "resnet18", in_channels: int = 1, small_stem: bool = False):
        if name not in _TORCHVISION_ARCHS:
            raise ValueError(f"unknown 3D encoder {name!r}; choose from {sorted(_TORCHVISION_ARCHS)}")
        block, layers, shortcut_type, bias_downsample, _ = resnet_params[name]
        super().__init__(
            block=block,
            layers=layers,
            block_inplanes=get_inplanes(),
            spatial_dims=3,
            n_input_channels=in_channels,
            conv1_t_size=3 if small_stem else 7,
            conv1_t_stride=1 if small_stem else 2,
            no_max_pool=small_stem,
            shortcut_type=shortcut_type,
            bias_downsample=bias_downsample,
            feed_forward=False,  # forward then ends with global average pooling and flattening
        )
        self.feat_dim: int = get_inplanes()[-1] * (4 if block == "bottleneck" else 1)


class TorchvisionLayoutResNetBackbone(ResNetEncoder):
    """FlexibleUNet backbones ``tv-resnet18/34/50``: MONAI ResNets with torchvision's layout.

    Shortcut type "B" without conv bias, 7x7 stride-2 stem; the five feature maps of MONAI's
    ``ResNetFeatures``. Registered with ``FLEXUNET_BACKBONE`` when this module is imported.
    """

    backbone_names = [f"tv-{name}" for name in _TORCHVISION_ARCHS]

    def __init__(
        self, model_name: str, pretrained: bool = False, spatial_dims: int = 2, in_channels: int = 3
    ):
        if pretrained:
            raise ValueError("tv-resnet backbones have no built-in weights; use load_encoder_weights")
        block, layers, *_ = resnet_params[model_name.removeprefix("tv-")]
        ResNet.__init__(
            self,
            block=block,
            layers=layers,
            block_inplanes=get_inplanes(),
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_stride=2,
            shortcut_type="B",
            feed_forward=False,
            bias_downsample=False,
        )

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [
            {"model_name": name, "pretrained": False, "spatial_dims": 2, "in_channels": 3}
            for name in cls.backbone_names
        ]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [(64, 64, 128, 256, 512), (64, 64, 128, 256, 512), (64, 256, 512, 1024, 2048)]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [5] * len(cls.backbone_names)


FLEXUNET_BACKBONE.register_class(TorchvisionLayoutResNetBackbone)


def build_encoder(
    name: str = "resnet18", in_channels: int = 3, spatial_dims: int = 2, small_stem: bool = False
) -> ResNet2dEncoder | ResNet3dEncoder:
    """A randomly initialised ResNet-18/34/50 encoder (no pretrained weights) with ``feat_dim``."""
    if spatial_dims == 2:
        return ResNet2dEncoder(name, in_channels, small_stem)
    if spatial_dims == 3:
        return ResNet3dEncoder(name, in_channels, small_stem)
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


def flexible_unet_backbone(name: str, spatial_dims: int) -> str:
    """The ``FlexibleUNet`` backbone with the layout of ``build_encoder(name, spatial_dims=spatial_dims)``."""
    return f"tv-{name}" if spatial_dims == 2 else name


class EncoderWeightsError(TwinviewError, ValueError):
    """Encoder weights do not fit the target module."""


def _ignored(key: str) -> bool:
    return key.startswith(IGNORED_HEADS) or key.endswith(IGNORED_SUFFIXES)


def load_encoder_weights(target: nn.Module, state: Mapping[str, Tensor], strict: bool = True) -> list[str]:
    """Load an encoder state dict into a backbone module with the same key names.

    ``target`` is the backbone itself: a FlexibleUNet's ``.encoder``, an smp model's ``.encoder``,
    a detection backbone's ``.body``, a torchvision ResNet or another encoder. Every tensor of
    ``state`` must find a key of the same shape in ``target`` and, with ``strict``, every tensor of
    ``target`` must be loaded; only ``IGNORED_HEADS`` (``fc.*``) and BN ``num_batches_tracked`` may be
    absent on either side. Otherwise ``EncoderWeightsError`` lists the offending keys and nothing is
    loaded.

    Returns:
        The target keys left as they were (ignored heads and counters), sorted.
    """
    target_state = target.state_dict()
    loaded: dict[str, Tensor] = {}
    homeless, mismatched = [], []
    for key, value in state.items():
        if key not in target_state:
            if not _ignored(key):
                homeless.append(key)
        elif target_state[key].shape != value.shape:
            mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(target_state[key].shape)}")
        else:
            loaded[key] = value
    untouched = sorted(key for key in target_state if key not in loaded)
    unloaded = [key for key in untouched if not _ignored(key)] if strict else []
    if homeless or mismatched or unloaded:
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            for label, keys in (
                ("encoder tensors with no key in the target", homeless),
                ("shape mismatches (source vs target)", mismatched),
                ("target tensors not in the encoder weights", unloaded),
            )
            if keys
        ]
        raise EncoderWeightsError(
            f"encoder weights do not fit {type(target).__name__}; pass the backbone module itself "
            "(e.g. `.encoder` or `.body`) built with the same architecture, stem and in_channels: "
            + "; ".join(problems)
        )
    target.load_state_dict(loaded, strict=False)
    return untouched


def load_encoder_file(path: str | Path, target: nn.Module, expected: Mapping[str, object],
                      in_channels: int | None = None) -> dict:
    """Load a pretraining run's ``encoder.pt`` (or the run folder) into ``target``; returns its metadata.

    ``expected`` lists the ``encoder_config`` values the target needs (name, spatial_dims, in_channels,
    small_stem, ...); a missing file or any difference is a ``ConfigError`` that names the file, a file
    that is no twinview encoder (a bare tensor, a plain pickle, a truncated file) a ``DataError``. With
    ``in_channels``, an encoder pretrained on another channel count is loaded through
    :func:`adapt_input_channels` (the metadata then has ``adapted_from_channels``).
    """
    from engine.checkpoint import load_weights_file

    state, meta, _ = load_weights_file(path, "encoder.pt", "encoder", expected,
                                       "pass a pretraining run folder or its encoder.pt",
                                       fits=f"the {type(target).__name__} it is loaded into")
    if in_channels is not None and meta.get("in_channels") != in_channels:
        state = adapt_input_channels(state, int(meta["in_channels"]), in_channels)
        meta = {**meta, "adapted_from_channels": int(meta["in_channels"]), "in_channels": in_channels}
    load_encoder_weights(target, state)
    return meta


def adapt_input_channels(state: Mapping[str, Tensor], pretrained: int, wanted: int) -> dict[str, Tensor]:
    """``state`` with its first convolution taking ``wanted`` input channels instead of ``pretrained``:
    its kernels tiled over the new channels and scaled by ``pretrained / wanted``, so that channels that
    look alike (a one-channel MRI encoder on T1 + T2 + FLAIR) give the stem the activations it was
    pretrained on (the scheme timm uses for its ``in_chans`` argument)."""
    key = next((k for k, v in state.items() if v.ndim >= 4), None)
    if key is None or state[key].shape[1] != pretrained:
        raise ValueError(f"no first convolution with {pretrained} input channels in this encoder state")
    weight = state[key]
    reps = -(-wanted // pretrained)
    tiled = weight.repeat(1, reps, *([1] * (weight.ndim - 2)))[:, :wanted]
    return {**state, key: tiled * (pretrained / wanted)}
