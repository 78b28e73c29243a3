"""The model card (``model.json``) of a pretrained encoder, written beside its ``encoder.pt``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twinview.model_card import CARD_FILE, SCHEMA_ID, file_sha256, write_card
from twinview.provenance import twinview_version


def encoder_card(meta: dict[str, Any], embedding_size: int, weights: Path) -> Path:
    """Describe ``weights`` (an ``encoder.pt``) from its ``encoder_config`` ``meta``."""
    card = {"schema": SCHEMA_ID, "twinview_version": twinview_version(), "task": "pretraining",
            "architecture": {"name": meta["name"], "small_stem": meta["small_stem"]},
            "spatial_dims": meta["spatial_dims"], "in_channels": meta["in_channels"],
            "input_size": list(meta["size"]), "patch_size": None, "preprocessing": meta["preprocessing"],
            "labels": None, "embedding_size": embedding_size, "pretraining_method": meta["method"],
            "data": None, "weights": {"file": weights.name, "sha256": file_sha256(weights)}}
    return write_card(card, weights.parent / CARD_FILE)
