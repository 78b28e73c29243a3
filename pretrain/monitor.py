"""Encoder quality during and after pretraining, where the data carries identities.

For person crops in the Market-1501 layout the monitor embeds ``query/`` and ``bounding_box_test/``
with the preset's deterministic evaluation transform and reports retrieval under the Market-1501
protocol (rank-1, mAP) and a weighted kNN identity accuracy (gallery as the bank). Data without
identities (MSD scans, nuclei, plain image folders) has nothing to monitor and returns ``{}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pretrain.config import DataConfig, PretrainConfig
from pretrain.datasets import resolve_kind
from pretrain.evaluation import embedding_map, extract_features, weighted_knn_accuracy
from pretrain.views import eval_transform
from twinview.retrieval import RetrievalScores, market1501_scores, pairwise_distance


def image_batches(paths: Sequence[Path], transform, batch_size: int = 128) -> Iterator[torch.Tensor]:  # noqa: ANN001
    from twinview.data.images import load_image

    for i in range(0, len(paths), batch_size):
        yield torch.stack([transform(load_image(p)) for p in paths[i:i + batch_size]])


@dataclass
class MarketEmbedding:
    """Query and gallery features of one encoder, with identities and cameras, and their scores."""

    query: np.ndarray
    gallery: np.ndarray
    q_pids: np.ndarray
    g_pids: np.ndarray
    scores: RetrievalScores


def embed_market(data: DataConfig, encoder: nn.Module, device: torch.device,
                 amp_dtype: torch.dtype | None = None) -> MarketEmbedding:
    """Embed ``query/`` and ``bounding_box_test/`` with the preset's evaluation transform and score
    retrieval under the Market-1501 protocol (cosine distance)."""
    from twinview.data.market1501 import read_market1501

    market = read_market1501(Path(data.path))
    transform = eval_transform(data.views, tuple(data.size), spatial_dims=2)
    q = extract_features(encoder, image_batches([r.path for r in market.query], transform), device,
                         amp_dtype)
    g = extract_features(encoder, image_batches([r.path for r in market.gallery], transform), device,
                         amp_dtype)
    q_pids = np.array([r.pid for r in market.query])
    g_pids = np.array([r.pid for r in market.gallery])
    scores = market1501_scores(pairwise_distance(q, g, metric="cosine"), q_pids, g_pids,
                               np.array([r.camid for r in market.query]),
                               np.array([r.camid for r in market.gallery]))
    return MarketEmbedding(q, g, q_pids, g_pids, scores)


def monitor_encoder(cfg: PretrainConfig, encoder: nn.Module, device: torch.device,
                    amp_dtype: torch.dtype | None, plot_dir: Path | None = None) -> dict[str, float]:
    """Retrieval and kNN metrics of ``encoder`` on the run's data; writes ``monitor.json`` and an
    embedding map into ``plot_dir`` when given."""
    if resolve_kind(cfg.data) != "market1501":
        return {}
    e = embed_market(cfg.data, encoder, device, amp_dtype)
    cmc = e.scores.cmc
    knn = weighted_knn_accuracy(e.gallery, e.g_pids, e.query, e.q_pids, k=cfg.train.knn_k,
                                temperature=cfg.train.knn_temperature)
    result = {"rank1": float(cmc[0]), "rank5": float(cmc[min(4, len(cmc) - 1)]),
              "mAP": float(e.scores.mAP), "knn_top1": float(knn)}
    if plot_dir is not None:
        (plot_dir / "monitor.json").write_text(json.dumps(result, indent=2) + "\n")
        keep = np.isin(e.q_pids, np.unique(e.q_pids)[:30])
        embedding_map(e.query[keep], e.q_pids[keep].tolist(), plot_dir / "embedding_map.png",
                      title="query embeddings (30 identities), coloured by identity")
    return result
