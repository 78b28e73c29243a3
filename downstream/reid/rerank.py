"""k-reciprocal re-ranking (Zhong et al. 2017, "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR), vectorised with numpy and scipy.sparse.

Over all ``N = Q + G`` images (queries and gallery together), with ``d`` the original distances:

1. ``d'(i, j) = d(i, j)^2 / max_l d(i, l)^2`` (squared, each row scaled to [0, 1]).
2. ``N(i, k)``: the ``k + 1`` nearest images of ``i`` under ``d'`` (``i`` itself included);
   ``R(i, k) = {j in N(i, k): i in N(j, k)}``, the k-reciprocal neighbours.
3. Expansion: ``R*(i) = R(i, k1) ∪ R(j, round(k1/2))`` for every ``j in R(i, k1)`` whose half-size set
   overlaps it enough, ``|R(j, k1/2) ∩ R(i, k1)| > 2/3 |R(j, k1/2)|``.
4. ``V(i, j) = exp(-d'(i, j)) / sum_{l in R*(i)} exp(-d'(i, l))`` for ``j in R*(i)``, else 0; local
   query expansion (``k2 > 1``): ``V(i) <- mean of V(j)`` over the ``k2`` nearest ``j`` of ``i``.
5. Jaccard distance ``d_J(i, j) = 1 - m / (2 - m)``, ``m = sum_l min(V(i, l), V(j, l))``.
6. ``d* = (1 - lambda) d_J + lambda d'``, returned for the (query, gallery) pairs.

This is the authors' reference implementation (``re_ranking`` in their repository, also used by
torchreid and the strong-baseline code) with sparse matrices: memory O(N k1^2 + Q G) instead of the
original's dense N x N matrices. ``q_q_dist`` and ``g_g_dist`` must be symmetric (the original scales
the columns and then transposes, which is the row scaling above for symmetric input). Neighbours tied
at the k-th distance are picked arbitrarily, as with the original's ``argsort``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import sparse

_ROW_BLOCK_ELEMENTS = 1 << 24  # entries of the N x N matrix materialised at once
_PAIR_BLOCK = 1 << 23  # (query, neighbour, gallery) triples expanded at once for the Jaccard sums


class _Distances:
    """The scaled squared distances ``d'`` of step 1, read from the three blocks on demand."""

    def __init__(self, q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray):
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.nq, self.n = len(q_q), len(q_q) + len(g_g)
        row_max = np.concatenate([np.maximum(q_q.max(1), q_g.max(1)), np.maximum(q_g.max(0), g_g.max(1))])
        self.scale = 1.0 / np.where(row_max > 0, row_max, 1.0) ** 2

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the full ``d'`` matrix, (stop - start, N)."""
        q = self.nq
        parts = []
        if start < q:
            parts.append(np.hstack([self.q_q[start:min(stop, q)], self.q_g[start:min(stop, q)]]))
        if stop > q:
            lo = max(start, q) - q
            parts.append(np.hstack([self.q_g[:, lo:stop - q].T, self.g_g[lo:stop - q]]))
        block = np.vstack(parts)
        return block * block * self.scale[start:stop, None]

    def at(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """``d'(i, j)`` for index arrays ``i``, ``j``."""
        q, out = self.nq, np.empty(len(i), dtype=np.float32)
        for sel, block, r, c in (((i < q) & (j < q), self.q_q, i, j),
                                 ((i < q) & (j >= q), self.q_g, i, j - q),
                                 ((i >= q) & (j < q), self.q_g.T, i - q, j),
                                 ((i >= q) & (j >= q), self.g_g, i - q, j - q)):
            out[sel] = block[r[sel], c[sel]]
        return out * out * self.scale[i]


def _nearest(dist: _Distances, k: int) -> np.ndarray:
    """The ``k`` nearest images of every image (itself included), nearest first, (N, k)."""
    rows = max(1, _ROW_BLOCK_ELEMENTS // dist.n)
    out = np.empty((dist.n, k), dtype=np.int64)
    for start in range(0, dist.n, rows):
        block = dist.rows(start, min(start + rows, dist.n))
        top = np.argpartition(block, k - 1, axis=1)[:, :k] if k < dist.n else np.argsort(block, axis=1)
        out[start:start + len(block)] = np.take_along_axis(
            top, np.argsort(np.take_along_axis(block, top, axis=1), axis=1, kind="stable"), axis=1)
    return out


def _reciprocal(nearest: np.ndarray, k: int) -> sparse.csr_matrix:
    """Indicator matrix of ``R(i, k)``: row ``i`` marks the ``j`` in ``N(i, k)`` with ``i in N(j, k)``."""
    forward = nearest[:, :k + 1]
    n = len(nearest)
    mutual = (forward[forward] == np.arange(n)[:, None, None]).any(2)
    rows = np.repeat(np.arange(n), mutual.sum(1))
    return sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, forward[mutual])), shape=(n, n))


def _sum_of_minima(vq: sparse.csr_matrix, vg: sparse.csr_matrix) -> np.ndarray:
    """``m[i, j] = sum_l min(vq[i, l], vg[j, l])`` for nonnegative sparse rows, dense (Q, G) float32.

    Only the ``l`` where both are nonzero contribute: each entry ``(i, l)`` of ``vq`` meets the gallery
    entries of column ``l``; the triples are expanded and summed by ``np.bincount``, a block of query
    rows at a time.
    """
    n_q, n_g = vq.shape[0], vg.shape[0]
    by_col = vg.T.tocsr()  # row l: the gallery items j with vg[j, l] > 0
    per_col = np.diff(by_col.indptr)
    row_cost = np.bincount(np.repeat(np.arange(n_q), np.diff(vq.indptr)), weights=per_col[vq.indices],
                           minlength=n_q)
    out = np.empty((n_q, n_g), dtype=np.float32)
    start = 0
    while start < n_q:
        stop = start + max(1, int(np.searchsorted(np.cumsum(row_cost[start:]), _PAIR_BLOCK, side="right")))
        sub = vq[start:stop].tocoo()
        counts = per_col[sub.col]
        first = by_col.indptr[sub.col] - (np.cumsum(counts) - counts)  # pos = first + running number
        pos = np.repeat(first, counts) + np.arange(counts.sum())
        values = np.minimum(np.repeat(sub.data, counts), by_col.data[pos])
        flat = np.repeat(sub.row, counts) * n_g + by_col.indices[pos]
        out[start:stop] = np.bincount(flat, weights=values, minlength=(stop - start) * n_g).reshape(-1, n_g)
        start = stop
    return out


def re_rank(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray, k1: int = 20, k2: int = 6,
            lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked query-gallery distances ``d*`` (Q, G), float32; see the module docstring.

    ``q_g_dist`` (Q, G), ``q_q_dist`` (Q, Q) and ``g_g_dist`` (G, G) are nonnegative distances (e.g.
    Euclidean or cosine between L2-normalised features). With ``lambda_value = 1`` the result is the
    scaled squared original distance ``d'``.
    """
    q_g, q_q, g_g = (np.asarray(a, dtype=np.float32) for a in (q_g_dist, q_q_dist, g_g_dist))
    if q_g.ndim != 2 or q_q.shape != (len(q_g), len(q_g)) or g_g.shape != (q_g.shape[1], q_g.shape[1]) \
            or q_g.size == 0:
        raise ValueError(f"re_rank: need (Q, G), (Q, Q), (G, G) distances with Q, G >= 1, "
                         f"got {q_g.shape}, {q_q.shape}, {g_g.shape}")
    if k1 < 1 or k2 < 1 or not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"re_rank: need k1 >= 1, k2 >= 1 and 0 <= lambda_value <= 1, "
                         f"got {k1}, {k2}, {lambda_value}")
    dist = _Distances(q_g, q_q, g_g)
    nearest = _nearest(dist, min(dist.n, max(k1 + 1, k2)))
    v = _encoding(nearest, dist.at, k1, k2)
    minima = _sum_of_minima(v[:dist.nq], v[dist.nq:])
    jaccard = 1.0 - minima / (2.0 - minima)
    original = q_g * q_g * dist.scale[:dist.nq, None]
    return ((1.0 - lambda_value) * jaccard + lambda_value * original).astype(np.float32)


def _encoding(nearest: np.ndarray, distance_at: Callable[[np.ndarray, np.ndarray], np.ndarray], k1: int,
              k2: int) -> sparse.csr_matrix:
    """Steps 2-4: the k-reciprocal encodings ``V`` (N, N) from each image's nearest neighbours (itself
    first) and the distances ``distance_at(i, j)`` that weigh them."""
    n, k1_half = len(nearest), int(np.around(k1 / 2))
    recip = _reciprocal(nearest, k1)
    recip_half = _reciprocal(nearest, k1_half)
    # candidates j in R(i, k1) whose R(j, k1/2) overlaps R(i, k1) by more than 2/3 of its size
    overlap = recip.multiply(recip @ recip_half.T).tocoo()
    size_half = np.asarray(recip_half.sum(1)).ravel()
    keep = overlap.data > 2.0 / 3.0 * size_half[overlap.col]
    accepted = sparse.csr_matrix((np.ones(keep.sum(), dtype=np.float32),
                                  (overlap.row[keep], overlap.col[keep])), shape=(n, n))
    expanded = (recip + accepted @ recip_half).tocoo()
    weights = np.exp(-distance_at(expanded.row, expanded.col)).astype(np.float64)
    weights /= np.bincount(expanded.row, weights=weights, minlength=n)[expanded.row]
    v = sparse.csr_matrix((weights, (expanded.row, expanded.col)), shape=(n, n))
    if k2 > 1:
        rows = np.repeat(np.arange(n), k2)
        v = sparse.csr_matrix((np.full(n * k2, 1.0 / k2), (rows, nearest[:, :k2].ravel())), shape=(n, n)) @ v
    return v


def jaccard_distance(features: np.ndarray, k1: int = 30, k2: int = 6) -> sparse.csr_matrix:
    """k-reciprocal Jaccard distances among the rows of ``features`` (N, D), as a sparse (N, N) matrix
    holding only the pairs whose encodings overlap (every other pair is at distance 1, the maximum).

    The clustering distance of Cluster Contrast (Dai et al. 2021) and SpCL (Ge et al. 2020): steps 2-5
    above over one set of images, with ``d(i, j) = |f_i - f_j|^2`` of the L2-normalised features and no
    row scaling. The ``max(k1 + 1, k2)`` nearest neighbours come from a faiss inner-product search, so
    memory is O(N k1^2), never N x N; the diagonal is stored (distance 0).
    """
    import faiss

    feats = np.ascontiguousarray(features, dtype=np.float32)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"jaccard_distance: need (N, D) features with N >= 2, got {feats.shape}")
    if k1 < 1 or k2 < 1:
        raise ValueError(f"jaccard_distance: need k1 >= 1 and k2 >= 1, got {k1}, {k2}")
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    n = len(feats)
    index = faiss.IndexFlatIP(feats.shape[1])
    index.add(feats)
    _, nearest = index.search(feats, min(n, max(k1 + 1, k2)))
    # an exact duplicate may be listed before the image itself: put the image first, as the encoding expects
    row = np.arange(n)[:, None]
    nearest = np.concatenate([row, np.where(nearest == row, -1, nearest)], axis=1)
    nearest = np.stack([r[r >= 0][:nearest.shape[1] - 1] for r in nearest]).astype(np.int64)

    def squared(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return np.maximum(2.0 - 2.0 * np.einsum("ij,ij->i", feats[i], feats[j]), 0.0)

    minima = _pairwise_minima(_encoding(nearest, squared, k1, k2))
    minima.data = np.clip(1.0 - minima.data / (2.0 - minima.data), 0.0, 1.0)  # m may pass 1 by rounding
    return minima


def _pairwise_minima(v: sparse.csr_matrix) -> sparse.csr_matrix:
    """``m[i, j] = sum_l min(v[i, l], v[j, l])`` for the pairs that share a column, sparse (N, N).

    Every column ``l`` contributes to all pairs of its nonzero rows; the pairs are expanded a block of
    columns at a time and summed as duplicates of a sparse matrix.
    """
    n = v.shape[0]
    by_col = v.tocsc()
    by_col.sort_indices()
    counts = np.diff(by_col.indptr)
    pairs = counts.astype(np.int64) ** 2
    out = sparse.csr_matrix((n, n), dtype=np.float64)
    start = 0
    while start < n:
        stop = start + max(1, int(np.searchsorted(np.cumsum(pairs[start:]), _PAIR_BLOCK, side="right")))
        cols = np.repeat(np.arange(start, stop), counts[start:stop])
        left = np.arange(by_col.indptr[start], by_col.indptr[stop])
        reps = counts[cols]  # each entry meets every entry of its column, itself included
        left = np.repeat(left, reps)
        running = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
        right = np.repeat(by_col.indptr[cols], reps) + running
        values = np.minimum(by_col.data[left], by_col.data[right])
        out = out + sparse.csr_matrix((values, (by_col.indices[left], by_col.indices[right])), shape=(n, n))
        start = stop
    return out.tocsr()
