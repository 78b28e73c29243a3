"""The model card (``model.json``) of a re-ID network, written beside its ``model.pt``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twinview.model_card import CARD_FILE, SCHEMA_ID, file_sha256, write_card
from twinview.provenance import twinview_version


def reid_card(meta: dict[str, Any], embedding_size: int, weights: Path) -> Path:
    """Describe ``weights`` (a ``model.pt``) from its ``model_config`` ``meta``."""
    card = {"schema": SCHEMA_ID, "twinview_version": twinview_version(), "task": "reid",
            "architecture": {"name": "reid_bnneck", "encoder": meta["encoder"],
                             "last_stride": meta["last_stride"], "pooling": meta["pooling"],
                             "num_classes": meta["num_classes"]},
            "spatial_dims": 2, "in_channels": 3, "input_size": list(meta["size"]), "patch_size": None,
            "preprocessing": meta["preprocessing"], "labels": None, "embedding_size": embedding_size,
            "pretraining_method": meta.get("pretraining_method"), "data": meta.get("data"),
            "weights": {"file": weights.name, "sha256": file_sha256(weights)}}
    return write_card(card, weights.parent / CARD_FILE)
