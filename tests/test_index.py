"""The retrieval index on the ground floor (``twinview.index``): folder round trip, atomic writes, clear
errors, galleries without identities, the embedding map, the exact / approximate switch, older folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

import twinview.index as tv_index
from conftest import REPO
from twinview.index import (
    MAP_FILE,
    IndexFileError,
    IndexModelMismatch,
    build_index,
    foreign_index,
    load_index,
)


def _gallery(n: int = 20, d: int = 8) -> tuple[np.ndarray, list[dict]]:
    feats = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    records = [{"path": f"g/{i:04d}_c{i % 3 + 1}.jpg", "pid": i // 2, "camid": i % 3 + 1} for i in range(n)]
    return feats, records


def test_index_round_trip_and_search(tmp_path: Path) -> None:
    feats, records = _gallery()
    out = build_index(feats, records, "abc123", tmp_path / "idx")
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["model_id"], meta["dim"], meta["count"], meta["metric"]) == ("abc123", 8, 20, "cosine")
    assert meta["pids"][5] == 2 and meta["twinview_version"]
    index = load_index(out)
    index.check_model("abc123")
    hits = index.search(feats[[3, 11]], k=5)
    assert [len(h) for h in hits] == [5, 5]
    top = hits[1][0]
    assert (top.rank, top.path, top.pid, top.camid) == (1, records[11]["path"], 5, records[11]["camid"])
    assert top.score == pytest.approx(1.0, abs=1e-5)
    assert [h.rank for h in hits[0]] == [1, 2, 3, 4, 5]
    assert all(a.score >= b.score for a, b in zip(hits[0], hits[0][1:], strict=False))
    assert len(index.search(feats[:1], k=500)[0]) == 20  # k clamped to the index size


def test_index_model_and_dim_mismatch(tmp_path: Path) -> None:
    feats, records = _gallery()
    index = load_index(build_index(feats, records, "model-a", tmp_path / "idx"))
    with pytest.raises(IndexModelMismatch, match=r"model-a.*model-b") as err:
        index.check_model("model-b")
    assert str(tmp_path / "idx") in str(err.value)
    with pytest.raises(ValueError, match=str(tmp_path / "idx")):
        index.search(np.zeros((1, 4), np.float32), k=3)


def test_index_missing_or_corrupt_files(tmp_path: Path) -> None:
    feats, records = _gallery()
    out = build_index(feats, records, "m", tmp_path / "idx")
    (out / "meta.json").write_text("{not json")
    with pytest.raises(IndexFileError, match="meta.json"):
        load_index(out)
    out = build_index(feats, records, "m", tmp_path / "idx2")
    (out / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexFileError, match="index.faiss"):
        load_index(out)
    (out / "index.faiss").unlink()
    with pytest.raises(IndexFileError, match=r"index\.faiss is missing"):
        load_index(out)


def test_index_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    feats, records = _gallery()
    out = tmp_path / "idx"

    def half_written(index: faiss.Index, path: str) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", half_written)
    with pytest.raises(OSError, match="disk full"):
        build_index(feats, records, "m", out)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    build_index(feats, records, "old", out)  # a failed rebuild keeps the old index
    monkeypatch.setattr(faiss, "write_index", half_written)
    with pytest.raises(OSError):
        build_index(feats[:5], records[:5], "new", out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["idx"] and load_index(out).model_id == "old"
    monkeypatch.undo()
    build_index(feats[:5], records[:5], "new", out, overwrite=True)  # a successful rebuild replaces it
    assert [p.name for p in tmp_path.iterdir()] == ["idx"] and len(load_index(out)) == 5

def _clustered(n: int, d: int = 32, ids: int = 10, noise: float = 0.5, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Unit rows around ``ids`` random centres (like a re-ID gallery), their identity and plain records."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, d))
    pid = np.arange(n) % ids
    feats = centres[pid] + noise * rng.normal(size=(n, d))
    feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)
    return feats, pid, [{"path": f"img/{i}.png", "pid": None, "camid": None} for i in range(n)]


def test_a_gallery_without_identities_round_trips_as_none(tmp_path: Path) -> None:
    feats, _, records = _clustered(12)
    records[3] = {"path": "img/3.png", "pid": 7, "camid": None}
    out = build_index(feats, records, "m", tmp_path / "idx")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["pids"][:4] == [None, None, None, 7] and meta["camids"][3] is None
    hit = load_index(out).search(feats[[0, 3]], k=1)
    assert (hit[0][0].path, hit[0][0].pid, hit[0][0].camid) == ("img/0.png", None, None)
    assert (hit[1][0].pid, hit[1][0].camid) == (7, None)


@pytest.mark.parametrize("tsne_max", [1_000, 10])  # t-SNE, and PCA above the size limit
def test_the_map_is_finite_and_places_an_item_at_its_own_point(tmp_path: Path, tsne_max: int,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tv_index, "TSNE_MAX_ROWS", tsne_max)
    feats, pid, records = _clustered(60)
    out = build_index(feats, records, "m", tmp_path / "idx")
    index = load_index(out)
    xy = index.map
    assert xy is not None and xy.shape == (60, 2) and xy.dtype == np.float32 and np.isfinite(xy).all()
    assert index.meta["map_method"] == ("tsne" if tsne_max >= 60 else "pca")
    assert foreign_index(out) is None  # map.npy is the index's own file: --overwrite may replace it
    placed = index.place(feats[:10], k=5)
    assert placed.shape == (10, 2) and np.isfinite(placed).all()
    spread = np.linalg.norm(xy - xy.mean(0), axis=1).mean()
    assert np.linalg.norm(placed - xy[:10], axis=1).max() < 0.25 * spread
    centres = np.stack([xy[pid == i].mean(0) for i in range(10)])  # an identity stays together on the map
    within = np.linalg.norm(xy - centres[pid], axis=1).mean()
    assert within < 0.5 * np.linalg.norm(centres - centres.mean(0), axis=1).mean()


def test_a_large_gallery_gets_the_approximate_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tv_index, "APPROX_MIN_ROWS", 1_000)
    monkeypatch.setattr(tv_index, "TSNE_MAX_ROWS", 100)
    monkeypatch.setattr(tv_index, "HNSW_PARAMS", {**tv_index.HNSW_PARAMS, "efSearch": 77})
    feats, _, records = _clustered(999)
    small = load_index(build_index(feats, records, "m", tmp_path / "small"))
    assert small.meta["index_type"] == "IndexFlatIP" and small.meta["index_params"] == {}
    feats, _, records = _clustered(3_000, d=64, ids=300, noise=0.7)
    index = load_index(build_index(feats, records, "m", tmp_path / "large"))
    assert index.meta["index_type"] == "IndexHNSWFlat" and index.meta["index_params"]["efSearch"] == 77
    assert isinstance(index.index, faiss.IndexHNSWFlat) and index.index.hnsw.efSearch == 77
    queries, _, _ = _clustered(200, d=64, ids=300, noise=0.7, seed=1)
    queries = np.concatenate([queries, feats[:50]])
    exact = faiss.IndexFlatIP(64)
    exact.add(feats)
    truth = exact.search(queries, 10)[1]
    found = [[int(h.path.split("/")[1].split(".")[0]) for h in row] for row in index.search(queries, 10)]
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]) >= 0.99


def test_an_older_index_without_a_map_still_loads(tmp_path: Path) -> None:
    feats, _, records = _clustered(20)
    for i, r in enumerate(records):
        r.update(pid=i, camid=1)
    out = build_index(feats, records, "m", tmp_path / "idx")
    (out / MAP_FILE).unlink()
    meta = json.loads((out / "meta.json").read_text())
    for key in ("index_type", "index_params", "map_method", "kind"):
        del meta[key]
    (out / "meta.json").write_text(json.dumps(meta))
    index = load_index(out)
    assert index.map is None and index.search(feats[:1], 3)[0][0].pid == 0
    with pytest.raises(IndexFileError, match=r"map\.npy.*rebuild"):
        index.place(feats[:1])
    assert foreign_index(out) is None
    build_index(feats, records, "m", out, overwrite=True)
    assert load_index(out).map is not None


def test_a_broken_map_is_a_clear_error(tmp_path: Path) -> None:
    feats, _, records = _clustered(20)
    out = build_index(feats, records, "m", tmp_path / "idx")
    np.save(out / MAP_FILE, np.zeros((19, 2), np.float32))
    with pytest.raises(IndexFileError, match=r"map\.npy.*\(20, 2\)"):
        load_index(out)
    (out / MAP_FILE).write_bytes(b"not numpy")
    with pytest.raises(IndexFileError, match=r"map\.npy"):
        load_index(out)


def test_a_single_query_runs_on_one_thread_and_restores_the_setting(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    feats, _, records = _clustered(20)
    index = load_index(build_index(feats, records, "m", tmp_path / "idx"))
    seen: list[int] = []

    class Spy:
        ntotal = index.index.ntotal

        def search(self, q: np.ndarray, k: int, inner: faiss.Index = index.index) -> tuple:
            seen.append(faiss.omp_get_max_threads())
            return inner.search(q, k)

    monkeypatch.setattr(index, "index", Spy())
    before = faiss.omp_get_max_threads()
    index.search(feats[:1], 3)
    index.search(feats, 3)
    assert seen == [1, before] and faiss.omp_get_max_threads() == before


def test_the_index_works_with_torch_unimportable(tmp_path: Path) -> None:
    """Build, load, search and map in a process where importing torch fails (the apps' environment)."""
    code = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError("torch is blocked")
sys.meta_path.insert(0, NoTorch())
import numpy as np
from twinview.index import build_index, load_index
feats = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
index = load_index(build_index(feats, [{{"path": str(i), "pid": None, "camid": None}} for i in range(30)],
                               "m", {str(tmp_path / "idx")!r}))
assert index.search(feats[:2], 3)[0][0].path == "0" and index.place(feats[:2]).shape == (2, 2)
assert "torch" not in sys.modules
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
