"""The Market-1501 retrieval protocol: distance matrices, CMC / mAP / mINP and their Markdown table.

The ground floor of the project: numpy only (no torch), so person re-ID evaluation, the pretraining
monitor and the benchmarks all score retrieval with the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

JUNK_PID = -1
"""Gallery items with this identity are ignored by the protocol (Market-1501 "junk", pid -1)."""

DISTRACTOR_PID = 0
"""Gallery items with this identity are never a true match (Market-1501 "distractors", pid 0000)."""

_CHUNK_ELEMENTS = 1 << 22  # distance-matrix entries processed at once by ``market1501_scores``

_Ids = Sequence[int] | np.ndarray


@dataclass(frozen=True)
class RetrievalScores:
    """Market-1501 retrieval result: ``cmc[r]`` is the rank-(r+1) accuracy; ``num_valid`` queries
    were scored and ``num_skipped`` had no valid gallery match."""

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid: int
    num_skipped: int


# --------------------------------------------------------------------------- distances


def pairwise_distance(q_feats: np.ndarray, g_feats: np.ndarray, metric: str = "cosine",
                      normalized: bool = False) -> np.ndarray:
    """Distance matrix (Q, G) in float32 between the rows of ``q_feats`` (Q, D) and ``g_feats`` (G, D).

    ``normalized=False`` (any features): ``cosine`` is ``1 - <q, g> / (|q| |g|)`` in [0, 2], the rows
    re-normalised first; ``euclidean`` is ``|q - g|_2`` computed as
    ``sqrt(max(|q|^2 + |g|^2 - 2 <q, g>, 0))``. Both are clipped at 0 against rounding.

    ``normalized=True`` (rows already L2-normalised, as re-ID features are): ``cosine`` is
    ``1 - <q, g>`` and ``euclidean`` is ``sqrt(max(2 - 2 <q, g>, 0))``, in float32 arithmetic with no
    re-normalisation and no clipping of the cosine distance (it may be a few ulp below 0 for
    identical rows). This is the arithmetic re-ID evaluation has always used, so its numbers stay
    bit-for-bit the same; re-normalising a unit float32 row moves distances by rounding.
    """
    q = np.asarray(q_feats, dtype=np.float32)
    g = np.asarray(g_feats, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"pairwise_distance: need (Q, D) and (G, D) features, got {q.shape} and {g.shape}")
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"pairwise_distance: unknown metric {metric!r} (cosine, euclidean)")
    if normalized:
        sim = q @ g.T
        if metric == "cosine":
            return np.float32(1.0) - sim
        return np.sqrt(np.maximum(np.float32(2.0) - np.float32(2.0) * sim, np.float32(0.0)))
    if metric == "cosine":
        eps = np.float32(1e-12)
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), eps)
        gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), eps)
        return np.maximum(1.0 - qn @ gn.T, 0.0, dtype=np.float32)
    sq = (q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2.0 * (q @ g.T)
    return np.sqrt(np.maximum(sq, 0.0), dtype=np.float32)


# --------------------------------------------------------------------------- scoring


def market1501_scores(distmat: np.ndarray, q_pids: _Ids, g_pids: _Ids, q_camids: _Ids, g_camids: _Ids,
                      max_rank: int = 50, chunk: int | None = None) -> RetrievalScores:
    """Retrieval scores under the Market-1501 protocol (Zheng et al. 2015, "Scalable Person
    Re-identification: A Benchmark", ICCV), vectorised over queries.

    Per query: the gallery is ranked by ascending ``distmat`` (Q, G), ties broken by gallery order (the
    order of ``np.argsort(kind="stable")``). Gallery items with the query's pid *and* camera, and junk
    items (pid ``JUNK_PID`` = -1), are removed; every other item with a different pid (distractors,
    pid ``DISTRACTOR_PID`` = 0, included) is a wrong match. With ``r_1 < ... < r_m`` the ranks of the
    query's ``m`` true matches among the kept items:

    - CMC: ``cmc[r] = fraction of queries with r_1 <= r + 1``, for ``r < min(max_rank, G)``
      (``max_rank`` capped at the gallery size as in torchreid; a query's curve stays at 1 after its
      first match, so short kept lists are padded with their last value).
    - AP: ``(1/m) sum_{i=1..m} i / r_i`` (the precision at each true match), as torchreid's
      ``eval_market1501``; mAP is its mean.
    - INP: ``m / r_m``, the precision at the hardest true match (Ye et al. 2021, "Deep Learning for
      Person Re-identification: A Survey and Outlook"); mINP is its mean.

    The means run over the queries with at least one true match; the others are skipped and counted
    in ``num_skipped``. ``ValueError`` for: a query pid of 0 (distractors would become true matches)
    or -1 (a query must be a real identity), no queries, no query with a true match, ids that do not
    fit ``distmat``, an empty gallery, ``max_rank < 1``, or NaN distances.

    Implementation: one uint64 key per entry, ``order_key << 32 | index << 1 | match``, with removed
    items pushed past every real key; a row-wise ``np.sort`` of the keys (SIMD quicksort; the keys are
    distinct, so the result equals a stable argsort) leaves the match flags in the lowest bit in rank
    order. float32 (and float16) distances, what :func:`pairwise_distance` returns, give the order key
    directly; other dtypes need an extra argsort (roughly twice as slow). ``chunk`` queries are
    processed at a time (default: ~4M entries, about 60 MB of temporaries).
    """
    distmat, q_pids, g_pids, q_camids, g_camids = _checked_inputs(distmat, q_pids, g_pids, q_camids,
                                                                  g_camids, max_rank)
    n_q, n_g = distmat.shape
    chunk = chunk or max(1, _CHUNK_ELEMENTS // n_g)
    parts = [_chunk_scores(distmat[i:i + chunk], q_pids[i:i + chunk], q_camids[i:i + chunk], g_pids, g_camids)
             for i in range(0, n_q, chunk)]
    first, ap, inp = (np.concatenate(p) for p in zip(*parts, strict=True))
    return _finish(first, ap, inp, n_q, min(max_rank, n_g))


def rank_table(cmc: np.ndarray, mAP: float, mINP: float, ranks: Sequence[int] = (1, 5, 10)) -> str:
    """A Markdown table (header, alignment row, one value row) of the given CMC ranks, mAP and mINP,
    in percent with one decimal; ends with a newline."""
    cmc = np.asarray(cmc)
    if any(r < 1 or r > len(cmc) for r in ranks):
        raise ValueError(f"rank_table: ranks {list(ranks)} outside the CMC curve's 1..{len(cmc)}")
    names = [f"Rank-{r}" for r in ranks] + ["mAP", "mINP"]
    values = [100 * float(cmc[r - 1]) for r in ranks] + [100 * mAP, 100 * mINP]
    return "\n".join(["| " + " | ".join(names) + " |", "|" + " ---: |" * len(names),
                      "| " + " | ".join(f"{v:.1f}" for v in values) + " |"]) + "\n"


# --------------------------------------------------------------------------- internals


def _checked_inputs(distmat: np.ndarray, q_pids: _Ids, g_pids: _Ids, q_camids: _Ids, g_camids: _Ids,
                    max_rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The inputs as arrays, after the checks listed in :func:`market1501_scores`."""
    distmat = np.asarray(distmat)
    q_pids, g_pids, q_camids, g_camids = (np.asarray(a) for a in (q_pids, g_pids, q_camids, g_camids))
    bad = np.isin(q_pids, (JUNK_PID, DISTRACTOR_PID))
    if bad.any():
        raise ValueError(f"market1501_scores: queries {np.flatnonzero(bad)[:8].tolist()} have pid "
                         f"{JUNK_PID} (junk) or {DISTRACTOR_PID} (distractor); "
                         "a query must be a real identity")
    if len(q_pids) == 0:
        raise ValueError("market1501_scores: no queries")
    n_q, n_g = distmat.shape if distmat.ndim == 2 else (-1, -1)
    if n_q < 0 or q_pids.shape != (n_q,) or q_camids.shape != (n_q,) \
            or g_pids.shape != (n_g,) or g_camids.shape != (n_g,):
        raise ValueError(f"market1501_scores: distmat {distmat.shape} does not fit query ids {q_pids.shape}/"
                         f"{q_camids.shape} and gallery ids {g_pids.shape}/{g_camids.shape}")
    if n_g == 0 or n_g >= 1 << 31:
        raise ValueError(f"market1501_scores: gallery size {n_g} outside [1, 2^31)")
    if max_rank < 1:
        raise ValueError(f"market1501_scores: max_rank must be >= 1, got {max_rank}")
    if distmat.dtype.kind == "f" and np.isnan(distmat).any():
        raise ValueError("market1501_scores: distmat contains NaN")
    return distmat, q_pids, g_pids, q_camids, g_camids


def _finish(first: np.ndarray, ap: np.ndarray, inp: np.ndarray, num_q: int, max_rank: int) -> RetrievalScores:
    """Average per-query results; ``first`` holds each valid query's 1-based rank of its first match."""
    if len(first) == 0:
        raise ValueError("market1501_scores: no query has a valid match in the gallery")
    hits = np.bincount(np.minimum(first, max_rank + 1) - 1, minlength=max_rank + 1)[:max_rank]
    cmc = (np.cumsum(hits) / len(first)).astype(np.float32)
    return RetrievalScores(cmc, float(np.mean(ap)), float(np.mean(inp)), len(first), num_q - len(first))


def _write_order_key(d: np.ndarray, out: np.ndarray) -> None:
    """Write into ``out`` (uint32) a key per entry whose order is the distance order of its row and
    which is equal exactly for equal distances.

    float32 (and float16, upcast exactly): the IEEE-754 bit pattern made monotone (all bits of
    negatives flipped, the sign bit of the rest; -0.0 first turned into +0.0). Other dtypes: the
    position in the row's sorted order of the first value equal to the entry (a "min" rank), from a
    plain (SIMD, unstable) argsort.
    """
    if d.dtype in (np.float16, np.float32):
        bits = np.add(d, np.float32(0.0), dtype=np.float32).view(np.uint32)
        flip = bits >> np.uint32(31)
        flip *= np.uint32(0x7FFFFFFF)
        flip |= np.uint32(0x80000000)
        np.bitwise_xor(bits, flip, out=out)
    else:
        order = np.argsort(d, axis=1)
        ordered = np.take_along_axis(d, order, axis=1)
        group_start = np.zeros(d.shape, dtype=np.uint32)
        group_start[:, 1:] = np.where(ordered[:, 1:] != ordered[:, :-1], np.arange(1, d.shape[1]), 0)
        np.put_along_axis(out, order, np.maximum.accumulate(group_start, axis=1), axis=1)


def _chunk_scores(d: np.ndarray, q_pids: np.ndarray, q_camids: np.ndarray, g_pids: np.ndarray,
                  g_camids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First-match rank, AP and INP of the queries of one chunk that have a true match."""
    n, n_g = d.shape
    same_pid = g_pids[None, :] == q_pids[:, None]
    removed = (same_pid & (g_camids[None, :] == q_camids[:, None])) | (g_pids == JUNK_PID)[None, :]
    match = same_pid & ~removed
    # uint64 key = order key (high word) | gallery index << 1 | match flag (low word), written as halves
    key = np.empty((n, n_g), dtype=np.uint64)
    halves = key.view(np.uint32).reshape(n, n_g, 2)
    low, high = (halves[..., 0], halves[..., 1]) if np.little_endian else (halves[..., 1], halves[..., 0])
    np.bitwise_or(np.arange(n_g, dtype=np.uint32) << np.uint32(1), match, out=low)
    _write_order_key(d, high)
    high[removed] = 0xFFFFFFFF  # past every real key: order keys of non-NaN values stay below
    key.sort(axis=1)
    rows, cols = np.nonzero(low & np.uint32(1))  # ``low`` views the sorted keys: flags in rank order
    ranks = cols + 1  # kept items come first, so the column is the rank among kept items
    n_rel = np.bincount(rows, minlength=n)
    valid = n_rel > 0
    starts = np.cumsum(n_rel) - n_rel
    hit_no = np.arange(1, len(rows) + 1) - starts[rows]  # i in "i / r_i"
    ap = np.bincount(rows, weights=hit_no / ranks, minlength=n)[valid] / n_rel[valid]
    return ranks[starts[valid]], ap, n_rel[valid] / ranks[(starts + n_rel - 1)[valid]]


def _reference_scores(distmat: np.ndarray, q_pids: _Ids, g_pids: _Ids, q_camids: _Ids, g_camids: _Ids,
                      max_rank: int = 50) -> RetrievalScores:
    """Plain per-query loop computing the same protocol as :func:`market1501_scores`: the oracle of
    the tests and the baseline of ``benchmarks/reid_eval_speed.py``."""
    distmat, q_pids, g_pids, q_camids, g_camids = _checked_inputs(distmat, q_pids, g_pids, q_camids,
                                                                  g_camids, max_rank)
    n_q, n_g = distmat.shape
    first, ap, inp = [], [], []
    for i in range(n_q):
        order = np.argsort(distmat[i], kind="stable")
        pids, cams = g_pids[order], g_camids[order]
        keep = (pids != JUNK_PID) & ~((pids == q_pids[i]) & (cams == q_camids[i]))
        is_match = pids[keep] == q_pids[i]
        if not is_match.any():
            continue
        ranks = np.flatnonzero(is_match) + 1
        first.append(ranks[0])
        ap.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        inp.append(len(ranks) / ranks[-1])
    return _finish(np.asarray(first, dtype=np.int64), np.asarray(ap), np.asarray(inp), n_q,
                   min(max_rank, n_g))
