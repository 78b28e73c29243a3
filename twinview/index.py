"""A faiss retrieval index of gallery embeddings, stored as a folder with its metadata.

On the ground floor (faiss, numpy and scikit-learn; no torch), so the command line and the apps read and
write the same folders. Layout of ``out/``:

- ``index.faiss``: the L2-normalised features, so that the inner product is the cosine similarity.
  Galleries below :data:`APPROX_MIN_ROWS` get an exact ``IndexFlatIP``; larger ones an ``IndexHNSWFlat``
  graph, since an exact scan reads every row per query and stops being interactive there
  (``benchmarks/reid_query_latency.py`` measures both and sets the parameters below).
- ``meta.json``: ``model_id``, ``dim``, ``count``, ``metric``, ``paths``, ``pids``, ``camids`` (``null``
  where unknown: a gallery without identities or cameras), ``index_type`` with its ``index_params``,
  ``map_method``, ``twinview_version`` and ``kind`` = ``"twinview-reid-index"``.
- ``map.npy``: an (N, 2) float32 map of the embeddings for plotting the gallery, computed once here
  rather than on every page view (t-SNE for small galleries, PCA above :data:`TSNE_MAX_ROWS`).

The folder is written under a temporary sibling name and renamed into place, so readers never see a
half-written index. An existing path is replaced only when it is an earlier index (with ``overwrite``),
never a folder or file twinview did not write. ``model_id`` (e.g. the fingerprint of the encoder's
weights) guards against querying with embeddings of another model: :meth:`RetrievalIndex.check_model`.
Older folders (no ``map.npy``, no ``index_type``) still load.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from twinview.errors import DataError, check_output, display_path, is_link_loop
from twinview.provenance import twinview_version

INDEX_FILE, META_FILE, MAP_FILE = "index.faiss", "meta.json", "map.npy"
INDEX_KIND = "twinview-reid-index"  # meta.json's "kind": marks a folder that build_index wrote
METRIC = "cosine"
_META_KEYS = ("model_id", "dim", "count", "metric", "paths", "pids", "camids")

FLAT, HNSW = "IndexFlatIP", "IndexHNSWFlat"
APPROX_MIN_ROWS = 20_000
"""Galleries with at least this many rows get the approximate HNSW index: an exact scan of 512-d rows
takes about 5 ms at 20,000 and grows linearly (about 20 ms at 100,000) on one core."""
HNSW_PARAMS = {"M": 32, "efConstruction": 80, "efSearch": 64}
"""Graph degree and build / search beam widths of the HNSW index (efSearch is restored on load). On
re-ID-like data of 100,000 rows it returns the exact top 10 in under 2 ms; a lighter graph (M 16,
efConstruction 40) builds 3x faster but misses some of them."""
_SEARCH_PARAMS = ("efSearch",)  # set again on load from meta.json (the others are built into the graph)
ONE_THREAD_MAX_QUERIES = 4
"""Batches up to this size search on one faiss thread: for a single query a second thread costs more in
start-up and memory-bandwidth contention than it gains (the app's interactive path)."""

TSNE_MAX_ROWS = 3_000
"""Galleries up to this size are mapped with t-SNE (neighbourhoods kept); larger ones with PCA, since
t-SNE's time grows too fast to run at index time."""
_TSNE_MIN_ROWS = 5  # below this t-SNE has no neighbourhoods to keep
# Up to this size t-SNE runs on one thread: OpenMP start-up and spin-waiting cost more than a second thread
# gains, ten times more on a busy machine (200 rows: 16 s on 2 threads, 2 s on one).
_TSNE_ONE_THREAD_ROWS = 1_000
_SEED = 0
_PLACE_TEMPERATURE = 0.05  # the cosine gap that weighs a neighbour e times less than the nearest on the map


class IndexModelMismatch(DataError):
    """Query embeddings come from another model than the index's."""


class IndexFileError(DataError):
    """An index file is missing or unreadable."""


@dataclass(frozen=True)
class Hit:
    """One search result: 1-based ``rank``, cosine ``score`` and the gallery item's metadata
    (``pid`` / ``camid`` None where the gallery does not give them)."""

    rank: int
    score: float
    path: str
    pid: int | None
    camid: int | None


def _field(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def foreign_index(folder: Path) -> str | None:
    """Why ``folder`` is not an index that :func:`build_index` wrote (None when it is one).

    An index holds ``meta.json`` with ``"kind": "twinview-reid-index"`` (older ones: ``index.faiss`` and
    a ``meta.json`` with the index keys), at most ``index.faiss`` and ``map.npy`` besides, and nothing
    else: replacing it must not delete other files."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except FileNotFoundError:
        return f"no {META_FILE}"
    except (OSError, UnicodeDecodeError, ValueError):
        return f"its {META_FILE} is unreadable"
    if not isinstance(meta, dict):
        return f"its {META_FILE} is not an index's"
    if meta.get("kind") != INDEX_KIND and not (all(k in meta for k in _META_KEYS)
                                               and (folder / INDEX_FILE).is_file()):
        return f"its {META_FILE} is not an index's"
    others = sorted(p.name for p in folder.iterdir() if p.name not in (INDEX_FILE, META_FILE, MAP_FILE))
    if others:
        more = f" and {len(others) - 1} more" if others[1:] else ""
        return f"it also holds {display_path(others[0])}{more}"
    return None


def _faiss_index(feats: np.ndarray) -> tuple[faiss.Index, str, dict[str, int]]:
    """The index for L2-normalised ``feats``, its type and parameters: exact below
    :data:`APPROX_MIN_ROWS` rows, HNSW above."""
    dim = feats.shape[1]
    if len(feats) < APPROX_MIN_ROWS:
        index, kind, params = faiss.IndexFlatIP(dim), FLAT, {}
    else:
        params = dict(HNSW_PARAMS)
        index, kind = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT), HNSW
        index.hnsw.efConstruction = params["efConstruction"]
        index.hnsw.efSearch = params["efSearch"]
    index.add(feats)
    return index, kind, params


def embedding_map(feats: np.ndarray) -> tuple[np.ndarray, str]:
    """An (N, 2) float32 map of the rows of ``feats`` and its method (``"tsne"`` or ``"pca"``), centred
    and scaled to unit RMS radius so that maps of either method plot alike. Fixed seeds: the same
    gallery gives the same map. scikit-learn is imported here, not at the top: loading and searching
    an index does not need it."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(feats)
    if _TSNE_MIN_ROWS <= n <= TSNE_MAX_ROWS:
        tsne = TSNE(2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=_SEED)
        with threadpool_limits(1 if n <= _TSNE_ONE_THREAD_ROWS else None):
            xy, method = tsne.fit_transform(feats), "tsne"
    else:
        parts = min(2, n, feats.shape[1])
        xy = np.zeros((n, 2))
        if n > 1:
            xy[:, :parts] = PCA(parts, random_state=_SEED).fit_transform(feats)
        method = "pca"
    xy = xy - xy.mean(0)
    radius = float(np.sqrt((xy ** 2).sum(1).mean()))
    return (xy / radius if radius > 0 else xy).astype(np.float32), method


def build_index(features: np.ndarray, records: Sequence[Any], model_id: str, out: Path,
                extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the index folder ``out`` for ``features`` (N, D) and their ``records`` (mappings or
    objects with ``path``, ``pid``, ``camid``, e.g. ``PersonRecord``; ``pid`` / ``camid`` may be None).
    ``extra`` adds plain JSON values to ``meta.json`` (the model file and crop size, for queries).

    An existing ``out`` is replaced only when it is an earlier index (:func:`foreign_index`) and
    ``overwrite`` is on; an existing file, or a non-empty folder that is no index, is an ``OutputError``
    and left untouched (also with ``overwrite``).

    Rows are L2-normalised here (a no-op for already normalised embeddings). The folder is written as a
    temporary sibling and renamed into place (an existing index is first renamed aside, then deleted: a
    directory cannot be renamed over a non-empty one); on any error the temporary folder is removed and
    ``out`` is left as it was. Returns ``out``.
    """
    feats = np.array(features, dtype=np.float32, order="C")
    if feats.ndim != 2 or len(feats) != len(records) or len(feats) == 0 or not np.isfinite(feats).all():
        raise ValueError(f"build_index: need finite (N, D) features, N = {len(records)} records >= 1, "
                         f"got shape {feats.shape}")
    faiss.normalize_L2(feats)
    out = Path(os.path.abspath(out))
    check_output(out, kind="re-ID index", foreign=foreign_index, overwrite=overwrite)
    index, index_type, params = _faiss_index(feats)
    xy, map_method = embedding_map(feats)
    meta = {"model_id": model_id, "dim": int(feats.shape[1]), "count": len(feats), "metric": METRIC,
            "paths": [str(_field(r, "path")) for r in records],
            "pids": [_optional_int(_field(r, "pid")) for r in records],
            "camids": [_optional_int(_field(r, "camid")) for r in records],
            "index_type": index_type, "index_params": params, "map_method": map_method,
            "twinview_version": twinview_version(), **(extra or {}), "kind": INDEX_KIND}
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = out.with_name(f".{out.name}.tmp-{tag}"), out.with_name(f".{out.name}.old-{tag}")
    try:
        tmp.mkdir()
        faiss.write_index(index, str(tmp / INDEX_FILE))
        np.save(tmp / MAP_FILE, xy)
        (tmp / META_FILE).write_text(json.dumps(meta) + "\n")
        if os.path.lexists(out):
            os.replace(out, old)  # a non-empty folder cannot be renamed over: move the old one aside
        os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


@contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """Run faiss on ``n`` OpenMP threads inside the block (the setting is per calling thread)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class RetrievalIndex:
    """A loaded index: ``search`` returns the ``k`` most similar gallery items per query, ``map`` and
    ``place`` put the gallery and queries on a 2-D map."""

    def __init__(self, path: Path, index: faiss.Index, meta: dict[str, Any], xy: np.ndarray | None = None):
        self.path, self.index, self.meta = path, index, meta
        self.model_id: str = meta["model_id"]
        self.dim: int = meta["dim"]
        self._map = xy

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def map(self) -> np.ndarray | None:
        """The (N, 2) embedding map of the gallery rows; None for older indexes written without one."""
        return self._map

    def check_model(self, model_id: str) -> None:
        """``IndexModelMismatch`` unless the queries' ``model_id`` is the index's."""
        if model_id != self.model_id:
            raise IndexModelMismatch(self.path, f"index built with model {self.model_id!r}, queries come "
                                                f"from model {model_id!r}; rebuild the index")

    def _search(self, query_feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.array(query_feats, dtype=np.float32, order="C")
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"index {self.path}: queries must be (M, {self.dim}), got shape {q.shape}")
        if k < 1:
            raise ValueError(f"index {self.path}: k must be >= 1, got {k}")
        faiss.normalize_L2(q)
        if len(q) <= ONE_THREAD_MAX_QUERIES:
            with faiss_threads(1):
                return self.index.search(q, min(k, len(self)))
        return self.index.search(q, min(k, len(self)))

    def search(self, query_feats: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-``k`` hits (``k`` capped at the index size) for each row of ``query_feats`` (M, D),
        by cosine similarity (queries are L2-normalised here)."""
        scores, ids = self._search(query_feats, k)
        m = self.meta
        return [[Hit(rank + 1, float(s), m["paths"][i], m["pids"][i], m["camids"][i])
                 for rank, (s, i) in enumerate(zip(row_s, row_i, strict=True)) if i >= 0]  # -1: none found
                for row_s, row_i in zip(scores, ids, strict=True)]

    def place(self, query_feats: np.ndarray, k: int = 5) -> np.ndarray:
        """(M, 2) positions of the queries on :attr:`map`: the mean of the map points of each query's
        top-``k`` gallery neighbours, weighted by a softmax of their cosine similarity (near neighbours'
        cosines are all close to 1, so plain weights would barely favour the nearest).
        ``IndexFileError`` for an older index without a map."""
        if self._map is None:
            raise IndexFileError(self.path / MAP_FILE, "this index has no embedding map (written by an older "
                                                       "twinview): rebuild it with --overwrite")
        scores, ids = self._search(query_feats, k)
        found = ids >= 0
        gaps = np.where(found, scores - scores[:, :1], 0.0)  # a missing neighbour's score is -FLT_MAX
        weights = np.where(found, np.exp(gaps / _PLACE_TEMPERATURE), 0.0)
        points = self._map[np.where(found, ids, 0)]
        return ((weights[..., None] * points).sum(1) / weights.sum(1, keepdims=True)).astype(np.float32)


def _read_map(file: Path, count: int) -> np.ndarray | None:
    """The index's ``map.npy`` as (count, 2) float32; None when the index has none."""
    if not file.exists():
        return None
    try:
        xy = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise IndexFileError(file, f"index file {MAP_FILE} is not a numpy array: {err}") from err
    if xy.shape != (count, 2) or not np.issubdtype(xy.dtype, np.floating) or not np.isfinite(xy).all():
        raise IndexFileError(file, f"index file {MAP_FILE} holds a {xy.dtype} array of shape {xy.shape}, "
                                   f"need finite ({count}, 2) floats")
    return xy.astype(np.float32)


def load_index(path: Path) -> RetrievalIndex:
    """Read an index folder written by :func:`build_index`; ``IndexFileError`` names a missing,
    unreadable or inconsistent file."""
    path = Path(path)
    if is_link_loop(path):
        raise IndexFileError(path, "symbolic link loop; no index there")
    if not path.is_dir():
        raise IndexFileError(path, "no such index folder" if not path.exists() else
                             "a file, not an index folder (`twinview reid index` writes one)")
    meta_file, index_file = path / META_FILE, path / INDEX_FILE
    for file in (meta_file, index_file):
        if not file.is_file():
            raise IndexFileError(file, f"index file {file.name} is missing: not an index folder "
                                       "(`twinview reid index` writes one)")
    try:
        meta = json.loads(meta_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IndexFileError(meta_file, f"index file {META_FILE} is not valid JSON: {err}") from err
    missing = [key for key in _META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise IndexFileError(meta_file, f"index file {META_FILE} lacks {missing}")
    try:
        index = faiss.read_index(str(index_file))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise IndexFileError(index_file, f"index file {INDEX_FILE} is not a faiss index: {first}") from err
    counts = {len(meta[key]) for key in ("paths", "pids", "camids")} | {meta["count"], index.ntotal}
    if len(counts) != 1 or index.d != meta["dim"]:
        raise IndexFileError(index_file, f"index file {INDEX_FILE} holds {index.ntotal} x {index.d} vectors, "
                                         f"{META_FILE} describes {meta['count']} x {meta['dim']}")
    index_type = meta.get("index_type", FLAT)
    if type(index).__name__ != index_type:
        raise IndexFileError(index_file, f"index file {INDEX_FILE} holds a {type(index).__name__}, "
                                         f"{META_FILE} describes a {index_type}")
    space = faiss.ParameterSpace()
    for name, value in meta.get("index_params", {}).items():
        if name in _SEARCH_PARAMS:
            space.set_index_parameter(index, name, value)
    return RetrievalIndex(path, index, meta, _read_map(path / MAP_FILE, index.ntotal))
