"""Re-ID without labels: Jaccard distance, clustering, ClusterNCE, memory update, sampler, and training
with resume on synthetic crops."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from downstream.reid.cluster import (
    FixedPKSampler,
    NoClusterError,
    cluster_features,
    purity,
    read_clustering,
    update_memory,
)
from downstream.reid.config import ReIDConfig
from downstream.reid.losses import cluster_nce_loss
from downstream.reid.rerank import jaccard_distance
from downstream.reid.train import run_reid
from twinview.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _jaccard_oracle(feats: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """Dense, per-image loops, as Cluster Contrast's ``compute_jaccard_distance`` describes it."""
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    n = len(f)
    d = np.maximum(2 - 2 * f @ f.T, 0)
    rank = np.argsort(d, axis=1, kind="stable")

    def recip(i: int, k: int) -> np.ndarray:
        forward = rank[i, :k + 1]
        return forward[np.where(rank[forward, :k + 1] == i)[0]]

    v = np.zeros((n, n))
    for i in range(n):
        r = recip(i, k1)
        expanded = r
        for c in r:
            cand = recip(c, int(np.around(k1 / 2)))
            if len(np.intersect1d(cand, r)) > 2 / 3 * len(cand):
                expanded = np.append(expanded, cand)
        expanded = np.unique(expanded)
        w = np.exp(-d[i, expanded])
        v[i, expanded] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    m = np.minimum(v[:, None, :], v[None, :, :]).sum(2)
    return 1 - m / (2 - m)


def _blobs(n_per: int, centres: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(centres, 16))
    labels = np.repeat(np.arange(centres), n_per)
    return (mean[labels] + spread * rng.normal(size=(len(labels), 16))).astype(np.float32), labels


@pytest.mark.parametrize(("k1", "k2"), [(6, 1), (8, 3), (20, 6)])
def test_jaccard_distance_matches_dense_reference(k1: int, k2: int) -> None:
    feats, _ = _blobs(8, 5, 0.6)
    sparse = jaccard_distance(feats, k1, k2)
    dense = sparse.toarray()
    stored = sparse.copy()
    stored.data[:] = 1
    dense[stored.toarray() == 0] = 1.0  # pairs not stored are at distance 1
    np.testing.assert_allclose(dense, _jaccard_oracle(feats, k1, k2), atol=1e-6)
    assert np.allclose(np.diag(dense), 0) and np.allclose(dense, dense.T, atol=1e-6)
    if k1 < 8:  # neighbourhoods smaller than a blob: only pairs within a blob overlap
        assert sparse.nnz <= 8 * len(feats)


def test_clustering_recovers_separated_identities_and_leaves_outliers() -> None:
    feats, truth = _blobs(10, 6, 0.15)
    crops = np.zeros((61, 17), dtype=np.float32)
    crops[:60, :16] = feats
    crops[60, 16] = 1.0  # orthogonal to every identity: nobody's reciprocal neighbour
    found = cluster_features(crops, eps=0.6, min_samples=4, k1=12, k2=1)
    assert found.clusters == 6 and found.outliers == 1 and found.labels[-1] == -1
    assert purity(found.labels[:-1], truth) == 1.0


def test_no_cluster_is_a_clear_error_with_eps_and_distance_statistics() -> None:
    feats = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)  # no structure
    with pytest.raises(NoClusterError, match=r"cluster\.eps=0\.01 .*median \d\.\d{3}.*Raise cluster\.eps"):
        cluster_features(feats, eps=0.01, min_samples=4, k1=8, k2=3)


def test_purity_by_hand() -> None:
    clusters = np.array([0, 0, 0, 1, 1, -1])
    truth = np.array([5, 5, 7, 7, 7, 9])
    assert purity(clusters, truth) == pytest.approx(4 / 5)  # 2 of 3, 2 of 2; the outlier left out


def test_cluster_nce_loss_by_hand() -> None:
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = cluster_nce_loss(torch.tensor([[2.0, 0.0]]), memory, torch.tensor([0]), temperature=1.0)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1)))  # -log(e^1 / (e^1 + e^0))
    loss = cluster_nce_loss(torch.tensor([[2.0, 0.0]]), memory, torch.tensor([1]), temperature=0.5)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(2)))  # -log(e^0 / (e^2 + e^0))
    with pytest.raises(ValueError, match="cluster_nce_loss"):
        cluster_nce_loss(torch.zeros(2, 3), memory, torch.tensor([0, 1]))


def test_memory_moves_towards_the_hardest_crop_of_each_cluster() -> None:
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    feats = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    update_memory(memory, feats, torch.tensor([0, 0, 1]), momentum=0.1)
    expected = torch.tensor([0.1, 0.9]) / math.hypot(0.1, 0.9)  # cluster 0: the crop at 90 degrees
    torch.testing.assert_close(memory[0], expected)
    torch.testing.assert_close(memory[1], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(memory[2], torch.tensor([0.6, 0.8]))  # not in the batch: unchanged


def test_fixed_pk_sampler_over_pseudo_identities() -> None:
    labels = np.array([0] * 5 + [1] * 3 + [-1] * 4 + [2] * 6 + [3] * 2)
    sampler = FixedPKSampler(p=2, k=3, batches=7, seed=0)
    sampler.set_labels(labels)
    sampler.set_epoch(0)
    plan = sampler.plan()
    assert plan.shape == (7, 6) and len(sampler) == 42
    assert (labels[plan] >= 0).all()  # outliers sit the epoch out
    for batch in plan:
        groups = labels[batch].reshape(2, 3)
        assert (groups == groups[:, :1]).all() and groups[0, 0] != groups[1, 0]
    sampler.set_epoch(0, start_batch=5)
    assert list(sampler) == plan[5:].ravel().tolist()
    sampler.set_epoch(1)
    assert not np.array_equal(sampler.plan(), plan)
    with pytest.raises(NoClusterError, match="fewer than train.p=2"):
        sampler.set_labels(np.array([0, 0, -1]))


def _cfg(data: Path, out: Path, *extra: str) -> ReIDConfig:
    return load_config(ReIDConfig, REPO / "configs/reid/market_cluster.yaml", [
        f"out_dir={out}", f"data.path={data}", "data.size=[32,16]", "train.epochs=2", "train.p=4",
        "train.k=4", "cluster.iters_per_epoch=6", "cluster.eps=0.3", "train.progress=false",
        "optim.warmup_epochs=0", "train.ckpt_every_steps=4", *extra])


def test_label_free_training_logs_clusters_and_resumes_exactly(tmp_path: Path, synth_market: Path,
                                                               killed_after_checkpoint: Callable) -> None:

    full = run_reid(_cfg(synth_market, tmp_path / "full"))
    rows = read_clustering(full.run_dir / "clusters.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1] and full.steps == 12
    for r in rows:
        assert int(r["clusters"]) >= 4 and 0 < float(r["purity"]) <= 1 and 0 <= float(r["rank1"]) <= 1
    assert (full.run_dir / "clustering.png").stat().st_size > 0
    payload = torch.load(full.model_path, weights_only=True)
    assert payload["model_config"]["training_labels"] == "none"
    assert payload["model_config"]["num_classes"] == 0 and "classifier.weight" not in payload["model"]
    assert 0 <= full.metrics["rank1"] <= 1

    with killed_after_checkpoint(8):  # mid-way through the second epoch, after its clustering
        run_reid(_cfg(synth_market, tmp_path / "cut"))
    resumed = run_reid(_cfg(synth_market, tmp_path / "cut"), resume=tmp_path / "cut")
    a = torch.load(full.model_path, weights_only=True)["model"]
    b = torch.load(resumed.model_path, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_clustering(resumed.run_dir / "clusters.csv") == rows  # no second clustering of epoch 1


def test_label_free_run_starts_from_a_supervised_reid_run(tmp_path: Path, synth_market: Path) -> None:
    from downstream.reid.model import ReIDModel
    from downstream.reid.train import load_start
    from twinview.config import ConfigError

    supervised = run_reid(load_config(ReIDConfig, REPO / "configs/reid/market.yaml", [
        f"out_dir={tmp_path / 'sup'}", f"data.path={synth_market}", "data.size=[32,16]", "train.epochs=1",
        "train.p=4", "train.k=4", "train.progress=false"]))
    trained = torch.load(supervised.model_path, weights_only=True)["model"]
    model = ReIDModel(0, "resnet18")
    assert load_start(model, supervised.run_dir, "resnet18") == {"kind": "reid", "method": None}
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, trained[f"backbone.{key}"]), key
    with pytest.raises(ConfigError, match="a resnet18 re-ID model; this run's model.encoder is resnet34"):
        load_start(ReIDModel(0, "resnet34"), supervised.model_path, "resnet34")
    adapted = run_reid(_cfg(synth_market, tmp_path / "adapt", f"model.encoder_weights={supervised.run_dir}",
                            "train.epochs=1"))
    assert torch.load(adapted.model_path, weights_only=True)["model_config"]["start"] == "reid"
    assert len(read_clustering(adapted.run_dir / "clusters.csv")) == 1


def test_label_free_training_on_a_plain_folder_of_crops(tmp_path: Path, synth_market: Path) -> None:
    import shutil

    crops = tmp_path / "crops"
    crops.mkdir()
    for i, image in enumerate(sorted((synth_market / "bounding_box_train").glob("*.jpg"))):
        shutil.copy(image, crops / f"crop_{i:04d}.jpg")  # no identities, no cameras in the names
    result = run_reid(_cfg(crops, tmp_path / "run", "train.epochs=1"))
    rows = read_clustering(result.run_dir / "clusters.csv")
    assert len(rows) == 1 and int(rows[0]["clusters"]) >= 4 and "purity" not in rows[0]
    assert result.metrics == {} and "nothing to score" in result.report
    meta = torch.load(result.model_path, weights_only=True)["model_config"]
    assert meta["data"]["kind"] == "person_folder" and result.steps == 6
