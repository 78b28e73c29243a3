"""Re-ID training, evaluation, index and query end to end on synthetic crops; schedule; bad input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from downstream.reid.config import ReIDConfig
from downstream.reid.train import lr_factor, run_reid
from tests.reader_builders import snapshot
from twinview.config import load_config
from twinview.errors import DataError
from twinview.index import IndexModelMismatch

REPO = Path(__file__).resolve().parents[1]


def _cfg(data: Path, out: Path, *extra: str) -> ReIDConfig:
    return load_config(ReIDConfig, REPO / "configs/reid/market.yaml", [
        f"out_dir={out}", f"data.path={data}", "data.size=[32,16]", "train.epochs=1", "train.p=4",
        "train.k=4", "train.progress=false", "optim.warmup_epochs=0", "train.ckpt_every_steps=10", *extra])


def test_schedule_warmup_step_and_cosine() -> None:
    cfg = load_config(ReIDConfig, None, ["train.epochs=10", "optim.warmup_epochs=2", "optim.schedule=step",
                                         "optim.milestones=[4,7]"])
    assert lr_factor(0, 10, cfg) == pytest.approx(0.1)
    assert lr_factor(10, 10, cfg) == pytest.approx(0.55)
    assert lr_factor(20, 10, cfg) == 1.0 and lr_factor(45, 10, cfg) == pytest.approx(0.1)
    assert lr_factor(75, 10, cfg) == pytest.approx(0.01)
    cfg.optim.schedule = "cosine"
    assert lr_factor(20, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 10, cfg) == pytest.approx(0.5)
    assert lr_factor(99, 10, cfg) < 0.001


def test_train_eval_index_query_end_to_end(tmp_path: Path, synth_market: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    from twinview_cli.main import main

    before = snapshot(synth_market)
    run = tmp_path / "run"
    config = str(REPO / "configs/reid/market.yaml")
    assert main(["reid", "train", "--config", config, "--set", f"out_dir={run}", "--set",
                 f"data.path={synth_market}", "--set", "data.size=[32,16]", "--set", "train.epochs=1",
                 "--set", "train.p=4", "--set", "train.k=4", "--set", "train.progress=false"]) == 0
    printed = capsys.readouterr().out
    assert "| Rank-1 | Rank-5 | Rank-10 | mAP | mINP |" in printed
    result = json.loads((run / "eval.json").read_text())
    assert 0 <= result["mAP"] <= 1 and len(result["cmc"]) == 50 and result["queries"] == 44
    assert np.all(np.diff(result["cmc"]) >= 0)  # a CMC curve never decreases
    for name in ("model.pt", "metrics.csv", "loss_curve.png", "cmc_curve.png", "top10.png", "config.yaml"):
        assert (run / name).stat().st_size > 0, name
    payload = torch.load(run / "model.pt", weights_only=True)
    assert payload["model_config"]["num_classes"] == 16 and payload["model_config"]["size"] == [32, 16]
    from twinview.model_card import check_weights, read_card

    card = read_card(run / "model.json")
    check_weights(card, run)
    assert card["task"] == "reid" and card["input_size"] == [32, 16] and card["embedding_size"] == 512

    # evaluation of the trained run, with re-ranking, by the CLI
    assert main(["reid", "eval", "--model", str(run), "--data", str(synth_market), "--out",
                 str(tmp_path / "ev"), "--rerank", "--device", "cpu"]) == 0
    assert "re-ranked" in (tmp_path / "ev" / "eval.md").read_text()

    # index the gallery, query it with a query crop: the first hits are ranked by score
    index = tmp_path / "index"
    assert main(["reid", "index", str(synth_market / "bounding_box_test"), "--model", str(run),
                 "--out", str(index)]) == 0
    meta = json.loads((index / "meta.json").read_text())
    assert meta["count"] == 140 and meta["dim"] == 512
    capsys.readouterr()
    query = sorted((synth_market / "query").iterdir())[0]
    assert main(["reid", "query", str(index), str(query), "-k", "5"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:], strict=False))

    # another model's embeddings are refused
    other = tmp_path / "other"
    shutil.copytree(run, other)
    state = torch.load(other / "model.pt", weights_only=True)
    state["model"]["bnneck.weight"] += 1.0
    torch.save(state, other / "model.pt")
    from downstream.reid.search import query_index

    with pytest.raises(IndexModelMismatch, match="rebuild the index"):
        query_index(index, query, 5, model_path=other)
    assert snapshot(synth_market) == before


def test_label_free_path_and_pretrained_start(tmp_path: Path, synth_market: Path) -> None:
    """A pretraining run's encoder is evaluated without labels and loads into the re-ID backbone."""
    from downstream.reid.config import ReIDEvalConfig
    from downstream.reid.evaluate import evaluate_market, load_reid_model
    from engine.checkpoint import atomic_save
    from pretrain.encoders import build_encoder

    torch.manual_seed(1)
    encoder = build_encoder("resnet18", 3, 2)
    meta = {"name": "resnet18", "in_channels": 3, "spatial_dims": 2, "small_stem": False, "method": "simclr",
            "preprocessing": {"size": [32, 16]}}
    atomic_save({"encoder": encoder.state_dict(), "encoder_config": meta}, tmp_path / "pre" / "encoder.pt")
    model, info = load_reid_model(tmp_path / "pre")
    assert info["source"] == "pretrain" and info["size"] == [32, 16] and model.classifier is None
    assert torch.equal(model.backbone.conv1.weight, encoder.conv1.weight)
    scores = evaluate_market(model, info, synth_market, ReIDEvalConfig(), tmp_path / "ev",
                             torch.device("cpu"), progress=False)
    assert 0 < scores["rank1"] <= 1
    result = run_reid(_cfg(synth_market, tmp_path / "ft", f"model.encoder_weights={tmp_path / 'pre'}",
                           "train.epochs=1"))
    assert (result.run_dir / "eval.json").exists()
    small = tmp_path / "small"
    enc_small = build_encoder("resnet18", 3, 2, small_stem=True)
    atomic_save({"encoder": enc_small.state_dict(), "encoder_config": {**meta, "small_stem": True}},
                small / "encoder.pt")
    from twinview.config import ConfigError

    with pytest.raises(ConfigError, match="small_stem: encoder has True"):
        run_reid(_cfg(synth_market, tmp_path / "bad", f"model.encoder_weights={small}"))


def test_resume_after_interruption_matches_uninterrupted(tmp_path: Path, synth_market: Path,
                                                         killed_after_checkpoint: Callable) -> None:

    full = run_reid(_cfg(synth_market, tmp_path / "full"))
    with killed_after_checkpoint(10):
        run_reid(_cfg(synth_market, tmp_path / "cut"))
    resumed = run_reid(_cfg(synth_market, tmp_path / "cut"), resume=tmp_path / "cut")
    a = torch.load(full.model_path, weights_only=True)["model"]
    b = torch.load(resumed.model_path, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["rank1"] == full.metrics["rank1"]


def test_bad_gallery_and_query_input(tmp_path: Path, synth_market: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    from downstream.reid.search import gallery_records
    from twinview.data.market1501 import read_market1501

    data = tmp_path / "market"
    shutil.copytree(synth_market, data)
    # a name that does not parse
    bad = data / "bounding_box_test" / "person_7.jpg"
    shutil.copy(sorted((data / "bounding_box_test").iterdir())[0], bad)
    with pytest.raises(DataError, match="person_7.jpg"):
        gallery_records(data / "bounding_box_test")
    bad.unlink()
    # a crop of unexpected size is resized, not refused
    odd = sorted((data / "bounding_box_test").glob("0*.jpg"))[0]
    Image.open(odd).resize((47, 131)).save(odd)
    from downstream.reid.config import ReIDEvalConfig
    from downstream.reid.evaluate import evaluate_market
    from downstream.reid.model import ReIDModel

    model = ReIDModel(0, "resnet18").eval()
    scores = evaluate_market(model, {"size": [32, 16]}, data, ReIDEvalConfig(), tmp_path / "ev",
                             torch.device("cpu"), progress=False)
    assert scores["gallery"] == 140
    # an identity seen by one camera only: kept for training, with a note
    train = read_market1501(data).train
    pid = train[0].pid
    for record in train:
        if record.pid == pid and record.camid != train[0].camid:
            record.path.unlink()
    run_reid(_cfg(data, tmp_path / "run"))
    assert "1 training identities were seen by one camera only (kept)" in capsys.readouterr().out
    # an empty query set
    for f in (data / "query").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="query: no images"):
        run_reid(_cfg(data, tmp_path / "run2"))
