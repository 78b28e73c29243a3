"""Evaluation protocols for frozen encoders: feature extraction, weighted kNN, linear probe and 2-D
embedding maps.

Retrieval under the Market-1501 protocol (distance matrices, CMC, mAP, mINP) is
:mod:`twinview.retrieval`, shared with the person re-ID downstream task.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
