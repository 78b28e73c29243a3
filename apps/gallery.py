"""The retrieval app's library: a person gallery in a faiss index, queried with an exported ONNX model.

A :class:`Gallery` opens a saved index folder (``twinview reid index``, or one this module cached), any
folder of images, or a CSV ``path,person_id[,camera]`` (the rules of :mod:`twinview.data.person_folder`,
as on the command line); images are embedded with the model into an index in a cache folder (never
inside the image folder). A Market-1501 root gives the gallery ``bounding_box_test/`` and the query set
``query/``, with identities and cameras from the file names; so does a ``bounding_box_test/`` folder or
an index made from one, when ``query/`` lies beside it. A CSV gives identities (and cameras when it has
the column) shown beside the hits; other folders have no identities. Without a query set, uploaded
images are the queries.
Numpy, onnxruntime, faiss and matplotlib only (no torch, no Streamlit), so tests drive it directly.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from apps import uploads
from apps.runtime import OnnxModel, embed
from twinview.data.images import load_image
from twinview.data.market1501 import GALLERY, QUERY, person_record, read_split, split_files
from twinview.data.person_folder import read_person_source
from twinview.errors import DataError, check_output, display_path, missing_path
from twinview.index import INDEX_FILE, META_FILE, Hit, IndexFileError, RetrievalIndex, build_index, load_index
from twinview.retrieval import RetrievalScores, market1501_scores, pairwise_distance

DEFAULT_MAX_UPLOAD_MB = 20.0
MAX_UPLOAD_PIXELS = 40_000_000
"""A small compressed file can decode to a huge image; person crops are far below this."""
CACHE_ROOT = Path(tempfile.gettempdir()) / "twinview-galleries"
"""Where folders of images are indexed (one ``<model id>-<folder hash>`` folder each) unless told."""
BATCH_SIZE = 32
PLACE_NEIGHBOURS = 5
TRUE_MATCH, OTHER_ID, SAME_CAMERA = "true match", "other identity", "same camera"
FRAME_COLOURS = {TRUE_MATCH: (40, 170, 60), OTHER_ID: (210, 50, 40), SAME_CAMERA: (150, 150, 150)}


# --------------------------------------------------------------------------- model and images


def load_model(path: str | os.PathLike[str]) -> OnnxModel:
    """An exported model that embeds person crops; a DataError names a missing file, one without a model
    card, or a model of another task."""
    path = Path(path)
    if not path.is_file():
        raise missing_path(path, "no such model file: export one with `twinview export RUN --out model.onnx`")
    model = OnnxModel(path)
    if model.task not in ("reid", "pretraining") or model.card["spatial_dims"] != 2:
        raise DataError(path, f"a {model.card['spatial_dims']}D {model.task} model does not embed person "
                              "crops: give a re-ID model or a 2D pretrained encoder (`twinview export`)")
    return model


def model_id(model: OnnxModel) -> str:
    """The identity an index records for its model: the export's fingerprint of the weights, or (files
    exported before it was recorded) the sha256 of the weights file."""
    return model.card["export"].get("model_id") or model.card["weights"]["sha256"]


def rgb8(array: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 image from ``load_image``'s (H, W, 1 or 3) uint8 or 16-bit grey array."""
    if array.dtype == np.uint16:
        array = np.round(array / 257.0).astype(np.uint8)
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """The image file as (H, W, 3) uint8; DataError naming an unreadable file."""
    return rgb8(load_image(path))


def max_upload_bytes() -> int:
    """This app's upload cap in bytes (default 20 MB)."""
    return uploads.max_upload_bytes(DEFAULT_MAX_UPLOAD_MB)


def decode_upload(data: bytes, name: str = "upload") -> np.ndarray:
    """An uploaded PNG or JPEG as (H, W, 3) uint8. The size cap is checked here, since Streamlit's own
    limit is not applied everywhere (tests, other servers); a DataError names the upload for a file over
    the cap, one that is no image or another format, and a corrupt or truncated one."""
    uploads.check_upload_size(name, len(data), DEFAULT_MAX_UPLOAD_MB)
    if not data:
        raise DataError(name, "empty file: upload a PNG or JPEG image")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DataError(name, "not an image: upload a PNG or JPEG") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise DataError(name, f"corrupt or oversized image ({display_path(str(err))})") from None
    if image.format not in ("PNG", "JPEG"):
        raise DataError(name, f"a {image.format} image: upload a PNG or JPEG")
    if image.width * image.height > MAX_UPLOAD_PIXELS:
        raise DataError(name, f"{image.width} x {image.height} pixels is over the cap of "
                              f"{MAX_UPLOAD_PIXELS:,} pixels")
    try:
        image.load()
        if image.mode.startswith("I"):  # 16-bit grey PNG
            return rgb8(np.asarray(image, dtype=np.uint16)[..., None])
        return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as err:
        raise DataError(name, f"corrupt or truncated image ({display_path(str(err))})") from None


def framed(image: np.ndarray, colour: tuple[int, int, int] | None, width: int = 4) -> np.ndarray:
    """``image`` (H, W, 3) uint8 inside a border of ``colour`` (None: unchanged)."""
    if colour is None:
        return image
    out = np.pad(image, ((width, width), (width, width), (0, 0)))
    out[:width], out[-width:], out[:, :width], out[:, -width:] = colour, colour, colour, colour
    return out


# --------------------------------------------------------------------------- queries and results


@dataclass(frozen=True)
class Entry:
    """A gallery or query image: its path and, when the name tells them, identity and camera."""

    path: Path
    pid: int | None
    camid: int | None


@dataclass(frozen=True)
class Query:
    """A query ready to search: its name, image (H, W, 3) uint8, embedding (D,) and known ids."""

    name: str
    image: np.ndarray
    feature: np.ndarray
    pid: int | None = None
    camid: int | None = None


@dataclass(frozen=True)
class SearchResult:
    """The top-``k`` hits of a query; only those with cosine similarity >= ``threshold`` are matches."""

    query: Query
    hits: list[Hit]
    threshold: float

    @property
    def matches(self) -> list[Hit]:
        return [h for h in self.hits if h.score >= self.threshold]

    @property
    def message(self) -> str | None:
        """What to say when no hit reaches the threshold (None when one does)."""
        if self.matches:
            return None
        best = f" (best similarity {self.hits[0].score:.3f})" if self.hits else ""
        return f"no match above {self.threshold:.2f}{best}"

    def verdict(self, hit: Hit) -> str | None:
        """Under the Market-1501 protocol: a true match (same identity, other camera), a same-camera
        image of the query's identity (ignored by the protocol), another identity; None without ids."""
        q = self.query
        if None in (q.pid, q.camid, hit.pid, hit.camid):
            return None
        if hit.pid != q.pid:
            return OTHER_ID
        return SAME_CAMERA if hit.camid == q.camid else TRUE_MATCH


# --------------------------------------------------------------------------- the gallery


class Gallery:
    """A searchable gallery: its index, the model that embeds queries like the gallery (with the
    index's flip setting), and the query set (empty when there is none)."""

    def __init__(self, index: RetrievalIndex, model: OnnxModel, flip: bool, queries: Sequence[Entry],
                 source: Path) -> None:
        self.index, self.model, self.flip = index, model, flip
        self.queries, self.source = list(queries), source
        self._query_feats: np.ndarray | None = None
        self._scores: RetrievalScores | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], model: OnnxModel, cache: Path | None = None,
             flip: bool = True) -> Gallery:
        """The gallery at ``path``: an index folder, a Market-1501 root, a folder of images or a CSV
        ``path,person_id[,camera]`` (read by :func:`twinview.data.person_folder.read_person_source`;
        images are embedded into ``cache``, default :data:`CACHE_ROOT`, with ``flip`` test-time
        augmentation, and an earlier index of the same model, files and ids there is reused).
        ``IndexModelMismatch`` for an index of another model; a DataError for a missing or empty folder,
        a bad CSV row, a folder mixing Market-1501 names with others, or an unreadable image."""
        path = Path(path)
        if path.is_dir() and ((path / META_FILE).exists() or (path / INDEX_FILE).exists()):
            index = load_index(path)
            index.check_model(model_id(model))
            gallery_dir = _common_parent(index.meta["paths"])
            queries = _sibling_queries(gallery_dir) if None not in index.meta["pids"] else []
            return cls(index, model, bool(index.meta.get("flip", True)), queries, path)
        if path.is_dir() and (path / GALLERY).is_dir() and (path / QUERY).is_dir():
            files = split_files(path / GALLERY)
            entries = _entries([person_record(p, GALLERY) for p in files], path / GALLERY)
            queries = [Entry(r.path, r.pid, r.camid) for r in read_split(path, QUERY)]
        else:
            entries = [Entry(r.path, r.pid, r.camid) for r in read_person_source(path, GALLERY)]
            market = path.is_dir() and entries[0].camid is not None  # ids from Market-1501 names
            queries = _sibling_queries(path) if market else []
        index = _cached_index(entries, path, model, flip, cache or CACHE_ROOT)
        return cls(index, model, flip, queries, path)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def ids_known(self) -> bool:
        """Whether every gallery item has an identity (from Market-1501 names or a CSV)."""
        return None not in self.index.meta["pids"]

    @property
    def cameras_known(self) -> bool:
        """Whether every gallery item has a camera too (needed for the Market-1501 protocol)."""
        return self.ids_known and None not in self.index.meta["camids"]

    def describe(self) -> str:
        """One line for the page: size, where the index lives, ids, queries."""
        ids = (("identities and cameras" if self.cameras_known else "identities, no cameras")
               if self.ids_known else "no identities")
        queries = f"{len(self.queries)} queries" if self.queries else "no query set (upload one)"
        return (f"{len(self)} gallery images, {ids}, {queries}; index {display_path(self.index.path)}"
                f"{', flip-averaged embeddings' if self.flip else ''}")

    def _embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return embed(self.model, images, flip=self.flip)

    def query_features(self) -> np.ndarray:
        """(Q, D) embeddings of the whole query set, computed once."""
        if self._query_feats is None:
            self._query_feats = _embed_files(self.model, [e.path for e in self.queries], self.flip)
        return self._query_feats

    def query(self, i: int) -> Query:
        """Query ``i`` of the query set."""
        entry = self.queries[i]
        image = read_rgb(entry.path)
        feature = self._query_feats[i] if self._query_feats is not None else self._embed([image])[0]
        return Query(entry.path.name, image, feature, entry.pid, entry.camid)

    def upload(self, data: bytes, name: str = "upload") -> Query:
        """An uploaded image as a query (no identity); DataError for a bad upload (:func:`decode_upload`)."""
        image = decode_upload(data, name)
        return Query(name, image, self._embed([image])[0])

    def search(self, query: Query, k: int = 10, threshold: float = 0.0) -> SearchResult:
        """The ``k`` most similar gallery images (capped at the gallery size) by cosine similarity."""
        return SearchResult(query, self.index.search(query.feature[None], k)[0], threshold)

    def gallery_features(self) -> np.ndarray:
        """(N, D) stored gallery embeddings (exact for the flat index, the stored rows for HNSW)."""
        return self.index.index.reconstruct_n(0, len(self))

    def scores(self) -> RetrievalScores | None:
        """Rank-1 / mAP of the whole query set under the Market-1501 protocol (same identity and camera
        ignored), computed once; None without identities or a query set. DataError when no query has a
        true match in the gallery."""
        if not self.queries or not self.cameras_known:
            return None
        if self._scores is None:
            meta = self.index.meta
            dist = pairwise_distance(self.query_features(), self.gallery_features(), normalized=True)
            try:
                self._scores = market1501_scores(dist, [e.pid for e in self.queries], meta["pids"],
                                                 [e.camid for e in self.queries], meta["camids"])
            except ValueError as err:  # e.g. no query has a true match in this gallery
                reason = str(err).removeprefix("market1501_scores: ")
                raise DataError(self.source, f"no rank-1 / mAP: {reason}") from None
        return self._scores

    def map_figure(self, result: SearchResult) -> Any:
        """A matplotlib Figure of the index's embedding map: gallery points coloured by identity (grey
        without ids), the query as a star where its neighbours lie, its matches ringed. None when the
        index has no map (written by an older twinview)."""
        from matplotlib.figure import Figure

        xy = self.index.map
        if xy is None:
            return None
        fig = Figure(figsize=(6, 5), dpi=100)
        ax = fig.add_subplot()
        pids = self.index.meta["pids"]
        colours = _id_colours(pids) if self.ids_known else "0.6"
        ax.scatter(xy[:, 0], xy[:, 1], s=12, c=colours, alpha=0.7, linewidths=0)
        rows = {p: i for i, p in enumerate(self.index.meta["paths"])}
        for hit in result.matches:
            verdict = result.verdict(hit)
            colour = np.array(FRAME_COLOURS[verdict]) / 255 if verdict else "black"
            x, y = xy[rows[hit.path]]
            ax.scatter([x], [y], s=90, facecolors="none", edgecolors=[colour], linewidths=1.8)
            ax.annotate(str(hit.rank), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        qx, qy = self.index.place(result.query.feature[None], k=PLACE_NEIGHBOURS)[0]
        ax.scatter([qx], [qy], s=260, marker="*", c="gold", edgecolors="black", linewidths=1, zorder=5,
                   label="query")
        ax.set_xticks([])
        ax.set_yticks([])
        method = self.index.meta.get("map_method", "map")
        ax.set_title(f"gallery embeddings ({method}); star: the query, rings: its matches", fontsize=9)
        fig.tight_layout()
        return fig


# --------------------------------------------------------------------------- internals


def _id_colours(pids: Sequence[int]) -> np.ndarray:
    """RGBA per point: a tab20 colour per identity (20 colours, repeating), grey for distractors (pid 0)."""
    from matplotlib import colormaps

    codes = np.unique(pids, return_inverse=True)[1]
    colours = colormaps["tab20"](codes % 20)
    colours[np.asarray(pids) == 0] = (0.6, 0.6, 0.6, 1.0)
    return colours


def _entries(records: Sequence[Any], folder: Path) -> list[Entry]:
    """Entries of the kept Market-1501 records (the protocol drops junk as None)."""
    entries = [Entry(r.path, r.pid, r.camid) for r in records if r is not None]
    if not entries:
        raise DataError(folder, "no images (.jpg, .jpeg, .png) to search")
    return entries


def _common_parent(paths: Sequence[str]) -> Path | None:
    parents = {Path(p).parent for p in paths}
    return parents.pop() if len(parents) == 1 else None


def _sibling_queries(gallery_dir: Path | None) -> list[Entry]:
    """The ``query/`` folder beside a ``bounding_box_test/`` gallery, as entries; none elsewhere."""
    if gallery_dir is None or gallery_dir.name != GALLERY or not (gallery_dir.parent / QUERY).is_dir():
        return []
    return [Entry(r.path, r.pid, r.camid) for r in read_split(gallery_dir.parent, QUERY)]


def _embed_files(model: OnnxModel, paths: Sequence[Path], flip: bool) -> np.ndarray:
    """(N, D) embeddings of the image files, :data:`BATCH_SIZE` at a time (only a batch is decoded)."""
    feats = [embed(model, [read_rgb(p) for p in paths[i:i + BATCH_SIZE]], flip=flip)
             for i in range(0, len(paths), BATCH_SIZE)]
    return np.concatenate(feats).astype(np.float32)


def _folder_digest(entries: Sequence[Entry], flip: bool) -> str:
    """A hash of the files' paths, sizes, modification times and ids (and the flip setting): a changed
    file or a changed id in a CSV gives a new cache folder."""
    digest = hashlib.sha256(f"flip={flip}\0".encode())
    for entry in entries:
        stat = entry.path.stat()
        line = f"{entry.path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{entry.pid}\0{entry.camid}\0"
        digest.update(line.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _cached_index(entries: Sequence[Entry], source: Path, model: OnnxModel, flip: bool, cache: Path
                  ) -> RetrievalIndex:
    """The index of ``entries`` (listed by the folder or CSV ``source``) in ``cache/<model id>-<hash>``,
    embedded now unless an earlier one for the same model, files, ids and flip setting is there."""
    mid = model_id(model)
    entries = [Entry(e.path.resolve(), e.pid, e.camid) for e in entries]
    out = Path(cache) / f"{mid[:16]}-{_folder_digest(entries, flip)[:16]}"
    paths = [str(e.path) for e in entries]
    if out.is_dir():
        try:
            index = load_index(out)
            if (index.model_id == mid and index.meta["paths"] == paths and index.meta.get("flip") == flip
                    and index.meta["pids"] == [e.pid for e in entries]):
                return index
        except IndexFileError:
            pass  # a broken cache entry: written again below
    folder = source if source.is_dir() else source.parent
    check_output(out, [folder], kind="gallery index")  # never inside the user's image folder
    feats = _embed_files(model, [e.path for e in entries], flip)
    extra = {"source": str(source.resolve()), "model_path": str(model.path.resolve()), "flip": flip,
             "size": list(model.card["input_size"])}
    return load_index(build_index(feats, entries, mid, out, extra=extra, overwrite=True))
