"""Encoders: shapes, stems, channels_last, and loading their weights into the downstream backbones."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
import torchvision
from monai.networks.nets import FlexibleUNet
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from pretrain.encoders import (
    EncoderWeightsError,
    build_encoder,
    flexible_unet_backbone,
    load_encoder_weights,
)


def _perturbed(encoder: nn.Module, seed: int = 0) -> nn.Module:
    """Conv weights are random already; BN tensors are moved away from their constant initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in encoder.state_dict().items():
            if key.endswith("num_batches_tracked"):
                value.fill_(7)
            elif key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=g) + 0.5)
            elif value.dim() == 1:  # BN weight, bias, running_mean
                value.add_(0.1 * torch.randn(value.shape, generator=g))
    return encoder


@pytest.fixture(scope="module")
def encoders() -> dict[tuple[int, int], nn.Module]:
    """Perturbed resnet18 encoders in eval mode, keyed by (spatial_dims, in_channels)."""
    return {
        (dims, ch): _perturbed(build_encoder("resnet18", ch, spatial_dims=dims), seed=dims + ch).eval()
        for dims, ch in [(2, 3), (2, 1), (3, 1)]
    }


def _flexible_unet_encoder(spatial_dims: int, in_channels: int) -> nn.Module:
    backbone = flexible_unet_backbone("resnet18", spatial_dims)
    return FlexibleUNet(in_channels, 2, backbone, spatial_dims=spatial_dims).encoder


def _smp_encoder(in_channels: int) -> nn.Module:
    return smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=in_channels).encoder


def _fpn_body(in_channels: int) -> nn.Module:
    body = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5).body
    if in_channels != 3:
        body.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return body


def _deepest_pooled(target: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Global average of the last feature map (a list for MONAI/smp, a dict for the FPN body)."""
    features = target.eval()(x)
    deepest = list(features.values())[-1] if isinstance(features, dict) else features[-1]
    return deepest.flatten(2).mean(-1)


TARGETS_2D = {
    "flexible_unet": lambda c: _flexible_unet_encoder(2, c),
    "smp_unet": _smp_encoder,
    "fpn": _fpn_body,
}


@pytest.mark.parametrize("in_channels", [3, 1])
@pytest.mark.parametrize("target_name", sorted(TARGETS_2D))
def test_2d_weights_load_into_downstream_backbones(encoders, target_name, in_channels):
    encoder = encoders[2, in_channels]
    target = TARGETS_2D[target_name](in_channels)
    untouched = load_encoder_weights(target, encoder.state_dict())
    assert all(key.endswith("num_batches_tracked") for key in untouched)
    target_state = target.state_dict()
    for key, value in encoder.state_dict().items():
        if key in target_state:
            assert torch.equal(target_state[key], value), key
        else:  # torchvision detection uses FrozenBatchNorm2d, which has no step counter
            assert target_name == "fpn" and key.endswith("num_batches_tracked"), key
    # same keys and same architecture: the deepest feature map, pooled, is the encoder output
    x = torch.randn(1, in_channels, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(_deepest_pooled(target, x), encoder(x), rtol=1e-4, atol=1e-4)


def test_3d_weights_load_into_stock_flexible_unet(encoders):
    encoder = encoders[3, 1]
    target = FlexibleUNet(1, 2, "resnet18", spatial_dims=3).encoder  # stock MONAI backbone
    assert flexible_unet_backbone("resnet18", 3) == "resnet18"
    assert load_encoder_weights(target, encoder.state_dict()) == []
    target_state = target.state_dict()
    assert target_state.keys() == encoder.state_dict().keys()
    for key, value in encoder.state_dict().items():
        assert torch.equal(target_state[key], value), key
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(_deepest_pooled(target, x), encoder(x), rtol=1e-4, atol=1e-4)


def test_mismatches_raise_and_load_nothing(encoders):
    state = encoders[2, 3].state_dict()
    stock = FlexibleUNet(3, 2, "resnet18", spatial_dims=2).encoder  # MONAI shortcut "A": no downsample
    with pytest.raises(EncoderWeightsError, match=r"no key in the target.*layer2\.0\.downsample\.0\.weight"):
        load_encoder_weights(stock, state)
    with pytest.raises(EncoderWeightsError, match="no key in the target"):  # a whole model, not its backbone
        load_encoder_weights(nn.Sequential(stock), state)

    target = build_encoder("resnet18")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    small_stem = {**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}
    with pytest.raises(EncoderWeightsError, match=r"conv1\.weight: \(64, 3, 3, 3\) vs \(64, 3, 7, 7\)"):
        load_encoder_weights(target, small_stem)
    partial = {k: v for k, v in state.items() if not k.startswith("layer4")}
    with pytest.raises(EncoderWeightsError, match="target tensors not in the encoder weights"):
        load_encoder_weights(target, partial)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing loaded
    assert load_encoder_weights(target, partial, strict=False)[0].startswith("layer4")
    assert torch.equal(target.layer3[1].bn2.running_var, state["layer3.1.bn2.running_var"])


def test_classifier_head_is_ignored(encoders):
    """Weights load into a torchvision classifier (re-ID) and back (e.g. ImageNet init); fc is skipped."""
    classifier = torchvision.models.resnet18(weights=None)
    assert load_encoder_weights(classifier, encoders[2, 3].state_dict()) == ["fc.bias", "fc.weight"]
    encoder = build_encoder("resnet18")
    assert load_encoder_weights(encoder, classifier.state_dict()) == []
    assert torch.equal(encoder.layer4[1].bn2.running_mean, encoders[2, 3].layer4[1].bn2.running_mean)


@pytest.mark.parametrize(
    ("spatial_dims", "in_channels", "small_stem", "shape", "layer4_size"),
    [
        (2, 3, False, (2, 3, 32, 32), 1),  # /32
        (2, 1, True, (2, 1, 16, 16), 2),  # /8
        (3, 2, True, (2, 2, 8, 8, 8), 1),
    ],
)
def test_forward_shapes_and_stems(spatial_dims, in_channels, small_stem, shape, layer4_size):
    encoder = build_encoder("resnet18", in_channels, spatial_dims, small_stem)
    sizes = []
    encoder.layer4.register_forward_hook(lambda module, args, out: sizes.append(tuple(out.shape[2:])))
    assert encoder.feat_dim == 512
    assert encoder(torch.randn(shape)).shape == (2, 512)
    assert sizes == [(layer4_size,) * spatial_dims]
    assert not any(k.startswith("fc.") for k in encoder.state_dict())
    assert encoder.conv1.kernel_size == (3 if small_stem else 7,) * spatial_dims
    assert encoder.conv1.stride == (1 if small_stem else 2,) * spatial_dims
    assert encoder.conv1.in_channels == in_channels


def test_resnet50_feature_dim():
    assert build_encoder("resnet50", 3).feat_dim == 2048


def test_channels_last():
    encoder = build_encoder("resnet18", 3, small_stem=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = encoder(x)
        encoder = encoder.to(memory_format=torch.channels_last)
        assert encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        out = encoder(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown 2D encoder"):
        build_encoder("vit")
    with pytest.raises(ValueError, match="spatial_dims"):
        build_encoder("resnet18", spatial_dims=1)
