"""``twinview reid index`` and ``twinview reid query``: a gallery embedded into a faiss index.

The index folder records the model's fingerprint (a hash of its weights), the model file and the crop
size. A query embeds the image with that model and refuses to run when the model's weights no longer
match the fingerprint (``IndexModelMismatch``), so embeddings of two models are never compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from downstream.reid.evaluate import extract, load_reid_model
from twinview.data.records import PersonRecord
from twinview.errors import DataError, check_output, display_path, missing_path
from twinview.index import Hit, build_index, foreign_index, load_index


def gallery_records(gallery: Path) -> list[PersonRecord]:
    """The crops to index: a folder of images (ids and cameras from Market-1501 names when every name is
    one, else none) or a CSV ``path,person_id[,camera]`` (:mod:`twinview.data.person_folder`).

    A DataError names a missing, empty or looping (symbolic link loop) folder or CSV, a folder mixing
    Market-1501 names with others (naming the odd file), and each bad CSV line.
    """
    from twinview.data.person_folder import read_person_source

    return read_person_source(gallery)


def _model_path(path: Path) -> Path:
    """The file that :func:`load_reid_model` reads for ``path``; ``DataError`` naming a missing one."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt" if (path / "model.pt").exists() else path / "encoder.pt"
    if not path.is_file():
        raise missing_path(path, "no such model: give a re-ID run folder or its model.pt, or a pretraining "
                                 "run folder or its encoder.pt")
    return path


def index_gallery(gallery: Path, model_path: Path, out: Path, device: str = "cpu", flip: bool = True,
                  batch_size: int = 128, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Embed the crops of ``gallery`` (:func:`gallery_records`) with the model at ``model_path`` into the
    index folder ``out``, with their person ids and cameras where known (else None); returns
    ``{"index", "count", "dim", "model_id"}`` (what the command prints). An unreadable image is a
    DataError naming it, and nothing is written.

    ``out`` must not be, contain or lie inside the gallery or a folder holding its images (or be or
    contain the model file), and an existing ``out`` must be an earlier index, replaced only with
    ``overwrite``: else ``OutputError``, raised before any model is loaded (see
    :func:`twinview.index.build_index`)."""
    gallery, out = Path(gallery), Path(out)
    records = gallery_records(gallery)
    model_file = _model_path(model_path)
    folders = sorted({r.path.parent for r in records})  # a CSV's images may lie outside its folder
    check_output(out, [gallery, *folders, model_file], kind="re-ID index", foreign=foreign_index,
                 overwrite=overwrite)
    dev = torch.device(device)
    model, meta = load_reid_model(model_file, dev)
    feats = extract(model, [r.path for r in records], meta["size"], dev, batch_size, flip, progress, "index")
    extra = {"model_path": str(model_file.resolve()), "size": meta["size"], "flip": flip}
    written = build_index(feats, records, meta["model_id"], out, extra=extra, overwrite=overwrite)
    return {"index": display_path(written), "count": len(records), "dim": int(feats.shape[1]),
            "model_id": meta["model_id"]}


def query_index(index_dir: Path, image: Path, k: int = 10, model_path: Path | None = None,
                device: str = "cpu") -> list[Hit]:
    """The ``k`` gallery crops most similar to ``image``; the model is the index's own unless given."""
    from twinview.data.images import load_image

    if k < 1:
        raise DataError(None, f"-k must be a whole number >= 1 (the number of hits to show), got {k!r}")
    index = load_index(Path(index_dir))
    load_image(image)  # a clear DataError for an unreadable image before the model is loaded
    model, meta = load_reid_model(_model_path(model_path or index.meta["model_path"]), torch.device(device))
    index.check_model(meta["model_id"])
    feats = extract(model, [Path(image)], index.meta["size"], torch.device(device), 1, index.meta["flip"])
    return index.search(feats, k)[0]
