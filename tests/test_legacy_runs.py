"""Run folders from before the model card (``encoder.pt``/``model.pt``, no ``model.json``) still load."""

from __future__ import annotations

from pathlib import Path

import torch
from test_model_card import _old_preset_metadata

from downstream.reid.evaluate import load_reid_model
from downstream.reid.model import ReIDModel
from downstream.seg.config import SegModelConfig
from downstream.seg.evaluate import data_config_from, load_model
from downstream.seg.model import build_seg_model, load_pretrained_encoder
from engine.checkpoint import atomic_save
from pretrain.encoders import build_encoder
from twinview.model_card import card_from_metadata, file_sha256, validate_card

OLD_ENCODER = {"name": "resnet18", "in_channels": 3, "spatial_dims": 2, "small_stem": False,
               "method": "simclr", "preprocessing": _old_preset_metadata("reid", (64, 32), 2)}
OLD_SEG = {"arch": "flexunet", "encoder": "resnet18", "unet_channels": [32, 64, 128, 256, 512],
           "spatial_dims": 2, "in_channels": 1, "out_channels": 3,
           "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
           "task": "Hippocampus", "kind": "msd", "modality": "MRI", "encoder_weights": "",
           "preprocessing": {"orientation": "RAS", "spacing": None, "normalize": "zscore",
                             "ct_window": [-175.0, 250.0], "slice_axis": 2, "roi": [64, 64], "image_dims": 3}}


def test_an_old_encoder_loads_for_re_id_and_segmentation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", in_channels=3, spatial_dims=2, small_stem=False)
    atomic_save({"encoder": encoder.state_dict(), "encoder_config": OLD_ENCODER}, tmp_path / "encoder.pt")
    model, meta = load_reid_model(tmp_path)
    assert meta["size"] == [64, 32] and meta["preprocessing"]["intensity"]["kind"] == "mean_std"
    assert torch.equal(model.backbone.conv1.weight, encoder.conv1.weight)
    net = build_seg_model(SegModelConfig(encoder_weights=str(tmp_path)), 2, 3, 2)
    loaded = load_pretrained_encoder(net, SegModelConfig(encoder_weights=str(tmp_path)), 2, 3)
    assert loaded["method"] == "simclr"
    card = card_from_metadata(OLD_ENCODER, "encoder", "encoder.pt", file_sha256(tmp_path / "encoder.pt"))
    validate_card(card)
    assert card["input_size"] == [64, 32] and card["preprocessing"]["intensity"]["kind"] == "mean_std"


def test_old_segmentation_and_re_id_models_load_with_their_preprocessing(tmp_path: Path) -> None:
    net = build_seg_model(SegModelConfig(), 2, 1, 3)
    atomic_save({"model": net.state_dict(), "model_config": OLD_SEG}, tmp_path / "seg" / "model.pt")
    loaded, meta = load_model(tmp_path / "seg")
    data = data_config_from(meta)
    assert (data.normalize, data.roi, data.slice_axis, data.orientation) == ("zscore", [64, 64], 2, "RAS")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values(),
                                                 strict=True))
    validate_card(card_from_metadata(OLD_SEG, "segmentation", "model.pt", "0" * 64))

    reid = ReIDModel(5, "resnet18", last_stride=1, pooling="avg")
    old_reid = {"encoder": "resnet18", "last_stride": 1, "pooling": "avg", "num_classes": 5,
                "size": [64, 32], "source": "reid", "encoder_weights": "",
                "preprocessing": _old_preset_metadata("reid", (64, 32), 2)}
    atomic_save({"model": reid.state_dict(), "model_config": old_reid}, tmp_path / "reid" / "model.pt")
    _, meta = load_reid_model(tmp_path / "reid")
    assert meta["size"] == [64, 32] and meta["preprocessing"]["intensity"]["kind"] == "mean_std"
    validate_card(card_from_metadata(old_reid, "reid", "model.pt", "0" * 64))
