"""Pretraining made for volumes: global contrast with positional positives and decoder pretraining."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from downstream.seg.config import SegModelConfig
from downstream.seg.model import build_seg_model, load_pretrained_decoder
from pretrain.config import PretrainConfig
from pretrain.losses import global_contrastive, local_contrastive, nt_xent
from pretrain.methods import PositionalContrast, same_position
from pretrain.views import build_views
from tests.test_trainer import tiny_overrides
from twinview.config import ConfigError, load_config
from twinview.errors import DataError


def test_global_contrastive_hand_worked() -> None:
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    positive = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    negative = torch.tensor([[0, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    # each positive pair: s_p = 1, one negative with s_n = 0 -> log(1 + e^-1)
    expected = math.log(1 + math.exp(-1))
    assert global_contrastive(e, e, positive, negative, 1.0).item() == pytest.approx(expected)
    a = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    pos, neg = torch.tensor([[0, 1, 0]], dtype=torch.bool), torch.tensor([[0, 0, 1]], dtype=torch.bool)
    # s_p = 0.6 / 0.5 = 1.2, s_n = -2 -> log(1 + e^-3.2); the anchor itself (c0) takes no part
    assert global_contrastive(a, c, pos, neg, 0.5).item() == pytest.approx(math.log(1 + math.exp(-3.2)))


def test_other_positives_stay_out_of_the_denominator() -> None:
    torch.manual_seed(0)
    a, c = torch.randn(1, 8), torch.randn(3, 8)
    neg = torch.tensor([[0, 0, 1]], dtype=torch.bool)
    both = global_contrastive(a, c, torch.tensor([[1, 1, 0]], dtype=torch.bool), neg)
    first = global_contrastive(a, c, torch.tensor([[1, 0, 0]], dtype=torch.bool), neg)
    second = global_contrastive(a, c, torch.tensor([[0, 1, 0]], dtype=torch.bool), neg)
    assert both.item() == pytest.approx((first.item() + second.item()) / 2)


def test_global_contrastive_without_negatives_is_zero_with_finite_gradients() -> None:
    z = torch.randn(2, 4, requires_grad=True)
    loss = global_contrastive(z, z, torch.tensor([[0, 1], [1, 0]], dtype=torch.bool),
                              torch.zeros(2, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()
    with pytest.raises(ValueError, match="both positive and negative"):
        global_contrastive(z, z, torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool))


def test_local_contrastive_hand_worked_and_per_image_nt_xent() -> None:
    r = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one image, two orthogonal regions, same in both views
    # anchor: s_pos = 1 against the other region in both views (s = 0): log(1 + 2/e)
    assert local_contrastive(r, r, 1.0).item() == pytest.approx(math.log(1 + 2 / math.e))
    torch.manual_seed(1)
    r1, r2 = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    per_image = torch.stack([nt_xent(r1[b], r2[b], 0.2) for b in range(3)]).mean()
    assert local_contrastive(r1, r2, 0.2).item() == pytest.approx(per_image.item(), rel=1e-6)
    # regions of other images are no negatives: changing image 1 leaves image 0's term alone
    r1b = r1.clone()
    r1b[1] = torch.randn(5, 8)
    assert local_contrastive(r1b[:1], r2[:1], 0.2).item() == pytest.approx(local_contrastive(r1[:1], r2[:1],
                                                                                                0.2).item())


def test_same_position_by_partition_and_by_distance() -> None:
    p = torch.tensor([0.0, 0.2, 0.3, 0.6, 0.99, 1.0])
    parts = same_position(p, p, partitions=4)
    expected_parts = torch.tensor([0, 0, 1, 2, 3, 3])  # 1.0 falls in the last partition
    assert torch.equal(parts, expected_parts[:, None] == expected_parts[None, :])
    near = same_position(p, p, threshold=0.15)
    assert near[1, 2] and near[0, 0] and not near[0, 2] and near[4, 5] and not near[3, 4]
    with pytest.raises(ValueError, match="partitions or threshold"):
        same_position(p, p)


def test_positional_contrast_picks_positives_by_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def spy(anchors: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
            temperature: float) -> torch.Tensor:
        seen.update(positive=positive, negative=negative)
        return anchors.sum() * 0

    monkeypatch.setattr("pretrain.methods.global_contrastive", spy)
    method = PositionalContrast(nn.Identity(), nn.Identity(), partitions=4)
    x = torch.randn(3, 4)
    method([x, x], torch.tensor([0.1, 0.15, 0.9]))  # partitions 0, 0, 3
    t, f = True, False
    # rows/columns: view 1 of samples 0-2, then view 2 of samples 0-2
    assert seen["positive"].tolist() == [[f, t, f, t, t, f], [t, f, f, t, t, f], [f, f, f, f, f, t],
                                         [t, t, f, f, t, f], [t, t, f, t, f, f], [f, f, t, f, f, f]]
    assert seen["negative"].tolist() == [[f, f, t, f, f, t], [f, f, t, f, f, t], [t, t, f, t, t, f],
                                         [f, f, t, f, f, t], [f, f, t, f, f, t], [t, t, f, t, t, f]]


def _texture(seed: int) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return (gaussian_filter(rng.random((48, 48)), 3) * 1000 + 100).astype(np.float32)


def test_aligned_mri_views_share_their_geometry() -> None:
    still = {"bias_coeff": (0.0, 0.0), "gamma": (1.0, 1.0), "noise_std": 0.0}  # intensity steps as identity
    for seed in range(4):
        image = _texture(seed)
        aligned = build_views("mri", (32, 32), aligned=True, **still)
        free = build_views("mri", (32, 32), **still)
        aligned.set_seed(seed)
        free.set_seed(seed)
        # the same crop, flip and rotation (an intensity step at its identity value still rounds)
        assert torch.allclose(*aligned(image), atol=1e-5)
        assert not torch.allclose(*free(image), atol=0.1)
        varied = build_views("mri", (32, 32), aligned=True)
        varied.set_seed(seed)
        v1, v2 = varied(image)
        assert not torch.allclose(v1, v2, atol=0.1)  # intensities differ
    with pytest.raises(ValueError, match="aligned presets: \\['mri'\\]"):
        build_views("ct", (32, 32), aligned=True)


def _config(data: Path, run: Path, *extra: str) -> PretrainConfig:
    base = [o for o in tiny_overrides(data, run, "msd_slices")
            if not o.startswith(("data.size", "model.small"))]
    return load_config(PretrainConfig, None, [*base, "data.size=[32,32]", "train.max_steps=2",
                                              "train.batch_size=8", *extra])


@pytest.mark.parametrize("method", ["gcl", "pcl"])
def test_positional_pretraining_runs_on_slices(method: str, synth_msd: Path, tmp_path: Path) -> None:
    from pretrain.trainer import run_pretraining

    result = run_pretraining(_config(synth_msd, tmp_path / method, f"method.name={method}"))
    assert result.steps == 2 and math.isfinite(result.final_loss) and result.final_loss > 0
    assert torch.load(result.encoder_path, weights_only=True)["encoder_config"]["method"] == method


def test_positional_method_on_images_is_a_clear_error(synth_market: Path, tmp_path: Path) -> None:
    from pretrain.trainer import run_pretraining

    overrides = [*tiny_overrides(synth_market, tmp_path / "r"), "method.name=gcl"]
    cfg = load_config(PretrainConfig, None, overrides)
    with pytest.raises(DataError, match="data.kind msd_slices"):
        run_pretraining(cfg)


def test_decoder_pretraining_loads_into_the_segmentation_unet(synth_msd: Path, tmp_path: Path) -> None:
    from pretrain.trainer import run_pretraining

    with pytest.raises(ConfigError, match="model.encoder_weights"):
        run_pretraining(_config(synth_msd, tmp_path / "no_encoder", "method.name=local"))
    stage1 = run_pretraining(_config(synth_msd, tmp_path / "gcl", "method.name=gcl"))
    with pytest.raises(ConfigError, match="multiples of 32"):
        run_pretraining(_config(synth_msd, tmp_path / "odd", "method.name=local", "data.size=[48,48]",
                                f"model.encoder_weights={stage1.run_dir}"))
    stage2 = run_pretraining(_config(synth_msd, tmp_path / "local", "method.name=local",
                                     f"model.encoder_weights={stage1.run_dir}", "train.max_steps=3"))
    assert math.isfinite(stage2.final_loss)
    encoder_before = torch.load(stage1.encoder_path, weights_only=True)["encoder"]
    encoder_after = torch.load(stage2.encoder_path, weights_only=True)["encoder"]
    for key, value in encoder_before.items():  # the encoder stayed fixed, statistics included
        assert torch.equal(encoder_after[key], value), key
    assert torch.load(stage2.encoder_path, weights_only=True)["encoder_config"]["method"] == "gcl"
    decoder = torch.load(stage2.run_dir / "decoder.pt", weights_only=True)
    assert decoder["decoder_config"]["method"] == "local"

    cfg = SegModelConfig(encoder_weights=str(stage2.run_dir), decoder_weights=str(stage2.run_dir))
    fresh = build_seg_model(cfg, 2, 1, 2)
    net = build_seg_model(cfg, 2, 1, 2)
    meta = load_pretrained_decoder(net, cfg, 2, 1)
    assert meta["method"] == "local"
    own = net.decoder.state_dict()
    assert own.keys() == decoder["decoder"].keys()
    changed = 0
    for key, value in decoder["decoder"].items():
        assert torch.equal(own[key], value), key
        changed += not torch.equal(fresh.decoder.state_dict()[key], value)
    assert changed > len(own) // 2  # training moved the weights away from a fresh decoder's
    with pytest.raises(ConfigError, match="in_channels: decoder has 1, model needs 3"):
        load_pretrained_decoder(build_seg_model(cfg, 2, 3, 2), cfg, 2, 3)
    with pytest.raises(ConfigError, match="no decoder weights here"):
        load_pretrained_decoder(net, SegModelConfig(decoder_weights=str(stage1.run_dir)), 2, 1)
