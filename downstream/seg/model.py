"""Segmentation networks and loading a pretrained encoder into them.

* ``flexunet``: MONAI ``FlexibleUNet`` with a ResNet encoder, 2D (``tv-resnet*``, torchvision layout)
  or 3D (MONAI ResNet layout): the encoders that ``twinview pretrain`` writes load into it unchanged.
  Every spatial size must be divisible by 32 (the encoder's five stride-2 stages).
* ``unet``: plain MONAI ``UNet`` (residual units, no pretrained encoder): the from-scratch baseline.
* ``smp_unet``: segmentation-models-pytorch ``Unet`` (2D only, e.g. microscopy) with the same encoders.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from downstream.seg.config import SegModelConfig
from pretrain.encoders import load_encoder_file
from pretrain.unet import UNET_DIVISOR, build_flexible_unet, decoder_meta, load_decoder_file
from twinview.config import ConfigError


def divisor(arch: str) -> int:
    """Every input size must be a multiple of this."""
    return UNET_DIVISOR if arch in ("flexunet", "smp_unet") else 16


def build_seg_model(cfg: SegModelConfig, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """A randomly initialised network (no weights from any hub)."""
    if cfg.arch == "flexunet":
        return build_flexible_unet(cfg.encoder, spatial_dims, in_channels, out_channels)
    if cfg.arch == "unet":
        from monai.networks.nets import UNet

        channels = tuple(cfg.unet_channels)
        return UNet(spatial_dims, in_channels, out_channels, channels=channels,
                    strides=(2,) * (len(channels) - 1), num_res_units=2, norm="batch")
    if spatial_dims != 2:
        raise ConfigError(None, "model.arch=smp_unet is 2D only; use flexunet or unet for 3D")
    import segmentation_models_pytorch as smp

    return smp.Unet(encoder_name=cfg.encoder, encoder_weights=None, in_channels=in_channels,
                    classes=out_channels)


def encoder_of(model: nn.Module) -> nn.Module | None:
    """The pretrained-encoder part of a network (None for the plain UNet)."""
    return getattr(model, "encoder", None)


def load_pretrained_encoder(model: nn.Module, cfg: SegModelConfig, spatial_dims: int,
                            in_channels: int) -> dict[str, Any]:
    """Load ``cfg.encoder_weights`` into the network's encoder; returns the encoder's metadata.

    The pretraining run must have used the same encoder, dimensionality and stem; an encoder pretrained
    on another number of channels (one MRI channel for a multi-modal task) has its first convolution
    tiled and scaled to ``in_channels`` (:func:`pretrain.encoders.adapt_input_channels`).
    """
    target = encoder_of(model)
    if target is None:
        raise ConfigError(None, f"model.arch={cfg.arch} has no encoder to load {cfg.encoder_weights} into; "
                                "use flexunet")
    expected = {"name": cfg.encoder, "spatial_dims": spatial_dims, "small_stem": False}
    return load_encoder_file(cfg.encoder_weights, target, expected, in_channels=in_channels)


def load_pretrained_decoder(model: nn.Module, cfg: SegModelConfig, spatial_dims: int,
                            in_channels: int) -> dict[str, Any]:
    """Load ``cfg.decoder_weights`` into a FlexibleUNet's decoder; returns the decoder's metadata."""
    if cfg.arch != "flexunet":
        raise ConfigError(None, f"model.arch={cfg.arch} has no pretrained decoder to load; use flexunet")
    return load_decoder_file(cfg.decoder_weights, model, decoder_meta(cfg.encoder, spatial_dims, in_channels))


def set_encoder_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (no gradients, BN statistics fixed) or release the encoder."""
    encoder = encoder_of(model)
    if encoder is None:
        return
    encoder.requires_grad_(not frozen)
    encoder.train(not frozen and model.training)


@torch.no_grad()
def tensors_equal(module: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether every tensor of ``state`` equals the module's tensor of the same name."""
    own = module.state_dict()
    return all(key in own and torch.equal(own[key].cpu(), value.cpu()) for key, value in state.items()
               if not key.endswith("num_batches_tracked"))
