"""The re-ID "strong baseline" (Luo et al. 2019, "Bag of Tricks and A Strong Baseline for Deep Person
Re-identification") on a pretrain encoder.

``backbone`` (a ``pretrain.encoders.build_encoder`` ResNet) -> feature map -> global pooling (average
or GeM) -> ``f_t`` (the triplet feature) -> BNNeck (BatchNorm1d, bias frozen at 0) -> ``f_i`` -> linear
ID classifier without bias. Training returns ``(f_t, logits)``; evaluation returns ``f_i``.
``load_encoder_weights(model.backbone, state)`` loads pretrained weights unchanged, since pooling and
head live outside the backbone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from pretrain.encoders import build_encoder

POOLINGS = ("avg", "gem")


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al. 2018, "Fine-tuning CNN Image Retrieval with No Human
    Annotation"): ``f_c = (mean_{h,w} max(x_chw, eps)^p)^(1/p)`` with a learnable ``p`` (1: average,
    -> inf: max pooling). (B, C, H, W) -> (B, C)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean((2, 3)).pow(1.0 / self.p)


def set_last_stride(backbone: nn.Module, stride: int) -> None:
    """Set the stride of ``layer4``'s first block (the strided 3x3 conv: ``conv1`` in a BasicBlock,
    ``conv2`` in a torchvision Bottleneck) and of its downsample conv."""
    block = backbone.layer4[0]
    if isinstance(block, Bottleneck):
        block.conv2.stride = (stride, stride)
    elif isinstance(block, BasicBlock):
        block.conv1.stride = (stride, stride)
    else:
        raise TypeError(f"set_last_stride: unknown block {type(block).__name__}")
    block.downsample[0].stride = (stride, stride)


class ReIDModel(nn.Module):
    """ResNet + pooling + BNNeck + ID classifier (``num_classes`` 0: no classifier, features only)."""

    def __init__(self, num_classes: int, name: str = "resnet50", last_stride: int = 1, pooling: str = "avg"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"ReIDModel: unknown pooling {pooling!r}; choose from {POOLINGS}")
        if num_classes < 0 or last_stride not in (1, 2):
            raise ValueError(f"ReIDModel: need num_classes >= 0 and last_stride 1 or 2, "
                             f"got {num_classes}, {last_stride}")
        self.backbone = build_encoder(name, in_channels=3, spatial_dims=2, small_stem=False)
        set_last_stride(self.backbone, last_stride)
        self.feat_dim: int = self.backbone.feat_dim
        self.pool = GeM() if pooling == "gem" else nn.AdaptiveAvgPool2d(1)
        self.bnneck = nn.BatchNorm1d(self.feat_dim)
        self.bnneck.bias.requires_grad_(False)  # initialised to 0: the neck only scales
        self.classifier = nn.Linear(self.feat_dim, num_classes, bias=False) if num_classes else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)  # as the paper's code

    def feature_map(self, x: Tensor) -> Tensor:
        """The backbone's last feature map (B, feat_dim, H/16 or H/32, W/16 or W/32)."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None] | Tensor:
        """Train mode: ``(global feature before the BNNeck, logits or None)``; eval mode: the feature
        after the BNNeck."""
        feat = self.pool(self.feature_map(x)).flatten(1)
        neck = self.bnneck(feat)
        if not self.training:
            return neck
        return feat, self.classifier(neck) if self.classifier is not None else None


@torch.no_grad()
def embed(model: ReIDModel, images: Tensor, flip: bool = True) -> Tensor:
    """L2-normalised eval-mode features (B, feat_dim); with ``flip`` the mean of the features of the
    images and of their horizontal mirror images (one backbone pass over both). The model's
    train/eval flags are restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        if flip:
            feats = model(torch.cat([images, images.flip(-1)])).view(2, len(images), -1).mean(0)
        else:
            feats = model(images)
    finally:
        for module, mode in modes:
            module.training = mode
    return F.normalize(feats, dim=1)


def model_fingerprint(state_dict: Mapping[str, Tensor]) -> str:
    """First 16 hex digits of a SHA-256 over the sorted keys, each with its tensor's dtype, shape and
    bytes: equal for equal weights, whatever the device or the dict order. A retrieval index records it
    (``model_id``) so that queries embedded by another model are refused."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        if not isinstance(t, Tensor):
            raise TypeError(f"model_fingerprint: {key!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        digest.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
