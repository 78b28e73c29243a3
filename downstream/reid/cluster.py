"""Re-ID without identity labels: Cluster Contrast (Dai et al. 2021, "Cluster Contrast for Unsupervised
Person Re-Identification").

At the start of every epoch the training crops are embedded with the current model (eval mode, no
flip), clustered by DBSCAN on the k-reciprocal Jaccard distance (:func:`downstream.reid.rerank.
jaccard_distance`; sparse, faiss neighbours), and every cluster becomes a pseudo-identity; outliers
sit the epoch out. A memory holds one L2-normalised vector per cluster, initialised with the cluster
means. Each step takes P pseudo-identities x K crops, scores the BNNeck features against the whole
memory (:func:`downstream.reid.losses.cluster_nce_loss`) and then moves each cluster's vector towards
its hardest crop of the batch (:func:`update_memory`). Camera ids are never used.

Memory, pseudo-labels and the number of clusters are buffers of :class:`ClusterContrastNet`, so they
are saved in every checkpoint and a run killed mid-epoch resumes exactly, without re-clustering.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from downstream.reid.config import ReIDConfig
from downstream.reid.data import PersonDataset, train_pipeline
from downstream.reid.losses import cluster_nce_loss
from downstream.reid.model import ReIDModel
from downstream.reid.sampler import PKSampler
from downstream.reid.train import lr_factor
from engine.loop import Parts, Task
from engine.optim import param_groups
from twinview.data.records import PersonRecord
from twinview.errors import TwinviewError
from twinview.files import write_text_atomic

CLUSTER_FIELDS = ("epoch", "step", "clusters", "outliers", "clustered_fraction", "purity", "ari", "rank1",
                  "mAP")


class NoClusterError(TwinviewError):
    """DBSCAN found too few clusters to train on."""


@dataclass
class Clustering:
    labels: np.ndarray  # (N,) cluster per crop, -1 = outlier
    clusters: int
    outliers: int


def cluster_features(features: np.ndarray, eps: float, min_samples: int, k1: int, k2: int) -> Clustering:
    """DBSCAN (``metric="precomputed"``) on the sparse Jaccard distances of ``features``; pairs not
    stored are at distance 1, beyond any useful ``eps``."""
    from sklearn.cluster import DBSCAN

    from downstream.reid.rerank import jaccard_distance

    dist = jaccard_distance(features, k1, k2)
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dist)
    clusters = int(labels.max()) + 1
    if clusters == 0:
        raise NoClusterError(no_cluster_message(dist, eps, min_samples, len(features)))
    return Clustering(labels.astype(np.int64), clusters, int((labels < 0).sum()))


def no_cluster_message(dist: Any, eps: float, min_samples: int, n: int) -> str:
    """Why DBSCAN found nothing: the distance at which each crop would have ``min_samples`` neighbours."""
    dist = dist.tocsr()
    kth = []
    for i in range(n):
        row = np.sort(dist.data[dist.indptr[i]:dist.indptr[i + 1]])
        kth.append(row[min_samples - 1] if len(row) >= min_samples else 1.0)
    q = np.percentile(kth, [10, 50, 90])
    return (f"clustering found no cluster among {n} crops at cluster.eps={eps} with cluster.min_samples="
            f"{min_samples}: the Jaccard distance to each crop's {min_samples}th neighbour has 10th "
            f"percentile {q[0]:.3f}, median {q[1]:.3f}, 90th percentile {q[2]:.3f} (1 = no shared "
            f"neighbours). Raise cluster.eps towards those values or lower cluster.min_samples.")


def purity(labels: np.ndarray, true_ids: np.ndarray) -> float:
    """Fraction of the clustered crops whose cluster's most common true identity is their own."""
    keep = labels >= 0
    if not keep.any():
        return math.nan
    _, true = np.unique(true_ids[keep], return_inverse=True)
    pairs, counts = np.unique(np.stack([labels[keep], true], 1), axis=0, return_counts=True)
    majority = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    np.maximum.at(majority, pairs[:, 0], counts)
    return float(majority.sum() / keep.sum())


def cluster_means(features: np.ndarray, labels: np.ndarray, clusters: int) -> np.ndarray:
    """(clusters, D) L2-normalised mean feature of each cluster (outliers left out)."""
    keep = labels >= 0
    sums = np.zeros((clusters, features.shape[1]), dtype=np.float64)
    np.add.at(sums, labels[keep], features[keep])
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)


@torch.no_grad()
def update_memory(memory: Tensor, features: Tensor, targets: Tensor, momentum: float) -> None:
    """The "hard" update of Cluster Contrast, in place: for every cluster ``y`` in the batch, with
    ``q`` its crop least similar to ``c_y``, ``c_y <- normalise(momentum * c_y + (1 - momentum) * q)``."""
    feats = F.normalize(features.detach().float(), dim=1)
    for y in targets.unique().tolist():
        members = feats[targets == y]
        hardest = members[(members @ memory[y]).argmin()]
        memory[y] = F.normalize(momentum * memory[y] + (1.0 - momentum) * hardest, dim=0)


class ClusterContrastNet(nn.Module):
    """A :class:`ReIDModel` whose training output is the BNNeck feature, with the cluster memory
    (``capacity`` rows: at most one cluster per crop) and the pseudo-label of every crop as buffers."""

    def __init__(self, reid: ReIDModel, capacity: int) -> None:
        super().__init__()
        self.reid = reid
        self.register_buffer("memory", torch.zeros(capacity, reid.feat_dim))
        self.register_buffer("pseudo_labels", torch.full((capacity,), -1, dtype=torch.long))
        self.register_buffer("clusters", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        r = self.reid
        return r.bnneck(r.pool(r.feature_map(x)).flatten(1))


class FixedPKSampler(torch.utils.data.Sampler[int]):
    """P x K batches over the pseudo-identities (label -1 left out), ``batches`` per epoch whatever the
    number of clusters: successive :class:`PKSampler` plans of the epoch are laid end to end."""

    def __init__(self, p: int, k: int, batches: int, seed: int) -> None:
        self.p, self.k, self.batches_per_epoch, self.seed = p, k, batches, seed
        self.labels = np.zeros(0, dtype=np.int64)
        self.epoch, self.start_batch = 0, 0

    def set_labels(self, labels: np.ndarray) -> None:
        if (clusters := len(np.unique(labels[labels >= 0]))) < self.p:
            raise NoClusterError(f"clustering found {clusters} clusters, fewer than train.p={self.p} "
                                 "pseudo-identities per batch: lower train.p, or raise cluster.eps")
        self.labels = np.asarray(labels)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def plan(self) -> np.ndarray:
        """(batches, p * k) crop indices of the epoch."""
        kept = np.flatnonzero(self.labels >= 0)
        inner = PKSampler(self.labels[kept].tolist(), self.p, self.k, seed=self.seed)
        parts, have, sub = [], 0, 0
        while have < self.batches_per_epoch:
            inner.set_epoch(self.epoch * 1_000_003 + sub)  # distinct plans within and across epochs
            parts.append(kept[inner.batches()])
            have += len(parts[-1])
            sub += 1
        return np.concatenate(parts)[:self.batches_per_epoch]

    def __iter__(self):
        return iter(self.plan()[self.start_batch:].ravel().tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.p * self.k


class ClusterContrastTask(Task):
    """Cluster Contrast on the loop: re-cluster at each epoch start, ClusterNCE per step."""

    name = "re-ID (cluster contrast)"

    def __init__(self, cfg: ReIDConfig, records: list[PersonRecord], net: ClusterContrastNet, run_dir: Path,
                 evaluation: Any | None = None) -> None:
        self.cfg, self.records, self.net, self.run_dir = cfg, records, net, run_dir
        self.evaluation = evaluation  # callable(model) -> {"rank1", "mAP"} on a query/gallery split, or None
        self.has_ids = all(r.pid is not None for r in records)  # for purity only, never for training
        self.true_ids = np.array([r.pid if self.has_ids else -1 for r in records])

    def build(self, device: torch.device, rank: int, world: int) -> Parts:
        if world > 1:
            raise TwinviewError("label-free re-ID (train.labels=none) runs in one process: start it without "
                                "torchrun")
        cfg, t, c = self.cfg, self.cfg.train, self.cfg.cluster
        # the dataset yields each crop's position, which indexes the pseudo-labels
        numbered = [dataclasses.replace(r, pid=i) for i, r in enumerate(self.records)]
        self.dataset = PersonDataset(numbered, train_pipeline(cfg.data.augment, cfg.data.size), seed=t.seed)
        self.sampler = FixedPKSampler(t.p, t.k, c.iters_per_epoch, t.seed)
        loader = DataLoader(self.dataset, batch_size=t.p * t.k, sampler=self.sampler, drop_last=True,
                            pin_memory=device.type == "cuda")
        o = cfg.optim
        reid = self.net.reid
        optimizer = torch.optim.Adam(param_groups(reid, o.lr, o.weight_decay, reid.backbone,
                                                  o.backbone_lr_mult))

        steps = c.iters_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, cfg))
        self.device = device
        return Parts(self.net, optimizer, scheduler, loader, self.set_epoch, steps, steps * t.epochs,
                     t.p * t.k)

    def set_epoch(self, epoch: int, done: int) -> None:
        if done == 0:
            self.recluster(epoch)
        self.sampler.set_labels(self.net.pseudo_labels.cpu().numpy())
        self.sampler.set_epoch(epoch, start_batch=done)
        self.dataset.epoch = epoch

    def recluster(self, epoch: int) -> None:
        from downstream.reid.evaluate import extract

        c, net = self.cfg.cluster, self.net
        feats = extract(net.reid, [r.path for r in self.records], self.cfg.data.size, self.device,
                        self.cfg.eval.batch_size, flip=False, progress=self.cfg.train.progress,
                        desc=f"cluster {epoch}")
        found = cluster_features(feats, c.eps, c.min_samples, c.k1, c.k2)
        net.pseudo_labels.copy_(torch.from_numpy(found.labels))
        net.memory.zero_()
        net.memory[:found.clusters] = torch.from_numpy(cluster_means(feats, found.labels, found.clusters))
        net.clusters.fill_(found.clusters)
        row: dict[str, Any] = {"epoch": epoch, "step": epoch * c.iters_per_epoch, "clusters": found.clusters,
                               "outliers": found.outliers,
                               "clustered_fraction": 1.0 - found.outliers / len(self.records)}
        if self.has_ids:
            from sklearn.metrics import adjusted_rand_score

            keep = found.labels >= 0
            row["purity"] = purity(found.labels, self.true_ids)
            row["ari"] = float(adjusted_rand_score(self.true_ids[keep], found.labels[keep]))
        if self.evaluation is not None and c.eval_every_epochs and epoch % c.eval_every_epochs == 0:
            row.update(self.evaluation(net.reid))
        net.train()  # extraction left the model in eval mode
        record_clustering(self.run_dir, row)
        if self.cfg.train.progress:
            shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            print(f"clustering: {shown}", flush=True)

    def compute_loss(self, model: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        x = b[0].to(self.device, non_blocking=True).to(memory_format=torch.channels_last)
        index = b[1].to(self.device, non_blocking=True)
        targets = self.net.pseudo_labels[index]
        feats = model(x).float()
        memory = self.net.memory[:int(self.net.clusters)]
        loss = cluster_nce_loss(feats, memory, targets, self.cfg.cluster.temperature)
        self._batch = (feats, targets)
        return loss

    def after_step(self, step: int, total_steps: int) -> None:
        feats, targets = self._batch
        update_memory(self.net.memory, feats, targets, self.cfg.cluster.momentum)
        del self._batch


def market_scorer(cfg: ReIDConfig, market: Any, device: torch.device) -> Any | None:
    """``model -> {"rank1", "mAP"}`` on the query/gallery split of ``market`` (Market-1501 protocol), or
    None when the data has no query or gallery crops."""
    if not market.query or not market.gallery:
        return None
    from downstream.reid.data import as_arrays
    from downstream.reid.evaluate import extract
    from twinview.retrieval import market1501_scores, pairwise_distance

    e = cfg.eval
    (q_pids, q_cams), (g_pids, g_cams) = as_arrays(market.query), as_arrays(market.gallery)

    def score(model: ReIDModel) -> dict[str, float]:
        q, g = (extract(model, [r.path for r in part], cfg.data.size, device, e.batch_size, e.flip)
                for part in (market.query, market.gallery))
        scores = market1501_scores(pairwise_distance(q, g, e.metric, normalized=True), q_pids, g_pids, q_cams,
                                   g_cams, max_rank=1)
        return {"rank1": float(scores.cmc[0]), "mAP": float(scores.mAP)}

    return score


def record_clustering(run_dir: Path, row: dict[str, Any]) -> None:
    """Write ``row`` into ``clusters.csv`` (replacing an earlier row of its epoch, as after a resume) and
    redraw ``clustering.png``."""
    path = run_dir / "clusters.csv"
    rows = read_clustering(path)
    rows = [r for r in rows if int(r["epoch"]) != row["epoch"]] + [row]
    rows.sort(key=lambda r: int(r["epoch"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CLUSTER_FIELDS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())
    plot_clustering(rows, run_dir / "clustering.png")


def read_clustering(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def plot_clustering(rows: list[dict[str, Any]], out: Path) -> Path:
    """Clusters and outliers per epoch (left); purity, rank-1 and mAP where known (right)."""
    from matplotlib.figure import Figure

    epochs = [int(r["epoch"]) for r in rows]
    fig = Figure(figsize=(9, 3.4), dpi=110)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for key, style in (("clusters", "o-"), ("outliers", "s--")):
        left.plot(epochs, [float(r[key]) for r in rows], style, label=key)
    left.set(xlabel="epoch", ylabel="crops / clusters", title="pseudo-identities")
    left.legend()
    for key in ("purity", "ari", "rank1", "mAP"):
        pts = [(int(r["epoch"]), float(r[key])) for r in rows if key in r]
        if pts:
            right.plot(*zip(*pts, strict=True), "o-", label=key)
    right.set(xlabel="epoch", ylim=(0, 1), title="cluster quality and retrieval")
    if right.get_legend_handles_labels()[0]:
        right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    return out
