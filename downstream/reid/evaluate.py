"""Re-ID evaluation under the Market-1501 protocol, plots, and the retrieval-index commands.

Features are the BNNeck outputs, L2-normalised, optionally averaged with the mirror image's
(:func:`downstream.reid.model.embed`); distances are cosine (``1 - cos``) or Euclidean. A model is a
re-ID run (``model.pt``) or, for the label-free path, a pretraining run (``encoder.pt``): its encoder
with average pooling and an untrained BNNeck (an identity map in eval mode) and no classifier.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from downstream.reid.config import ReIDEvalConfig
from downstream.reid.data import as_arrays, eval_pipeline, load_batch
from downstream.reid.model import ReIDModel, embed, model_fingerprint
from engine.checkpoint import load_payload
from pretrain.encoders import load_encoder_weights
from pretrain.views import preset_metadata
from twinview.errors import DataError
from twinview.retrieval import market1501_scores, pairwise_distance, rank_table

TOP_K_QUERIES = 6


def load_reid_model(path: str | Path, device: torch.device | str = "cpu",
                    size: Sequence[int] | None = None) -> tuple[ReIDModel, dict[str, Any]]:
    """A trained re-ID model (run folder or ``model.pt``) or a pretrained encoder used as is
    (pretraining run folder or ``encoder.pt``), in eval mode, with its metadata."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt" if (path / "model.pt").exists() else path / "encoder.pt"
    if not path.exists():
        raise DataError(path, "no model.pt (re-ID run) or encoder.pt (pretraining run) here")
    payload = load_payload(path, [("model", "model_config"), ("encoder", "encoder_config")], "re-ID model",
                           map_location=device)
    if "model_config" in payload:
        meta = dict(payload["model_config"])
        model = ReIDModel(meta["num_classes"], meta["encoder"], meta["last_stride"], meta["pooling"])
        model.load_state_dict(payload["model"])
        if not isinstance(meta["preprocessing"].get("intensity"), dict):  # written before the model card
            meta["preprocessing"] = preset_metadata("reid", tuple(meta["size"]))
    elif "encoder_config" in payload:
        enc = payload["encoder_config"]
        if enc.get("spatial_dims") != 2 or enc.get("in_channels") != 3 or enc.get("small_stem"):
            raise DataError(path, "a re-ID model needs a 2D RGB encoder with the standard stem; this one "
                                  f"has spatial_dims={enc.get('spatial_dims')}, "
                                  f"in_channels={enc.get('in_channels')}, small_stem={enc.get('small_stem')}")
        crop = list(size or enc.get("size") or enc.get("preprocessing", {}).get("size", [128, 64]))
        model = ReIDModel(0, enc["name"], last_stride=1, pooling="avg")
        load_encoder_weights(model.backbone, payload["encoder"])
        meta = {"encoder": enc["name"], "last_stride": 1, "pooling": "avg", "num_classes": 0, "size": crop,
                "source": "pretrain", "method": enc.get("method"),
                "preprocessing": preset_metadata("reid", tuple(crop))}
    if size is not None:
        meta["size"] = list(size)
        meta["preprocessing"] = preset_metadata("reid", tuple(size))
    meta["model_id"] = model_fingerprint(model.state_dict())
    return model.to(device).eval(), meta


def untrained_reid_model(size: Sequence[int], encoder: str = "resnet18", seed: int = 0
                         ) -> tuple[ReIDModel, dict[str, Any]]:
    """The re-ID network at random initialisation (the "no training" baseline), in eval mode, with its
    metadata; the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ReIDModel(0, encoder, last_stride=1, pooling="avg")
    meta = {"encoder": encoder, "last_stride": 1, "pooling": "avg", "num_classes": 0, "size": list(size),
            "source": "random", "preprocessing": preset_metadata("reid", tuple(size))}
    return model.eval(), meta


def extract(model: ReIDModel, paths: Sequence[Path], size: Sequence[int], device: torch.device,
            batch_size: int = 128, flip: bool = True, progress: bool = False,
            desc: str = "embed") -> np.ndarray:
    """(N, D) float32 L2-normalised features of the crops at ``paths``."""
    from tqdm.auto import tqdm

    pipeline = eval_pipeline(size)
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    feats = []
    model.to(device).eval()
    for chunk in tqdm(chunks, desc=desc, unit="batch", disable=not progress):
        x = load_batch(chunk, pipeline).to(device).to(memory_format=torch.channels_last)
        feats.append(embed(model, x, flip=flip).float().cpu())
    return torch.cat(feats).numpy()


def evaluate_market(model: ReIDModel, meta: dict[str, Any], data_path: str | Path, ecfg: ReIDEvalConfig,
                    out_dir: Path, device: torch.device, progress: bool = True) -> dict[str, float]:
    """Score ``query/`` against ``bounding_box_test/``; writes ``eval.json``, ``eval.md``,
    ``cmc_curve.png`` and ``top10.png`` into ``out_dir`` and returns the numbers."""
    from twinview.data.market1501 import read_market1501

    market = read_market1501(Path(data_path))
    size = meta["size"]
    q = extract(model, [r.path for r in market.query], size, device, ecfg.batch_size, ecfg.flip, progress,
                "query")
    g = extract(model, [r.path for r in market.gallery], size, device, ecfg.batch_size, ecfg.flip, progress,
                "gallery")
    dist = pairwise_distance(q, g, ecfg.metric, normalized=True)
    if ecfg.rerank:
        from downstream.reid.rerank import re_rank

        dist = re_rank(dist, pairwise_distance(q, q, ecfg.metric, normalized=True),
                       pairwise_distance(g, g, ecfg.metric, normalized=True), ecfg.k1, ecfg.k2,
                       ecfg.lambda_value)
    (q_pids, q_cams), (g_pids, g_cams) = as_arrays(market.query), as_arrays(market.gallery)
    scores = market1501_scores(dist, q_pids, g_pids, q_cams, g_cams, max_rank=50)
    cmc = scores.cmc
    result = {"rank1": float(cmc[0]), "rank5": float(cmc[4]), "rank10": float(cmc[9]),
              "mAP": float(scores.mAP), "mINP": float(scores.mINP), "queries": len(q_pids),
              "skipped_queries": int(scores.num_skipped), "gallery": len(g_pids)}
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"metric": ecfg.metric, "rerank": ecfg.rerank, "flip": ecfg.flip}
    payload = {**result, "cmc": cmc.tolist(), **settings}
    (out_dir / "eval.json").write_text(json.dumps(payload, indent=2) + "\n")
    note = (f"{result['queries']} queries ({result['skipped_queries']} without a valid match, skipped), "
            f"{result['gallery']} gallery images; {ecfg.metric} distance"
            f"{', flip averaging' if ecfg.flip else ''}{', re-ranked' if ecfg.rerank else ''}.")
    (out_dir / "eval.md").write_text(rank_table(cmc, scores.mAP, scores.mINP) + "\n" + note + "\n")
    plot_cmc(cmc, out_dir / "cmc_curve.png", title=f"CMC ({Path(data_path).name})")
    plot_top10(dist, market.query, market.gallery, out_dir / "top10.png")
    return result


def plot_cmc(cmc: np.ndarray, out: Path, title: str = "CMC") -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.6), dpi=110)
    ax = fig.add_subplot()
    ranks = np.arange(1, len(cmc) + 1)
    ax.plot(ranks, 100 * cmc, marker=".", lw=1.2)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    return out


def plot_top10(dist: np.ndarray, query: Sequence, gallery: Sequence, out: Path, n_queries: int = TOP_K_QUERIES
               ) -> Path:
    """Rows of query + its top-10 gallery crops (the protocol's ignored same-camera matches left out);
    true matches framed green, wrong ones red."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from twinview.data.images import load_image

    picks = np.linspace(0, len(query) - 1, min(n_queries, len(query))).round().astype(int)
    fig = Figure(figsize=(11 * 0.9, len(picks) * 1.8), dpi=100)
    g_pids = np.array([r.pid for r in gallery])
    g_cams = np.array([r.camid for r in gallery])
    for row, qi in enumerate(picks):
        qr = query[qi]
        keep = ~((g_pids == qr.pid) & (g_cams == qr.camid))
        order = np.flatnonzero(keep)[np.argsort(dist[qi][keep], kind="stable")[:10]]
        for col, (record, colour) in enumerate([(qr, "black")] + [
                (gallery[j], "green" if gallery[j].pid == qr.pid else "red") for j in order]):
            ax = fig.add_subplot(len(picks), 11, row * 11 + col + 1)
            ax.imshow(load_image(record.path)[..., :3])
            h, w = ax.get_images()[0].get_array().shape[:2]
            ax.add_patch(Rectangle((0, 0), w - 1, h - 1, fill=False, edgecolor=colour, lw=3))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title("query" if col == 0 else str(col), fontsize=7)
    fig.suptitle("top-10 gallery matches (green: same identity, red: other)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    return out


def evaluate_run(model_path: Path, data: Path, out: Path, metric: str = "cosine", rerank: bool = False,
                 flip: bool = True, size: Sequence[int] | None = None, device: str = "auto") -> str:
    """``twinview reid eval``: score a re-ID run or a pretraining run on ``data``; returns eval.md."""
    from engine.device import select_device
    from twinview.errors import check_output

    check_output(out, kind="evaluation")
    dev = select_device(device)
    model, meta = load_reid_model(model_path, dev, size=size)
    evaluate_market(model, meta, data, ReIDEvalConfig(flip=flip, metric=metric, rerank=rerank), out, dev)
    return (out / "eval.md").read_text()
