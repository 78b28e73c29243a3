"""Re-ID library: k-reciprocal re-ranking, losses, strong-baseline model and its fingerprint, P x K sampler
(the Market-1501 metrics: tests/test_retrieval.py; the retrieval index: tests/test_index.py)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from torch.utils.data import DataLoader

from downstream.reid.losses import batch_hard_triplet_loss, id_loss
from downstream.reid.model import GeM, ReIDModel, embed, model_fingerprint
from downstream.reid.rerank import re_rank
from downstream.reid.sampler import PKSampler
from pretrain.encoders import build_encoder, load_encoder_weights
from twinview.retrieval import market1501_scores

# --------------------------------------------------------------------------- re-ranking


def _re_ranking_original(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray, k1: int, k2: int,
                         lambda_value: float) -> np.ndarray:
    """Zhong et al.'s reference ``re_ranking`` (dense, per-image loops), condensed; the oracle."""
    original = np.concatenate([np.concatenate([q_q_dist, q_g_dist], 1),
                               np.concatenate([q_g_dist.T, g_g_dist], 1)])
    original = np.power(original, 2).astype(np.float32)
    original = np.transpose(original / np.max(original, axis=0))
    v = np.zeros_like(original)
    rank = np.argsort(original).astype(np.int32)
    nq, n = q_g_dist.shape[0], len(original)

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = rank[i, :k + 1]
        return forward[np.where(rank[forward, :k + 1] == i)[0]]

    for i in range(n):
        recip = reciprocal(i, k1)
        expansion = recip
        for c in recip:
            cand = reciprocal(c, int(np.around(k1 / 2.0)))
            if len(np.intersect1d(cand, recip)) > 2.0 / 3 * len(cand):
                expansion = np.append(expansion, cand)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        v[i, expansion] = weight / np.sum(weight)
    if k2 != 1:
        v = np.stack([np.mean(v[rank[i, :k2], :], axis=0) for i in range(n)])
    jaccard = np.zeros((nq, n), dtype=np.float32)
    for i in range(nq):
        temp_min = np.minimum(v[i][None, :], v).sum(1)
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    return (jaccard * (1 - lambda_value) + original[:nq] * lambda_value)[:, nq:]


def _blob_distances(n_q: int, n_g: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(6, 8))[rng.integers(0, 6, n_q + n_g)] + 0.7 * rng.normal(size=(n_q + n_g, 8))
    q, g = feats[:n_q], feats[n_q:]
    return cdist(q, g), cdist(q, q), cdist(g, g)


@pytest.mark.parametrize(("k1", "k2", "lam"), [(20, 6, 0.3), (5, 3, 0.5), (4, 1, 0.0)])
def test_re_rank_matches_original_implementation(k1: int, k2: int, lam: float) -> None:
    q_g, q_q, g_g = _blob_distances(9, 50, seed=k1)
    out = re_rank(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam)
    assert out.shape == (9, 50) and out.dtype == np.float32
    np.testing.assert_allclose(out, _re_ranking_original(q_g, q_q, g_g, k1, k2, lam), atol=2e-6)


def test_re_rank_lambda_one_is_scaled_squared_distance() -> None:
    # The original squares the distances and divides each row by its maximum over all N images.
    q_g, q_q, g_g = _blob_distances(4, 12, seed=1)
    row_max = np.maximum(q_q.max(1), q_g.max(1))[:, None]
    np.testing.assert_allclose(re_rank(q_g, q_q, g_g, k1=3, k2=2, lambda_value=1.0),
                               q_g ** 2 / row_max ** 2, rtol=1e-6)


def test_re_rank_recovers_match_hidden_behind_hard_negative() -> None:
    # 1-D-ish layout: query at 0; hard negative h (pid 2) at distance 1.0 with its own tight group
    # further left; the true matches (pid 1) at 1.1-1.2, mutually close. With k1 = 3, h's 3 nearest
    # are its group (q is not k-reciprocal to h) while t1 and q are k-reciprocal, so the Jaccard
    # distance moves the true matches ahead: AP goes from (1/2 + 2/3 + 3/4) / 3 to 1.
    q = np.array([[0.0, 0.0]])
    g = np.array([[-1.0, 0], [-1.3, 0.1], [-1.3, -0.1], [-1.4, 0], [1.1, 0], [1.2, 0.1], [1.2, -0.1]])
    ids = ([1], [2, 2, 2, 2, 1, 1, 1], [0], [1] * 7)
    before = market1501_scores(cdist(q, g), *ids).mAP
    after = market1501_scores(re_rank(cdist(q, g), cdist(q, q), cdist(g, g), k1=3, k2=1, lambda_value=0.3),
                              *ids).mAP
    assert before == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3)
    assert after == pytest.approx(1.0)


def test_re_rank_rejects_bad_shapes() -> None:
    q_g, q_q, g_g = _blob_distances(3, 5, seed=0)
    for args in [(q_g, q_q[:2, :2], g_g), (q_g, q_q, g_g[:4]), (q_g[0], q_q, g_g), (q_g.T, q_q, g_g)]:
        with pytest.raises(ValueError, match="re_rank"):
            re_rank(*args)
    with pytest.raises(ValueError, match="k1"):
        re_rank(q_g, q_q, g_g, k1=0)


# --------------------------------------------------------------------------- losses


def test_batch_hard_triplet_loss_by_hand() -> None:
    # 1-D features 0, 1 (pid 0) and 3, 5 (pid 1). Hardest (d_ap, d_an) per anchor:
    # x=0: (1, 3); x=1: (1, 2); x=3: (2, 2); x=5: (2, 4).
    x = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    pids = torch.tensor([0, 0, 1, 1])
    assert batch_hard_triplet_loss(x, pids, 0.3).item() == pytest.approx(0.3 / 4)  # only x=3: 0.3
    assert batch_hard_triplet_loss(x, pids, 1.0).item() == pytest.approx((0 + 0 + 1 + 0) / 4)
    soft = (2 * math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + math.log(2)) / 4
    assert batch_hard_triplet_loss(x, pids, None).item() == pytest.approx(soft)


def test_batch_hard_triplet_loss_excludes_anchors_without_positive() -> None:
    # pids 0, 0, 1, 2: anchors 2 and 3 have no positive. Margin 2: x=0 -> max(0, 1 - 3 + 2) = 0,
    # x=1 -> 1 - 2 + 2 = 1; the mean is over the two valid anchors: 0.5 (not 0.25).
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0]], requires_grad=True)
    loss = batch_hard_triplet_loss(x, torch.tensor([0, 0, 1, 2]), 2.0)
    assert loss.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no anchor"):
        batch_hard_triplet_loss(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="no anchor"):
        batch_hard_triplet_loss(x, torch.tensor([4, 4, 4, 4]))


def test_batch_hard_triplet_loss_gradient_finite_with_duplicates() -> None:
    # Identical features give zero distances (the non-differentiable point of the norm).
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    batch_hard_triplet_loss(x, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_id_loss_label_smoothing_by_hand() -> None:
    # logits (2, 0, 0), target 0, eps 0.1, K = 3: q = (0.9 + 0.1/3, 0.1/3, 0.1/3),
    # p = (e^2, 1, 1) / (e^2 + 2); loss = -(q0 log p0 + 2 q1 log p1).
    logits, target = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0])
    z = math.exp(2) + 2
    expected = -((0.9 + 0.1 / 3) * math.log(math.exp(2) / z) + 2 * (0.1 / 3) * math.log(1 / z))
    assert id_loss(logits, target).item() == pytest.approx(expected)
    assert id_loss(logits, target, label_smoothing=0.0).item() == pytest.approx(-math.log(math.exp(2) / z))


# --------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def resnet18_model() -> ReIDModel:
    torch.manual_seed(0)
    return ReIDModel(num_classes=5, name="resnet18", last_stride=1)


def test_reid_model_train_and_eval_outputs(resnet18_model: ReIDModel) -> None:
    x = torch.randn(3, 3, 64, 32)
    resnet18_model.train()
    feat, logits = resnet18_model(x)
    assert feat.shape == (3, 512) and logits.shape == (3, 5)
    resnet18_model.eval()
    assert resnet18_model(x).shape == (3, 512)
    features_only = ReIDModel(num_classes=0, name="resnet18", pooling="gem").train()
    feat, logits = features_only(x)
    assert feat.shape == (3, 512) and logits is None and features_only.classifier is None


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_last_stride_one_doubles_the_feature_map(name: str) -> None:
    x = torch.randn(1, 3, 64, 32)
    sizes = {}
    for stride in (1, 2):
        model = ReIDModel(num_classes=0, name=name, last_stride=stride).eval()
        with torch.no_grad():
            sizes[stride] = tuple(model.feature_map(x).shape[2:])
    assert sizes[2] == (2, 1) and sizes[1] == (4, 2)


def test_bnneck_bias_frozen(resnet18_model: ReIDModel) -> None:
    bias = resnet18_model.bnneck.bias
    assert not bias.requires_grad and torch.all(bias == 0)
    assert all(p is not bias for p in resnet18_model.parameters() if p.requires_grad)


def test_gem_with_p_one_is_average_pooling() -> None:
    x = torch.rand(2, 4, 3, 5) + 0.1
    np.testing.assert_allclose(GeM(p=1.0)(x).detach(), x.mean((2, 3)), rtol=1e-6)
    assert GeM()(x).shape == (2, 4) and GeM().p.item() == 3.0


def test_encoder_weights_load_into_backbone(resnet18_model: ReIDModel) -> None:
    torch.manual_seed(1)
    state = build_encoder("resnet18", in_channels=3).state_dict()
    load_encoder_weights(resnet18_model.backbone, state)
    loaded = resnet18_model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_embed_unit_norm_flip_and_modes(resnet18_model: ReIDModel) -> None:
    x = torch.randn(2, 3, 64, 32)
    resnet18_model.train()
    out = embed(resnet18_model, x, flip=True)
    assert resnet18_model.training  # modes restored
    np.testing.assert_allclose(out.norm(dim=1), 1.0, rtol=1e-5)
    resnet18_model.eval()
    with torch.no_grad():
        mean = (resnet18_model(x) + resnet18_model(x.flip(-1))) / 2
    torch.testing.assert_close(out, mean / mean.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-5)
    plain = embed(resnet18_model, x, flip=False)
    torch.testing.assert_close(plain, torch.nn.functional.normalize(resnet18_model(x).detach(), dim=1))


# --------------------------------------------------------------------------- sampler


PIDS = [pid for pid, n in enumerate([9, 4, 2, 7, 5, 12, 1, 8]) for _ in range(n)]


def _batches(sampler: PKSampler) -> list[list[int]]:
    flat = list(sampler)
    size = sampler.p * sampler.k
    assert len(flat) == len(sampler) and len(flat) % size == 0
    return [flat[i:i + size] for i in range(0, len(flat), size)]


def test_pk_sampler_batches_hold_p_ids_with_k_images() -> None:
    sampler = PKSampler(PIDS, p=3, k=4, seed=0)
    # groups per identity: max(1, n // 4) = 2, 1, 1, 1, 1, 3, 1, 2 -> 12 groups -> 4 batches
    assert sampler.batches_per_epoch == 4 and len(sampler) == 4 * 12
    for batch in _batches(sampler):
        counts = Counter(PIDS[i] for i in batch)
        assert len(counts) == 3 and set(counts.values()) == {4}
    # identities with fewer than K images are drawn with replacement; larger ones without
    epoch = [i for batch in _batches(sampler) for i in batch]
    for pid in (0, 5):
        drawn = [i for i in epoch if PIDS[i] == pid]
        assert len(drawn) == len(set(drawn))


def test_pk_sampler_caps_a_dominant_identity() -> None:
    # 10 + 1 + 1 groups of 4; with P = 2, identity 0 takes at most one slot per batch and the other
    # slot needs identity 1 or 2: identity 0 is capped at 2 groups, giving 2 batches.
    pids = [0] * 40 + [1] * 4 + [2] * 4
    sampler = PKSampler(pids, p=2, k=4, seed=3)
    batches = _batches(sampler)
    assert sampler.batches_per_epoch == len(batches) == 2
    assert all(len({pids[i] for i in batch}) == 2 for batch in batches)


def test_pk_sampler_deterministic_and_resumable() -> None:
    a, b = PKSampler(PIDS, 2, 3, seed=7), PKSampler(PIDS, 2, 3, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    full = _batches(a)
    assert full == _batches(b)
    b.set_epoch(3)
    assert _batches(b) != full
    assert _batches(PKSampler(PIDS, 2, 3, seed=8)) != _batches(PKSampler(PIDS, 2, 3, seed=7))
    b.set_epoch(2, start_batch=3)
    assert _batches(b) == full[3:] and len(b) == (a.batches_per_epoch - 3) * 6
    loader = DataLoader(PIDS, sampler=a, batch_size=6, drop_last=True)
    assert [sorted(batch.tolist()) for batch in loader] == [sorted(PIDS[i] for i in bt) for bt in full]


def test_pk_sampler_rejects_too_few_identities() -> None:
    with pytest.raises(ValueError, match="3 identities, fewer than p=4"):
        PKSampler([1, 1, 2, 2, 3], p=4, k=2)
    with pytest.raises(ValueError, match="start_batch"):
        PKSampler(PIDS, 2, 2).set_epoch(0, start_batch=10_000)


# --------------------------------------------------------------------------- index


def test_model_fingerprint() -> None:
    state = {"b": torch.arange(4.0), "a": torch.ones(2, 2)}
    fp = model_fingerprint(state)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert model_fingerprint(dict(reversed(state.items()))) == fp
    assert model_fingerprint({**state, "b": torch.tensor([0.0, 1.0, 2.0, 3.5])}) != fp
    assert model_fingerprint({**state, "a": torch.ones(4)}) != fp  # same bytes, other shape


def test_untrained_model_is_seeded_and_leaves_the_global_random_state() -> None:
    from downstream.reid.evaluate import untrained_reid_model

    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    a, meta = untrained_reid_model([64, 32], seed=0)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is untouched
    b, _ = untrained_reid_model([64, 32], seed=0)
    c, _ = untrained_reid_model([64, 32], seed=1)
    first = next(iter(a.state_dict()))
    assert torch.equal(a.state_dict()[first], b.state_dict()[first])
    assert not torch.equal(a.state_dict()[first], c.state_dict()[first])
    assert not a.training and meta["size"] == [64, 32]
    assert meta["preprocessing"]["resize"] == "resize_bilinear"
