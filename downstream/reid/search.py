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
from twinview.errors import DataError, check_output, display_path, missing_path
from twinview.index import Hit, build_index, foreign_index, load_index


def gallery_records(folder: Path) -> list:
    """Records of a Market-1501-style folder (names ``PPPP_cCsS_FFFFFF_BB.jpg``; junk ``-1`` left out).

    A name that does not parse is a ``DataError`` naming the file; an empty, missing or looping (symbolic
    link loop) folder is one naming it.
    """
    from twinview.data.market1501 import person_record, split_files

    if not Path(folder).is_dir():
        raise missing_path(folder, "no such folder" if not Path(folder).exists() else "not a folder")
    records = [person_record(p, "bounding_box_test") for p in split_files(folder)]
    records = [r for r in records if r is not None]
    if not records:
        raise DataError(folder, "no images to index")
    return records


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
    """Embed the crops of ``gallery`` with the model at ``model_path`` into the index folder ``out``;
    returns ``{"index", "count", "dim", "model_id"}`` (what the command prints).

    ``out`` must not be, contain or lie inside the gallery (or be or contain the model file), and an
    existing ``out`` must be an earlier index, replaced only with ``overwrite``: else ``OutputError``,
    raised before any model is loaded (see :func:`twinview.index.build_index`)."""
    gallery, out = Path(gallery), Path(out)
    records = gallery_records(gallery)
    model_file = _model_path(model_path)
    check_output(out, [gallery, model_file], kind="re-ID index", foreign=foreign_index, overwrite=overwrite)
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
