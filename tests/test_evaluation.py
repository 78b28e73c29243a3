"""Encoder evaluation protocols: features, weighted kNN, linear probe, Market-1501 retrieval, maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score
from sklearn.metrics.pairwise import pairwise_distances
from torch import nn

from pretrain.evaluation import (
    embedding_map,
    extract_features,
    linear_probe,
    pairwise_distance,
    retrieval_metrics,
    retrieval_metrics_reference,
    retrieval_scores,
    retrieval_scores_reference,
    weighted_knn_accuracy,
    weighted_knn_predict,
)

IMPLS = pytest.mark.parametrize("impl", [retrieval_scores, retrieval_scores_reference],
                                ids=["vectorised", "reference"])


def _ids(*values: list[int]) -> list[np.ndarray]:
    return [np.asarray(v) for v in values]


# --------------------------------------------------------------------------- retrieval, by hand


@IMPLS
def test_retrieval_hand_computed_two_queries(impl) -> None:
    # Gallery pids [1, 2, 1, 3, 4, 1], all in camera 1; queries in camera 0.
    # q0 (pid 1) ranks the gallery in order: matches at ranks 1, 3, 6
    #    AP = (1/1 + 2/3 + 3/6) / 3 = 0.72222, INP = 3/6 = 0.5, first match at rank 1.
    # q1 (pid 2) ranks it reversed (pids 1, 4, 3, 1, 2, 1): one match at rank 5
    #    AP = 1/5 = 0.2, INP = 1/5 = 0.2, first match at rank 5.
    # mAP = 0.46111, mINP = 0.35, CMC (max_rank capped at G = 6) = [.5, .5, .5, .5, 1, 1].
    row = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=np.float32)
    distmat = np.stack([row, row[::-1]])
    q_pids, g_pids, q_cams, g_cams = _ids([1, 2], [1, 2, 1, 3, 4, 1], [0, 0], [1] * 6)
    res = impl(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=50)
    np.testing.assert_allclose(res.cmc, [0.5, 0.5, 0.5, 0.5, 1.0, 1.0])
    assert res.mAP == pytest.approx((1 + 2 / 3 + 3 / 6) / 3 / 2 + 0.2 / 2)
    assert res.mINP == pytest.approx(0.35)
    assert (res.num_valid, res.num_skipped) == (2, 0)


@IMPLS
def test_retrieval_max_rank_truncates_cmc(impl) -> None:
    # Same data as above, max_rank = 3: q1's first match (rank 5) lies beyond, so cmc = [.5, .5, .5].
    row = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=np.float32)
    res = impl(np.stack([row, row[::-1]]), *_ids([1, 2], [1, 2, 1, 3, 4, 1], [0, 0], [1] * 6), max_rank=3)
    np.testing.assert_allclose(res.cmc, [0.5, 0.5, 0.5])


@IMPLS
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_retrieval_ties_follow_gallery_order(impl, dtype) -> None:
    # All distances equal: the stable order is the gallery order.
    # Gallery pids [2, 1, 3]: the match is at rank 2 -> AP = 1/2, INP = 1/2, cmc = [0, 1, 1].
    same = np.full((1, 3), 0.5, dtype=dtype)
    res = impl(same, *_ids([1], [2, 1, 3], [0], [1, 1, 1]))
    np.testing.assert_allclose(res.cmc, [0, 1, 1])
    assert res.mAP == pytest.approx(0.5) and res.mINP == pytest.approx(0.5)
    # Gallery pids [1, 2, 3]: the match comes first -> AP = 1.
    assert impl(same, *_ids([1], [1, 2, 3], [0], [1, 1, 1])).mAP == pytest.approx(1.0)
    # -0.0 and +0.0 are equal distances: the distractor listed first ranks first -> AP = 1/2.
    signed_zero = np.array([[0.0, -0.0, 0.7]], dtype=dtype)
    assert impl(signed_zero, *_ids([1], [2, 1, 3], [0], [1, 1, 1])).mAP == pytest.approx(0.5)


@IMPLS
def test_retrieval_removes_same_pid_same_camera(impl) -> None:
    # Query pid 1 camera 0. Gallery (in distance order): pid 1 cam 0 (removed), pid 2 cam 1, pid 1 cam 1.
    # Kept: [pid 2, pid 1] -> match at rank 2: AP = 1/2, cmc = [0, 1] padded with its last value to G = 3.
    # (Keeping the same-camera image would give AP = (1 + 2/3) / 2.)
    res = impl(np.array([[0.1, 0.2, 0.3]]), *_ids([1], [1, 2, 1], [0], [0, 1, 1]))
    np.testing.assert_allclose(res.cmc, [0, 1, 1])
    assert res.mAP == pytest.approx(0.5)
    # The same camera with another pid stays a negative: kept [pid 2 cam 0, pid 1 cam 1] -> AP = 1/2.
    assert impl(np.array([[0.1, 0.2]]), *_ids([1], [2, 1], [0], [0, 1])).mAP == pytest.approx(0.5)


@IMPLS
def test_retrieval_junk_removed_distractor_negative(impl) -> None:
    d = np.array([[0.1, 0.2, 0.3]])
    # Junk (pid -1) first: removed, the match moves to rank 2 -> AP = INP = 1/2 (not 1/3).
    junk = impl(d, *_ids([1], [-1, 2, 1], [0], [1, 1, 1]))
    assert junk.mAP == pytest.approx(0.5) and junk.mINP == pytest.approx(0.5)
    np.testing.assert_allclose(junk.cmc, [0, 1, 1])
    # Distractor (pid 0) first: a negative, the match stays at rank 3 -> AP = INP = 1/3, cmc = [0, 0, 1].
    distractor = impl(d, *_ids([1], [0, 2, 1], [0], [1, 1, 1]))
    assert distractor.mAP == pytest.approx(1 / 3) and distractor.mINP == pytest.approx(1 / 3)
    np.testing.assert_allclose(distractor.cmc, [0, 0, 1])


@IMPLS
def test_retrieval_skips_queries_without_valid_match(impl) -> None:
    # q0 (pid 1, cam 0): its only gallery image is in cam 0 -> no valid match, skipped.
    # q1 (pid 7): absent from the gallery -> skipped.
    # q2 (pid 2, cam 0): kept items [g0 (pid 1), g1 (pid 2), g2 (pid 3)], match at rank 2
    #    -> AP = INP = 1/2, cmc = [0, 1, 1]; the averages cover q2 only.
    d = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    res = impl(d, *_ids([1, 7, 2], [1, 2, 3], [0, 0, 0], [0, 1, 1]))
    assert (res.num_valid, res.num_skipped) == (1, 2)
    assert res.mAP == pytest.approx(0.5) and res.mINP == pytest.approx(0.5)
    np.testing.assert_allclose(res.cmc, [0, 1, 1])
    with pytest.raises(ValueError, match="no query"):
        impl(d[:2], *_ids([1, 7], [1, 2, 3], [0, 0], [0, 1, 1]))


@IMPLS
def test_retrieval_rejects_bad_input(impl) -> None:
    with pytest.raises(ValueError, match="NaN"):
        impl(np.array([[np.nan, 1.0]]), *_ids([1], [1, 2], [0], [1, 1]))
    with pytest.raises(ValueError, match="does not fit"):
        impl(np.zeros((2, 3)), *_ids([1], [1, 2, 3], [0], [1, 1, 1]))


def test_retrieval_metrics_tuple_api() -> None:
    d = np.array([[0.3, 0.1, 0.2]], dtype=np.float32)
    cmc, m_ap, m_inp = retrieval_metrics(d, *_ids([1], [1, 2, 1], [0], [1, 1, 1]), max_rank=2)
    # Ranking: g1 (pid 2), g2 (pid 1), g0 (pid 1) -> ranks 2, 3: AP = (1/2 + 2/3) / 2, INP = 2/3.
    assert isinstance(cmc, np.ndarray) and isinstance(m_ap, float) and isinstance(m_inp, float)
    np.testing.assert_allclose(cmc, [0, 1])
    assert m_ap == pytest.approx((1 / 2 + 2 / 3) / 2) and m_inp == pytest.approx(2 / 3)
    ref = retrieval_metrics_reference(d, *_ids([1], [1, 2, 1], [0], [1, 1, 1]), max_rank=2)
    np.testing.assert_allclose(ref[0], cmc)
    assert ref[1:] == pytest.approx((m_ap, m_inp))


# --------------------------------------------------------------------------- retrieval, random


def _random_case(rng: np.random.Generator, n_q: int, n_g: int, dtype, discrete: bool):
    if discrete:  # few distinct values: many ties
        d = rng.integers(0, 4, (n_q, n_g)).astype(dtype)
    else:  # negatives and infinities exercise the float32 bit transform
        d = rng.normal(size=(n_q, n_g)).astype(dtype)
        d[rng.random(d.shape) < 0.01] = np.inf
        d[rng.random(d.shape) < 0.01] = -np.inf
    q_pids = rng.integers(0, 12, n_q)
    g_pids = rng.integers(-1, 12, n_g)
    return d, q_pids, g_pids, rng.integers(0, 3, n_q), rng.integers(0, 3, n_g)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("discrete", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_retrieval_vectorised_matches_reference(dtype, discrete, chunk) -> None:
    rng = np.random.default_rng(hash((np.dtype(dtype).name, discrete, chunk)) % 2**32)
    for n_q, n_g, max_rank in [(40, 150, 50), (25, 12, 50), (60, 300, 5)]:
        case = _random_case(rng, n_q, n_g, dtype, discrete)
        fast = retrieval_scores(*case, max_rank=max_rank, chunk=chunk)
        ref = retrieval_scores_reference(*case, max_rank=max_rank)
        np.testing.assert_allclose(fast.cmc, ref.cmc)
        assert fast.cmc.shape == (min(max_rank, n_g),)
        assert fast.mAP == pytest.approx(ref.mAP) and fast.mINP == pytest.approx(ref.mINP)
        assert (fast.num_valid, fast.num_skipped) == (ref.num_valid, ref.num_skipped)


def test_retrieval_ap_agrees_with_sklearn() -> None:
    # Without removals and ties, AP is scikit-learn's average precision of the scores -distance.
    rng = np.random.default_rng(3)
    d = rng.random((30, 80)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, 5, 30), rng.integers(0, 5, 80)
    q_pids[0] = g_pids[0]
    valid = [i for i in range(30) if (g_pids == q_pids[i]).any()]
    expected = np.mean([average_precision_score(g_pids == q_pids[i], -d[i]) for i in valid])
    res = retrieval_scores(d, q_pids, g_pids, np.zeros(30, int), np.ones(80, int))
    assert res.mAP == pytest.approx(expected, rel=1e-6)
    assert res.num_skipped == 30 - len(valid)


# --------------------------------------------------------------------------- distances


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_pairwise_distance_matches_sklearn(metric) -> None:
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(7, 16)), rng.normal(size=(11, 16))
    d = pairwise_distance(q, g, metric=metric)
    assert d.dtype == np.float32 and d.shape == (7, 11)
    np.testing.assert_allclose(d, pairwise_distances(q, g, metric=metric), atol=1e-5)
    with pytest.raises(ValueError, match="unknown metric"):
        pairwise_distance(q, g, metric="manhattan")


# --------------------------------------------------------------------------- weighted kNN


def test_weighted_knn_hand_computed() -> None:
    # Query [1, 0]; bank similarities 1, 0.8, 0.6, 0 with labels 0, 1, 1, 2; k = 3.
    # T = 0.1: score_0 = e^10 = 22026 > score_1 = e^8 + e^6 = 3384 -> 0.
    # T = 10:  score_0 = e^0.1 = 1.105 < score_1 = e^0.08 + e^0.06 = 2.145 -> 1.
    bank = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    labels = [0, 1, 1, 2]
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    assert weighted_knn_predict(bank, labels, query, k=3, temperature=0.1).tolist() == [0]
    assert weighted_knn_predict(bank, labels, query, k=3, temperature=10.0).tolist() == [1]
    # Cosine similarity: rescaled rows (and torch input) change nothing; k = 1 is nearest neighbour.
    scaled = weighted_knn_predict(torch.tensor(bank) * 5, labels, query * 0.1, k=3, temperature=10.0)
    assert scaled.tolist() == [1]
    assert weighted_knn_predict(bank, labels, query, k=1, temperature=10.0).tolist() == [0]
    # k above the bank size uses the whole bank: T = 10, scores 1.105, 2.145, e^0 = 1 -> 1.
    assert weighted_knn_predict(bank, labels, query, k=100, temperature=10.0, num_classes=3).tolist() == [1]


def test_weighted_knn_tie_rules() -> None:
    # Query [1, 0]; bank: [0, 1] label 5 (s = 0), then three copies of [1, 0] (s = 1) labelled 9, 4, 4.
    bank = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    labels = [5, 9, 4, 4]
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    # k = 1: three items tie at the k-th similarity; the lowest bank index (label 9) is taken.
    assert weighted_knn_predict(bank, labels, query, k=1).tolist() == [9]
    # k = 2: items 1 and 2 (labels 9 and 4) with equal weights: the class tie goes to the smaller label.
    assert weighted_knn_predict(bank, labels, query, k=2).tolist() == [4]
    # k = 3: label 4 has two votes.
    assert weighted_knn_predict(bank, labels, query, k=3).tolist() == [4]


def test_weighted_knn_matches_bruteforce_and_chunking() -> None:
    rng = np.random.default_rng(1)
    bank, queries = rng.normal(size=(200, 8)), rng.normal(size=(37, 8))
    labels = rng.integers(0, 6, 200)
    k, t = 15, 0.07
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = qn @ bn.T
    expected = []
    for row in sims:
        nn_idx = np.argsort(-row)[:k]
        expected.append(np.argmax(np.bincount(labels[nn_idx], weights=np.exp(row[nn_idx] / t), minlength=6)))
    for chunk in (1, 10, 256):
        pred = weighted_knn_predict(bank, labels, queries, k=k, temperature=t, num_classes=6, chunk=chunk)
        assert pred.tolist() == expected
    acc = weighted_knn_accuracy(bank, labels, queries, np.asarray(expected), k=k, temperature=t)
    assert acc == 1.0
    flipped = np.asarray(expected) + 1
    assert weighted_knn_accuracy(bank, labels, queries, flipped, k=k, temperature=t) == 0.0


# --------------------------------------------------------------------------- linear probe


def test_linear_probe_standardises_features() -> None:
    # The label lives in a feature of scale 1e-3 beside unit-variance noise: an unscaled L2-penalised
    # probe would need weights ~1e3 (plain LogisticRegression scores ~0.3 here); standardised, ~1.
    rng = np.random.default_rng(0)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        x = rng.normal(size=(n, 6))
        x[:, 0] = 1e-3 * y + 1e-5 * rng.normal(size=n)
        return x.astype(np.float32), y

    (xtr, ytr), (xte, yte) = make(300), make(200)
    assert linear_probe(xtr, ytr, xte, yte) >= 0.95
    assert linear_probe(xtr, ytr, xte, rng.permutation(yte)) < 0.6


# --------------------------------------------------------------------------- feature extraction


class _Probe(nn.Module):
    """Linear map with dropout that records the mode and grad state it ran under."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 5)
        self.drop = nn.Dropout(0.5)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, torch.is_grad_enabled()))
        return self.drop(self.linear(x.flatten(1))).view(len(x), 5, 1)


def test_extract_features_eval_no_grad_normalised_and_restores_modes() -> None:
    torch.manual_seed(0)
    enc = _Probe()
    enc.train()
    enc.drop.eval()  # a submodule in another mode must keep it
    x = torch.randn(10, 3, 4)
    feats = extract_features(enc, [x[:4], (x[4:], torch.zeros(6))], "cpu")
    assert feats.dtype == np.float32 and feats.shape == (10, 5)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    expected = torch.nn.functional.normalize(enc.linear(x.flatten(1)), dim=1).detach().numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)  # no dropout applied
    assert enc.seen == [(False, False), (False, False)]
    assert enc.training and enc.linear.training and not enc.drop.training
    with pytest.raises(ValueError, match="no batches"):
        extract_features(enc, [], "cpu")


def test_extract_features_autocast_bfloat16() -> None:
    torch.manual_seed(0)
    enc, x = _Probe(), torch.randn(6, 12)
    full = extract_features(enc, [x], torch.device("cpu"))
    half = extract_features(enc, [x], torch.device("cpu"), amp_dtype=torch.bfloat16)
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, atol=3e-2)


# --------------------------------------------------------------------------- embedding map


@pytest.mark.parametrize(("method", "n_labels"), [("tsne", 25), ("pca", 4)])
def test_embedding_map_writes_png(tmp_path, method, n_labels) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(n_labels), 3)
    feats = rng.normal(size=(len(labels), 8)) + labels[:, None]
    out = embedding_map(feats, [f"id{v}" for v in labels], tmp_path / "sub" / "map.png", method=method,
                        title="test", size_px=320)
    assert out.is_file() and out.stat().st_size > 0
    with Image.open(out) as im:
        assert im.size == (320, 320)
    with pytest.raises(ValueError, match="unknown method"):
        embedding_map(feats, labels.tolist(), tmp_path / "x.png", method="umap")
