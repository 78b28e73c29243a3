"""The model card (``model.json``) of a segmentation network, written beside its ``model.pt``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twinview.model_card import CARD_FILE, SCHEMA_ID, file_sha256, write_card
from twinview.provenance import twinview_version


def seg_card(meta: dict[str, Any], weights: Path) -> Path:
    """Describe ``weights`` (a ``model.pt``) from its ``model_config`` ``meta``."""
    card = {"schema": SCHEMA_ID, "twinview_version": twinview_version(), "task": "segmentation",
            "architecture": {"name": meta["arch"], "encoder": meta["encoder"],
                             "unet_channels": list(meta["unet_channels"]),
                             "out_channels": meta["out_channels"]},
            "spatial_dims": meta["spatial_dims"], "in_channels": meta["in_channels"], "input_size": None,
            "patch_size": list(meta["roi"]), "preprocessing": meta["preprocessing"], "labels": meta["labels"],
            "embedding_size": None, "pretraining_method": meta.get("pretraining_method"),
            "data": {"name": meta["task"], "kind": meta["kind"], "modality": meta["modality"]},
            "weights": {"file": weights.name, "sha256": file_sha256(weights)}}
    return write_card(card, weights.parent / CARD_FILE)
