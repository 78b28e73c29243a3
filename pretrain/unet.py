"""The U-Net that segmentation fine-tunes, built here so that decoder pretraining trains the same one.

MONAI ``FlexibleUNet`` around the ``tv-resnet*`` (2D) or MONAI ResNet (3D) backbone that
:func:`pretrain.encoders.build_encoder`'s weights load into, with MONAI's default decoder channels
``(256, 128, 64, 32, 16)``. A pretrained decoder (``decoder.pt``) holds ``unet.decoder``'s tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pretrain.encoders import flexible_unet_backbone

DECODER_FILE = "decoder.pt"
UNET_DIVISOR = 32  # five stride-2 stages: every input side must be a multiple of this


def build_flexible_unet(encoder: str, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """A randomly initialised FlexibleUNet (nothing downloaded)."""
    from monai.networks.nets import FlexibleUNet

    net = FlexibleUNet(in_channels, out_channels, backbone=flexible_unet_backbone(encoder, spatial_dims),
                       pretrained=False, spatial_dims=spatial_dims)
    # The head reads the last decoder layer after its norm, not after its ReLU. Rectified, that layer
    # could represent the structure as "every channel off" (94% zeros there in a failed run): the head
    # then sees only its bias on the structure, and short runs ended with empty masks or one class for
    # everything, depending on the initialisation (seed). Normalised, both signs carry.
    net.decoder.blocks[-1].convs.conv_1.adn.A = nn.Identity()
    return net


def decoder_meta(encoder: str, spatial_dims: int, in_channels: int) -> dict[str, Any]:
    """What a U-Net must match for a saved decoder to load into it."""
    return {"encoder": encoder, "spatial_dims": spatial_dims, "in_channels": in_channels}


def load_decoder_file(path: str | Path, unet: nn.Module, expected: dict[str, Any]) -> dict[str, Any]:
    """Load a decoder-pretraining run's ``decoder.pt`` (or the run folder) into ``unet.decoder``; returns
    its metadata. A missing file or a decoder made for another U-Net is a one-line ``ConfigError``."""
    from engine.checkpoint import load_weights_file
    from twinview.config import ConfigError

    state, meta, file = load_weights_file(path, DECODER_FILE, "decoder", expected,
                                          f"pass a decoder-pretraining run (method local) or its "
                                          f"{DECODER_FILE}", fits="this U-Net")
    own = unet.decoder.state_dict()
    if set(state) != set(own) or any(own[k].shape != v.shape for k, v in state.items()):
        raise ConfigError(file, "decoder tensors do not match this U-Net's decoder (another decoder layout)")
    unet.decoder.load_state_dict(state)
    return meta
