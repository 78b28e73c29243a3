"""The Market-1501 retrieval protocol (twinview.retrieval): distances, CMC / mAP / mINP, the rank table,
and the module's independence from torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import average_precision_score
from sklearn.metrics.pairwise import pairwise_distances

from conftest import REPO
from twinview.retrieval import _reference_scores, market1501_scores, pairwise_distance, rank_table

IMPLS = pytest.mark.parametrize("impl", [market1501_scores, _reference_scores],
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
def test_retrieval_protocol_combined_by_hand(impl) -> None:
    # Query pid 1 cam 0; gallery in distance order: pid 1 cam 0 (same camera: ignored), junk (-1:
    # ignored), distractor (0: wrong), pid 1 cam 2 (match), pid 3. Kept: [0, 1, 3] -> match at rank 2:
    # AP = INP = 1/2, cmc = [0, 1, 1, 1, 1] (padded to G = 5).
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]], dtype=np.float32)
    res = impl(d, [1], [1, -1, 0, 1, 3], [0], [0, 1, 1, 2, 1])
    np.testing.assert_allclose(res.cmc, [0, 1, 1, 1, 1])
    assert res.mAP == pytest.approx(0.5) and res.mINP == pytest.approx(0.5)
    # A second query (pid 3) whose only gallery image shares its camera is skipped and counted.
    res = impl(np.vstack([d, d]), [1, 3], [1, -1, 0, 1, 3], [0, 1], [0, 1, 1, 2, 1], max_rank=2)
    assert (res.num_valid, res.num_skipped) == (1, 1)
    np.testing.assert_allclose(res.cmc, [0, 1])


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


@IMPLS
@pytest.mark.parametrize("bad_pid", [0, -1])
def test_retrieval_rejects_non_identity_queries(impl, bad_pid: int) -> None:
    # A distractor query would count the distractors as true matches.
    with pytest.raises(ValueError, match="real identity"):
        impl(np.zeros((2, 2), np.float32), [1, bad_pid], [0, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="no queries"):
        impl(np.zeros((0, 2), np.float32), [], [0, 1], [], [1, 1])


def test_retrieval_scores_fields() -> None:
    d = np.array([[0.3, 0.1, 0.2]], dtype=np.float32)
    res = market1501_scores(d, *_ids([1], [1, 2, 1], [0], [1, 1, 1]), max_rank=2)
    # Ranking: g1 (pid 2), g2 (pid 1), g0 (pid 1) -> ranks 2, 3: AP = (1/2 + 2/3) / 2, INP = 2/3.
    assert isinstance(res.cmc, np.ndarray) and isinstance(res.mAP, float) and isinstance(res.mINP, float)
    np.testing.assert_allclose(res.cmc, [0, 1])
    assert res.mAP == pytest.approx((1 / 2 + 2 / 3) / 2) and res.mINP == pytest.approx(2 / 3)
    ref = _reference_scores(d, *_ids([1], [1, 2, 1], [0], [1, 1, 1]), max_rank=2)
    np.testing.assert_allclose(ref.cmc, res.cmc)
    assert (ref.mAP, ref.mINP) == pytest.approx((res.mAP, res.mINP))
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.mAP = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------- retrieval, random


def _random_case(rng: np.random.Generator, n_q: int, n_g: int, dtype, discrete: bool):
    if discrete:  # few distinct values: many ties
        d = rng.integers(0, 4, (n_q, n_g)).astype(dtype)
    else:  # negatives and infinities exercise the float32 bit transform
        d = rng.normal(size=(n_q, n_g)).astype(dtype)
        d[rng.random(d.shape) < 0.01] = np.inf
        d[rng.random(d.shape) < 0.01] = -np.inf
    q_pids = rng.integers(1, 12, n_q)  # real identities; the gallery adds junk (-1) and distractors (0)
    g_pids = rng.integers(-1, 12, n_g)
    return d, q_pids, g_pids, rng.integers(0, 3, n_q), rng.integers(0, 3, n_g)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("discrete", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_retrieval_vectorised_matches_reference(dtype, discrete, chunk) -> None:
    rng = np.random.default_rng(hash((np.dtype(dtype).name, discrete, chunk)) % 2**32)
    for n_q, n_g, max_rank in [(40, 150, 50), (25, 12, 50), (60, 300, 5)]:
        case = _random_case(rng, n_q, n_g, dtype, discrete)
        fast = market1501_scores(*case, max_rank=max_rank, chunk=chunk)
        ref = _reference_scores(*case, max_rank=max_rank)
        np.testing.assert_allclose(fast.cmc, ref.cmc)
        assert fast.cmc.shape == (min(max_rank, n_g),)
        assert fast.mAP == pytest.approx(ref.mAP) and fast.mINP == pytest.approx(ref.mINP)
        assert (fast.num_valid, fast.num_skipped) == (ref.num_valid, ref.num_skipped)


def test_retrieval_ap_agrees_with_sklearn() -> None:
    # Without removals and ties, AP is scikit-learn's average precision of the scores -distance.
    rng = np.random.default_rng(3)
    d = rng.random((30, 80)).astype(np.float32)
    q_pids, g_pids = rng.integers(1, 6, 30), rng.integers(1, 6, 80)  # real identities only
    q_pids[0] = g_pids[0]
    valid = [i for i in range(30) if (g_pids == q_pids[i]).any()]
    expected = np.mean([average_precision_score(g_pids == q_pids[i], -d[i]) for i in valid])
    res = market1501_scores(d, q_pids, g_pids, np.zeros(30, int), np.ones(80, int))
    assert res.mAP == pytest.approx(expected, rel=1e-6)
    assert res.num_skipped == 30 - len(valid)


# --------------------------------------------------------------------------- rank table


def test_rank_table_markdown() -> None:
    cmc = np.array([0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.9, 0.9, 0.95])
    assert rank_table(cmc, 0.4321, 0.1, ranks=(1, 5, 10)) == (
        "| Rank-1 | Rank-5 | Rank-10 | mAP | mINP |\n| ---: | ---: | ---: | ---: | ---: |\n"
        "| 50.0 | 80.0 | 95.0 | 43.2 | 10.0 |\n")
    with pytest.raises(ValueError, match="outside"):
        rank_table(cmc[:5], 0.4, 0.1)


# --------------------------------------------------------------------------- distances


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_pairwise_distance_matches_sklearn(metric, normalized) -> None:
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(7, 16)), rng.normal(size=(11, 16))
    if normalized:
        q, g = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, g))
    d = pairwise_distance(q, g, metric=metric, normalized=normalized)
    assert d.dtype == np.float32 and d.shape == (7, 11)
    np.testing.assert_allclose(d, pairwise_distances(q, g, metric=metric), atol=1e-5)
    with pytest.raises(ValueError, match="unknown metric"):
        pairwise_distance(q, g, metric="manhattan", normalized=normalized)
    with pytest.raises(ValueError, match=r"\(Q, D\)"):
        pairwise_distance(q, g[:, :8], metric=metric, normalized=normalized)


def _reid_distances_before(q: np.ndarray, g: np.ndarray, metric: str) -> np.ndarray:
    """Verbatim the distance function re-ID evaluation used before ``pairwise_distance(normalized=True)``."""
    sim = q @ g.T
    if metric == "cosine":
        return 1.0 - sim
    return np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_pairwise_distance_normalized_keeps_reid_numbers(metric) -> None:
    # Re-ID features are L2-normalised float32 rows; their distances (and so every re-ID number) must be
    # bit-for-bit those of the old formula, self-distances included (query rows repeat in the gallery).
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 512)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q, g = x[:120], x[60:]
    for a, b in ((q, g), (q, q), (g, g)):
        d = pairwise_distance(a, b, metric, normalized=True)
        assert d.dtype == np.float32
        np.testing.assert_array_equal(d, _reid_distances_before(a, b, metric))


# --------------------------------------------------------------------------- torch-free


def test_import_does_not_pull_in_torch() -> None:
    code = ("import sys, twinview.retrieval; "
            "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "assert 'torch' not in sys.modules, leaked")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
