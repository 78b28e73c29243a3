"""Evaluation protocols for frozen encoders: feature extraction, weighted kNN, linear probe,
Market-1501 retrieval metrics (CMC, mAP, mINP), distance matrices and 2-D embedding maps.

Everything here works on plain arrays, so the retrieval metrics serve the person re-ID downstream
task as well as the pretraining monitor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

JUNK_PID = -1
"""Gallery items with this identity are ignored by the retrieval protocol (Market-1501 "junk")."""

_CHUNK_ELEMENTS = 1 << 22  # distance-matrix entries processed at once by ``retrieval_scores``
_TSNE_THREADED_FROM = 5000  # smaller t-SNE runs single-threaded: OpenMP start-up and contention dominate


# --------------------------------------------------------------------------- features


def extract_features(encoder: nn.Module, batches: Iterable[torch.Tensor | Sequence[torch.Tensor]],
                     device: torch.device | str, amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Embed every batch with ``encoder`` and return L2-normalised float32 rows, shape (N, D).

    The encoder runs in eval mode without gradients (under ``torch.autocast`` when ``amp_dtype`` is
    given); outputs with more than two dimensions are flattened per sample. A batch may also be a
    tuple/list such as ``(images, labels)``: its first element is embedded. Each submodule's
    train/eval flag is restored afterwards.
    """
    device = torch.device(device)
    modes = [(m, m.training) for m in encoder.modules()]
    encoder.eval()
    feats: list[torch.Tensor] = []
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            for batch in batches:
                x = batch if isinstance(batch, torch.Tensor) else batch[0]
                out = encoder(x.to(device, non_blocking=True)).flatten(1).float()
                feats.append(F.normalize(out, dim=1).cpu())
    finally:
        for module, mode in modes:
            module.training = mode
    if not feats:
        raise ValueError("extract_features: no batches to embed")
    return torch.cat(feats).numpy()


def pairwise_distance(q_feats: np.ndarray | torch.Tensor, g_feats: np.ndarray | torch.Tensor,
                      metric: str = "cosine") -> np.ndarray:
    """Distance matrix (Q, G) in float32.

    ``cosine``: ``1 - <q, g> / (|q| |g|)`` in [0, 2]; ``euclidean``: ``|q - g|_2`` computed as
    ``sqrt(max(|q|^2 + |g|^2 - 2 <q, g>, 0))``. Both are clipped at 0 against rounding.
    """
    q = np.asarray(q_feats, dtype=np.float32)
    g = np.asarray(g_feats, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"pairwise_distance: need (Q, D) and (G, D) features, got {q.shape} and {g.shape}")
    if metric == "cosine":
        eps = np.float32(1e-12)
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), eps)
        gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), eps)
        return np.maximum(1.0 - qn @ gn.T, 0.0, dtype=np.float32)
    if metric == "euclidean":
        sq = (q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2.0 * (q @ g.T)
        return np.sqrt(np.maximum(sq, 0.0), dtype=np.float32)
    raise ValueError(f"pairwise_distance: unknown metric {metric!r} (cosine, euclidean)")


# --------------------------------------------------------------------------- kNN and linear probe


@torch.no_grad()
def weighted_knn_predict(bank: torch.Tensor | np.ndarray, bank_labels: Sequence | np.ndarray,
                         queries: torch.Tensor | np.ndarray, k: int = 20, temperature: float = 0.1,
                         num_classes: int | None = None, chunk: int = 256) -> np.ndarray:
    """Weighted kNN classification (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
    Instance Discrimination"; the monitor of SimCLR/MoCo codebases).

    Rows are L2-normalised, ``s_j = <q, b_j>`` is the cosine similarity to bank item ``j``, and over
    the ``k`` most similar bank items ``N_k(q)`` the class score is
    ``score_c = sum_{j in N_k(q), y_j = c} exp(s_j / T)``; the prediction is ``argmax_c score_c``.
    Weights are computed as ``exp((s_j - s_max) / T)``, which rescales all scores of a query
    equally (no overflow for small ``T``). ``k`` is capped at the bank size.

    Tie rules: bank items tied at the k-th similarity are taken in bank order (lower index first);
    classes tied on score go to the smallest class label.

    ``num_classes``: labels are ints in ``[0, num_classes)``; ``None`` uses the distinct bank labels
    (any sortable values), so queries can only be assigned labels seen in the bank. Inputs may be
    arrays or tensors; the work happens on the bank's device.
    Returns the predicted labels, shape (Q,). Queries are processed ``chunk`` rows at a time.
    """
    b = F.normalize(torch.as_tensor(bank, dtype=torch.float32), dim=1)
    q = F.normalize(torch.as_tensor(queries, dtype=torch.float32, device=b.device), dim=1)
    labels = np.asarray(bank_labels)
    if b.ndim != 2 or q.ndim != 2 or b.shape[1] != q.shape[1] or len(labels) != len(b) or len(b) == 0:
        raise ValueError(f"weighted_knn_predict: bank {tuple(b.shape)} with {len(labels)} labels "
                         f"and queries {tuple(q.shape)} do not fit")
    if k < 1 or temperature <= 0:
        raise ValueError(f"weighted_knn_predict: need k >= 1 and temperature > 0, got {k}, {temperature}")
    if num_classes is None:
        classes, codes = np.unique(labels, return_inverse=True)
    else:
        classes, codes = np.arange(num_classes), labels.astype(np.int64)
        if codes.min() < 0 or codes.max() >= num_classes:
            raise ValueError(f"weighted_knn_predict: labels outside [0, {num_classes})")
    codes_t = torch.as_tensor(codes.reshape(-1), dtype=torch.int64, device=b.device)
    k = min(k, len(b))
    preds: list[torch.Tensor] = []
    for start in range(0, len(q), chunk):
        sims = q[start:start + chunk] @ b.T
        kth = sims.topk(k, dim=1).values[:, -1:]
        above, tied = sims > kth, sims == kth
        take = above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))
        idx = take.nonzero()[:, 1].view(-1, k)  # exactly k per row, in bank order
        s = sims.gather(1, idx)
        w = torch.exp((s - s.max(1, keepdim=True).values) / temperature)
        scores = torch.zeros(len(s), len(classes), device=b.device).scatter_add_(1, codes_t[idx], w)
        preds.append(scores.argmax(1).cpu())  # first maximum: smallest label
    return classes[torch.cat(preds).numpy()] if preds else classes[:0]


def weighted_knn_accuracy(bank: torch.Tensor | np.ndarray, bank_labels: Sequence | np.ndarray,
                          queries: torch.Tensor | np.ndarray, query_labels: Sequence | np.ndarray,
                          k: int = 20, temperature: float = 0.1, num_classes: int | None = None,
                          chunk: int = 256) -> float:
    """Top-1 accuracy of :func:`weighted_knn_predict` against ``query_labels``."""
    pred = weighted_knn_predict(bank, bank_labels, queries, k, temperature, num_classes, chunk)
    truth = np.asarray(query_labels)
    if len(truth) != len(pred) or len(truth) == 0:
        raise ValueError(f"weighted_knn_accuracy: {len(pred)} queries with {len(truth)} labels")
    return float(np.mean(pred == truth))


def linear_probe(train_feats: np.ndarray, train_labels: Sequence | np.ndarray, test_feats: np.ndarray,
                 test_labels: Sequence | np.ndarray, C: float = 1.0, max_iter: int = 1000) -> float:
    """Linear-probe accuracy on frozen features: ``StandardScaler`` then multinomial
    ``LogisticRegression`` (L2 penalty, inverse strength ``C``, lbfgs) fitted on the training split
    and scored (top-1 accuracy) on the test split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    probe.fit(np.asarray(train_feats, dtype=np.float32), np.asarray(train_labels))
    return float(probe.score(np.asarray(test_feats, dtype=np.float32), np.asarray(test_labels)))


# --------------------------------------------------------------------------- retrieval (re-ID)


@dataclass(frozen=True)
class RetrievalScores:
    """Market-1501 retrieval result: ``cmc[r]`` is the rank-(r+1) accuracy; ``num_valid`` queries
    were scored and ``num_skipped`` had no valid gallery match."""

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid: int
    num_skipped: int

    def as_tuple(self) -> tuple[np.ndarray, float, float]:
        """``(cmc, mAP, mINP)``."""
        return self.cmc, self.mAP, self.mINP


def _check_retrieval_inputs(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
                            q_camids: np.ndarray, g_camids: np.ndarray, max_rank: int) -> None:
    n_q, n_g = distmat.shape if distmat.ndim == 2 else (-1, -1)
    if n_q < 0 or q_pids.shape != (n_q,) or q_camids.shape != (n_q,) \
            or g_pids.shape != (n_g,) or g_camids.shape != (n_g,):
        raise ValueError(f"retrieval: distmat {distmat.shape} does not fit query ids {q_pids.shape}/"
                         f"{q_camids.shape} and gallery ids {g_pids.shape}/{g_camids.shape}")
    if n_g == 0 or n_g >= 1 << 31:
        raise ValueError(f"retrieval: gallery size {n_g} outside [1, 2^31)")
    if max_rank < 1:
        raise ValueError(f"retrieval: max_rank must be >= 1, got {max_rank}")
    if distmat.dtype.kind == "f" and np.isnan(distmat).any():
        raise ValueError("retrieval: distmat contains NaN")


def _finish(first: np.ndarray, ap: np.ndarray, inp: np.ndarray, num_q: int, max_rank: int) -> RetrievalScores:
    """Average per-query results; ``first`` holds each valid query's 1-based rank of its first match."""
    if len(first) == 0:
        raise ValueError("retrieval: no query has a valid match in the gallery")
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


def retrieval_scores(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                     g_camids: np.ndarray, max_rank: int = 50, chunk: int | None = None) -> RetrievalScores:
    """Market-1501 protocol (Zheng et al. 2015), vectorised over queries.

    Per query: the gallery is ranked by ascending distance, ties broken by gallery order (the order of
    ``np.argsort(kind="stable")``). Gallery items with the query's pid and camera, and items with pid
    ``JUNK_PID`` (-1), are removed; every other item with a different pid (e.g. distractors, pid 0)
    is a negative. With ``r_1 < ... < r_m`` the ranks of the ``m`` true matches among the kept items:

    - CMC: ``cmc[r] = fraction of queries with r_1 <= r + 1``, for ``r < min(max_rank, G)``
      (``max_rank`` capped at the gallery size as in torchreid; a query's curve stays at 1 after its
      first match, so short kept lists are padded with their last value).
    - AP: ``(1/m) sum_i i / r_i`` (precision at each true match), as torchreid's ``eval_market1501``.
    - INP: ``m / r_m`` (Ye et al. 2021, "Deep Learning for Person Re-identification: A Survey and
      Outlook"); mAP and mINP average over the queries that have a match.

    Queries without any true match are skipped (counted in ``num_skipped``); if none has one,
    ``ValueError``. Implementation: one uint64 key per entry, ``order_key << 32 | index << 1 | match``,
    with removed items pushed past every real key; a row-wise ``np.sort`` of the keys (SIMD
    quicksort; the keys are distinct, so the result equals a stable argsort) leaves the match flags in
    the lowest bit in rank order. float32 distances (what :func:`pairwise_distance` returns) give the
    order key directly; other dtypes need an extra argsort (roughly twice as slow).
    ``chunk`` queries are processed at a time (default: ~4M entries, about 60 MB of temporaries).
    """
    distmat = np.asarray(distmat)
    q_pids, g_pids, q_camids, g_camids = (np.asarray(a) for a in (q_pids, g_pids, q_camids, g_camids))
    _check_retrieval_inputs(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    n_q, n_g = distmat.shape
    chunk = chunk or max(1, _CHUNK_ELEMENTS // n_g)
    parts = [_chunk_scores(distmat[i:i + chunk], q_pids[i:i + chunk], q_camids[i:i + chunk], g_pids, g_camids)
             for i in range(0, n_q, chunk)]
    first, ap, inp = (np.concatenate(p) for p in zip(*parts, strict=True))
    return _finish(first, ap, inp, n_q, min(max_rank, n_g))


def retrieval_scores_reference(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
                               q_camids: np.ndarray, g_camids: np.ndarray,
                               max_rank: int = 50) -> RetrievalScores:
    """Plain per-query loop computing the same protocol as :func:`retrieval_scores` (the test oracle
    and the speed baseline)."""
    distmat = np.asarray(distmat)
    q_pids, g_pids, q_camids, g_camids = (np.asarray(a) for a in (q_pids, g_pids, q_camids, g_camids))
    _check_retrieval_inputs(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
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


def retrieval_metrics(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                      g_camids: np.ndarray, max_rank: int = 50) -> tuple[np.ndarray, float, float]:
    """``(cmc, mAP, mINP)`` under the Market-1501 protocol; see :func:`retrieval_scores`."""
    return retrieval_scores(distmat, q_pids, g_pids, q_camids, g_camids, max_rank).as_tuple()


def retrieval_metrics_reference(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
                                q_camids: np.ndarray, g_camids: np.ndarray,
                                max_rank: int = 50) -> tuple[np.ndarray, float, float]:
    """``(cmc, mAP, mINP)`` from the per-query loop :func:`retrieval_scores_reference`."""
    return retrieval_scores_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank).as_tuple()


# --------------------------------------------------------------------------- embedding map


def embedding_map(features: np.ndarray, labels: Sequence, out_png: Path, method: str = "tsne",
                  title: str = "", size_px: int = 800) -> Path:
    """Scatter plot of a 2-D embedding of ``features`` coloured by label, saved as a
    ``size_px`` x ``size_px`` PNG.

    ``tsne``: scikit-learn ``TSNE(init="pca", random_state=0)`` with perplexity
    ``min(30, (n - 1) / 3)`` (it must stay below n), single-threaded below 5000 points (OpenMP
    start-up and contention cost more than they save there); ``pca``: the first two principal
    components.
    Colours cycle through ``tab20``; a legend is drawn only for at most 20 labels. Rendered by Agg
    through a bare ``matplotlib.figure.Figure`` (no pyplot state, no display needed).
    """
    import matplotlib
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    if len(x) != len(labels) or len(x) < 4:
        raise ValueError(f"embedding_map: need >= 4 features with one label each, "
                         f"got {len(x)} and {len(labels)}")
    if method == "tsne":
        tsne = TSNE(n_components=2, init="pca", random_state=0, perplexity=min(30.0, (len(x) - 1) / 3))
        with threadpool_limits(1 if len(x) < _TSNE_THREADED_FROM else None):
            xy = tsne.fit_transform(x)
    elif method == "pca":
        xy = PCA(n_components=2, random_state=0).fit_transform(x)
    else:
        raise ValueError(f"embedding_map: unknown method {method!r} (tsne, pca)")
    classes, codes = np.unique(np.asarray(labels), return_inverse=True)
    dpi = 100
    fig = Figure(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab20"]
    for c, name in enumerate(classes):
        sel = codes == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=8, color=cmap(c % cmap.N), label=str(name))
    if len(classes) <= 20:
        ax.legend(fontsize="small", markerscale=2, loc="best")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png", dpi=dpi)
    return out_png
