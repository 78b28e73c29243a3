"""A faiss retrieval index of gallery embeddings, stored as a folder with its metadata.

Layout of ``out/``: ``index.faiss`` (``faiss.IndexFlatIP`` over L2-normalised features: the score is
the cosine similarity, exact search) and ``meta.json`` (``model_id``, ``dim``, ``count``, ``metric``,
``paths``, ``pids``, ``camids``, ``twinview_version``, ``kind`` = ``"twinview-reid-index"``). The folder is
written under a temporary sibling name and renamed into place, so readers never see a half-written index.
An existing path is replaced only when it is an earlier index (with ``overwrite``), never a folder or file
twinview did not write. ``model_id`` (e.g.
:func:`model_fingerprint` of the encoder's weights) guards against querying with embeddings of
another model: :meth:`RetrievalIndex.check_model`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from twinview.errors import DataError, check_output, display_path
from twinview.provenance import twinview_version

INDEX_FILE, META_FILE = "index.faiss", "meta.json"
INDEX_KIND = "twinview-reid-index"  # meta.json's "kind": marks a folder that build_index wrote
METRIC = "cosine"
_META_KEYS = ("model_id", "dim", "count", "metric", "paths", "pids", "camids")


class IndexModelMismatch(DataError):
    """Query embeddings come from another model than the index's."""


class IndexFileError(DataError):
    """An index file is missing or unreadable."""


@dataclass(frozen=True)
class Hit:
    """One search result: 1-based ``rank``, cosine ``score`` and the gallery item's metadata."""

    rank: int
    score: float
    path: str
    pid: int
    camid: int


def model_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """First 16 hex digits of a SHA-256 over the sorted keys, each with its tensor's dtype, shape and
    bytes: equal for equal weights, whatever the device or the dict order."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model_fingerprint: {key!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        digest.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _field(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def foreign_index(folder: Path) -> str | None:
    """Why ``folder`` is not an index that :func:`build_index` wrote (None when it is one).

    An index holds ``meta.json`` with ``"kind": "twinview-reid-index"`` (older ones: ``index.faiss`` and
    a ``meta.json`` with the index keys) and nothing else: replacing it must not delete other files."""
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
    others = sorted(p.name for p in folder.iterdir() if p.name not in (INDEX_FILE, META_FILE))
    if others:
        more = f" and {len(others) - 1} more" if others[1:] else ""
        return f"it also holds {display_path(others[0])}{more}"
    return None


def build_index(features: np.ndarray, records: Sequence[Any], model_id: str, out: Path,
                extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the index folder ``out`` for ``features`` (N, D) and their ``records`` (mappings or
    objects with ``path``, ``pid``, ``camid``, e.g. ``PersonRecord``). ``extra`` adds plain JSON values
    to ``meta.json`` (the model file and crop size, for queries).

    An existing ``out`` is replaced only when it is an earlier index (:func:`foreign_index`) and
    ``overwrite`` is on; an existing file, or a non-empty folder that is no index, is an ``OutputError``
    and left untouched (also with ``overwrite``).

    Rows are L2-normalised here (a no-op for :func:`downstream.reid.model.embed` output). The folder
    is written as a temporary sibling and renamed into place (an existing index is first renamed
    aside, then deleted: a directory cannot be renamed over a non-empty one); on any error the
    temporary folder is removed and ``out`` is left as it was. Returns ``out``.
    """
    feats = np.array(features, dtype=np.float32, order="C")
    if feats.ndim != 2 or len(feats) != len(records) or len(feats) == 0 or not np.isfinite(feats).all():
        raise ValueError(f"build_index: need finite (N, D) features, N = {len(records)} records >= 1, "
                         f"got shape {feats.shape}")
    faiss.normalize_L2(feats)
    meta = {"model_id": model_id, "dim": int(feats.shape[1]), "count": len(feats), "metric": METRIC,
            "paths": [str(_field(r, "path")) for r in records],
            "pids": [int(_field(r, "pid")) for r in records],
            "camids": [int(_field(r, "camid")) for r in records], "twinview_version": twinview_version(),
            **(extra or {}), "kind": INDEX_KIND}
    out = Path(os.path.abspath(out))
    check_output(out, kind="re-ID index", foreign=foreign_index, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = out.with_name(f".{out.name}.tmp-{tag}"), out.with_name(f".{out.name}.old-{tag}")
    try:
        tmp.mkdir()
        index = faiss.IndexFlatIP(feats.shape[1])
        index.add(feats)
        faiss.write_index(index, str(tmp / INDEX_FILE))
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


class RetrievalIndex:
    """A loaded index: ``search`` returns the ``k`` most similar gallery items per query."""

    def __init__(self, path: Path, index: faiss.Index, meta: dict[str, Any]):
        self.path, self.index, self.meta = path, index, meta
        self.model_id: str = meta["model_id"]
        self.dim: int = meta["dim"]

    def __len__(self) -> int:
        return self.index.ntotal

    def check_model(self, model_id: str) -> None:
        """``IndexModelMismatch`` unless the queries' ``model_id`` is the index's."""
        if model_id != self.model_id:
            raise IndexModelMismatch(self.path, f"index built with model {self.model_id!r}, queries come "
                                                f"from model {model_id!r}; rebuild the index")

    def search(self, query_feats: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-``k`` hits (``k`` capped at the index size) for each row of ``query_feats`` (M, D),
        by cosine similarity (queries are L2-normalised here)."""
        q = np.array(query_feats, dtype=np.float32, order="C")
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"index {self.path}: queries must be (M, {self.dim}), got shape {q.shape}")
        if k < 1:
            raise ValueError(f"index {self.path}: k must be >= 1, got {k}")
        faiss.normalize_L2(q)
        scores, ids = self.index.search(q, min(k, len(self)))
        m = self.meta
        return [[Hit(rank + 1, float(s), m["paths"][i], m["pids"][i], m["camids"][i])
                 for rank, (s, i) in enumerate(zip(row_s, row_i, strict=True))]
                for row_s, row_i in zip(scores, ids, strict=True)]


def load_index(path: Path) -> RetrievalIndex:
    """Read an index folder written by :func:`build_index`; ``IndexFileError`` names a missing,
    unreadable or inconsistent file."""
    from twinview.errors import is_link_loop

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
    return RetrievalIndex(path, index, meta)
