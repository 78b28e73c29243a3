"""``twinview reid index`` and ``twinview reid query``: a gallery embedded into a faiss index.

The index folder records the model's fingerprint (a hash of its weights), the model file and the crop
size. A query embeds the image with that model and refuses to run when the model's weights no longer
match the fingerprint (``IndexModelMismatch``), so embeddings of two models are never compared.
"""

from __future__ import annotations

from pathlib import Path

import torch

from downstream.reid.evaluate import extract, load_reid_model
from downstream.reid.index import Hit, build_index, load_index
from twinview.data.errors import DataError


def gallery_records(folder: Path) -> list:
    """Records of a Market-1501-style folder (names ``PPPP_cCsS_FFFFFF_BB.jpg``; junk ``-1`` left out).

    A name that does not parse is a ``DataError`` naming the file; an empty folder is one naming it.
    """
    from twinview.data.market1501 import person_record, split_files

    records = [person_record(p, "bounding_box_test") for p in split_files(folder)]
    records = [r for r in records if r is not None]
    if not records:
        raise DataError(folder, "no images to index")
    return records


def index_gallery(gallery: Path, model_path: Path, out: Path, device: str = "cpu", flip: bool = True,
                  batch_size: int = 128, progress: bool = True) -> Path:
    dev = torch.device(device)
    model, meta = load_reid_model(model_path, dev)
    records = gallery_records(Path(gallery))
    feats = extract(model, [r.path for r in records], meta["size"], dev, batch_size, flip, progress, "index")
    extra = {"model_path": str(Path(model_path).resolve()), "size": meta["size"], "flip": flip}
    return build_index(feats, records, meta["model_id"], out, extra=extra)


def query_index(index_dir: Path, image: Path, k: int = 10, model_path: Path | None = None,
                device: str = "cpu") -> list[Hit]:
    """The ``k`` gallery crops most similar to ``image``; the model is the index's own unless given."""
    from twinview.data.images import load_image

    index = load_index(Path(index_dir))
    load_image(image)  # a clear DataError for an unreadable image before the model is loaded
    model, meta = load_reid_model(model_path or index.meta["model_path"], torch.device(device))
    index.check_model(meta["model_id"])
    feats = extract(model, [Path(image)], index.meta["size"], torch.device(device), 1, index.meta["flip"])
    return index.search(feats, k)[0]
