"""Encoder evaluation protocols: features, weighted kNN, linear probe, embedding maps (retrieval under
the Market-1501 protocol: tests/test_retrieval.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pretrain.evaluation import (
    embedding_map,
    extract_features,
    linear_probe,
    weighted_knn_accuracy,
    weighted_knn_predict,
)

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
