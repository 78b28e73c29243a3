"""Re-ID evaluation under the Market-1501 protocol, plots, and the retrieval-index commands.

Features are the BNNeck outputs, L2-normalised, optionally averaged with the mirror image's
(:func:`downstream.reid.model.embed`); distances are cosine (``1 - cos``) or Euclidean. A model is a
re-ID run (``model.pt``) or, for the label-free path, a pretraining run (``encoder.pt``): its encoder
with average pooling and an untrained BNNeck (an identity map in eval mode) and no classifier.

The query set and gallery come from a Market-1501 folder or are the user's own: folders of images or
CSV files (:mod:`twinview.data.person_folder`); :func:`protocol_ids` says how their ids and cameras
enter the protocol.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from downstream.reid.config import ReIDEvalConfig
from downstream.reid.data import eval_pipeline, load_batch
from downstream.reid.model import ReIDModel, embed, model_fingerprint
from engine.checkpoint import load_payload
from pretrain.encoders import load_encoder_weights
from pretrain.views import preset_metadata
from twinview.data.records import PersonRecord
from twinview.errors import DataError
from twinview.retrieval import market1501_scores, pairwise_distance, rank_table

TOP_K_QUERIES = 6
MAX_RANK = 50  # length of the CMC curve in eval.json


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
    """Score ``query/`` against ``bounding_box_test/`` of a Market-1501 folder; writes ``eval.json``,
    ``eval.md``, ``cmc_curve.png`` and ``top10.png`` into ``out_dir`` and returns the numbers."""
    from twinview.data.market1501 import read_market1501

    market = read_market1501(Path(data_path))
    return evaluate_records(model, meta, market.query, market.gallery, ecfg, out_dir, device, progress,
                            title=Path(data_path).name)


def unscored_reason(query: Sequence[PersonRecord], gallery: Sequence[PersonRecord]) -> str | None:
    """Why ``query`` against ``gallery`` cannot be scored (a side without person ids), or None."""
    missing = [name for name, records in (("the query set", query), ("the gallery", gallery))
               if any(r.pid is None for r in records)]
    if not missing:
        return None
    return (f"No identities given for {' and '.join(missing)}: nothing to score. Give CSV files "
            "path,person_id[,camera] (or Market-1501 names) for rank-1 and mAP.")


def same_file_keys(query: Sequence[PersonRecord], gallery: Sequence[PersonRecord]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One number per record of either set, equal exactly for the same file (symbolic links resolved)."""
    keys: dict[str, int] = {}

    def key(record: PersonRecord) -> int:
        return keys.setdefault(os.path.realpath(record.path), len(keys))

    return (np.array([key(r) for r in query], dtype=np.int64),
            np.array([key(r) for r in gallery], dtype=np.int64))


def protocol_ids(query: Sequence[PersonRecord], gallery: Sequence[PersonRecord]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(q_pids, g_pids, q_cams, g_cams)`` for :func:`twinview.retrieval.market1501_scores`, which
    ignores the gallery items of a query's id *and* camera.

    Person ids become ``1..N`` in increasing order: ids are labels, and the protocol's special pids (-1
    junk, 0 distractor) must not catch a user's id (Market-1501 readers have already dropped junk, and
    a distractor id, which no query has, stays a wrong match). With cameras on both sides they are used
    as given, so same-camera matches are ignored; otherwise each distinct file is its own "camera", so
    only the query's own file is ignored (an image in both sets never matches itself). DataError when
    a file in both sets has another id (or camera) in each, or when no query has a true match.
    """
    labels = {pid: i + 1 for i, pid in enumerate(sorted({r.pid for r in (*query, *gallery)}))}
    q_pids = np.array([labels[r.pid] for r in query], dtype=np.int64)
    g_pids = np.array([labels[r.pid] for r in gallery], dtype=np.int64)
    cameras = all(r.camid is not None for r in (*query, *gallery))
    q_keys, g_keys = same_file_keys(query, gallery)
    if cameras:
        q_cams = np.array([r.camid for r in query], dtype=np.int64)
        g_cams = np.array([r.camid for r in gallery], dtype=np.int64)
    else:
        q_cams, g_cams = q_keys, g_keys
    in_gallery = {key: j for j, key in enumerate(g_keys.tolist())}
    for i, key in enumerate(q_keys.tolist()):
        j = in_gallery.get(key)
        if j is not None and (q_pids[i] != g_pids[j] or q_cams[i] != g_cams[j]):
            raise DataError(query[i].path, f"{_who(query[i])} in the query set, {_who(gallery[j])} in the "
                                           "gallery: one file shows one person from one camera")
    cams_of: dict[int, set[int]] = {}
    for pid, cam in zip(g_pids.tolist(), g_cams.tolist(), strict=True):
        cams_of.setdefault(pid, set()).add(cam)
    if not any(cams_of.get(pid, set()) - {cam}
               for pid, cam in zip(q_pids.tolist(), q_cams.tolist(), strict=True)):
        other = "from another camera" if cameras else "other than the query itself"
        raise DataError(None, "no query has a true match in the gallery (an image of the same person "
                              f"{other}): nothing to score")
    return q_pids, g_pids, q_cams, g_cams


def _who(record: PersonRecord) -> str:
    return f"person {record.pid}" + (f" camera {record.camid}" if record.camid is not None else "")


def evaluate_records(model: ReIDModel, meta: dict[str, Any], query: Sequence[PersonRecord],
                     gallery: Sequence[PersonRecord], ecfg: ReIDEvalConfig, out_dir: Path,
                     device: torch.device, progress: bool = True, title: str = "") -> dict[str, Any]:
    """Score ``query`` against ``gallery`` under the Market-1501 protocol (:func:`protocol_ids`); writes
    ``eval.json``, ``eval.md``, ``cmc_curve.png`` and ``top10.png`` into ``out_dir`` and returns the
    numbers. Without person ids on either side nothing is scored: ``eval.md`` says so, as does the
    result's ``"unscored"``, ``top10.png`` shows the nearest gallery crops, and no ``eval.json`` or CMC
    curve is written."""
    reason = unscored_reason(query, gallery)
    ids = None if reason else protocol_ids(query, gallery)  # before the embedding: mistakes show at once
    size, batch = meta["size"], ecfg.batch_size
    q = extract(model, [r.path for r in query], size, device, batch, ecfg.flip, progress, "query")
    g = extract(model, [r.path for r in gallery], size, device, batch, ecfg.flip, progress, "gallery")
    dist = pairwise_distance(q, g, ecfg.metric, normalized=True)
    if ecfg.rerank:
        from downstream.reid.rerank import re_rank

        dist = re_rank(dist, pairwise_distance(q, q, ecfg.metric, normalized=True),
                       pairwise_distance(g, g, ecfg.metric, normalized=True), ecfg.k1, ecfg.k2,
                       ecfg.lambda_value)
    out_dir.mkdir(parents=True, exist_ok=True)
    setting = (f"{ecfg.metric} distance{', flip averaging' if ecfg.flip else ''}"
               f"{', re-ranked' if ecfg.rerank else ''}.")
    if ids is None:
        plot_top10(dist, query, gallery, out_dir / "top10.png")
        (out_dir / "eval.md").write_text(f"{reason}\n\n{len(query)} queries, {len(gallery)} gallery images; "
                                         f"{setting} top10.png shows the nearest gallery crops of "
                                         f"{min(TOP_K_QUERIES, len(query))} queries.\n")
        return {"queries": len(query), "gallery": len(gallery), "unscored": reason}
    scores = market1501_scores(dist, *ids, max_rank=MAX_RANK)
    # The curve stops at the gallery size; every scored query has its first match by then, so it
    # stays flat to MAX_RANK (a gallery of 6 still has a rank-10 value).
    cmc = np.pad(scores.cmc, (0, MAX_RANK - len(scores.cmc)), mode="edge")
    result = {"rank1": float(cmc[0]), "rank5": float(cmc[4]), "rank10": float(cmc[9]),
              "mAP": float(scores.mAP), "mINP": float(scores.mINP), "queries": len(query),
              "skipped_queries": int(scores.num_skipped), "gallery": len(gallery)}
    settings = {"metric": ecfg.metric, "rerank": ecfg.rerank, "flip": ecfg.flip}
    payload = {**result, "cmc": cmc.tolist(), **settings}
    (out_dir / "eval.json").write_text(json.dumps(payload, indent=2) + "\n")
    note = (f"{result['queries']} queries ({result['skipped_queries']} without a valid match, skipped), "
            f"{result['gallery']} gallery images; {setting}")
    (out_dir / "eval.md").write_text(rank_table(cmc, scores.mAP, scores.mINP) + "\n" + note + "\n")
    plot_cmc(cmc, out_dir / "cmc_curve.png", title=f"CMC ({title})" if title else "CMC")
    plot_top10(dist, query, gallery, out_dir / "top10.png", ids)
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


def plot_top10(dist: np.ndarray, query: Sequence[PersonRecord], gallery: Sequence[PersonRecord], out: Path,
               ids: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
               n_queries: int = TOP_K_QUERIES) -> Path:
    """Rows of query + its top-10 gallery crops, leaving out what the protocol ignores for that query
    (``ids``: :func:`protocol_ids`); true matches framed green, wrong ones red. Without ``ids`` (no
    person ids) the frames are grey and only the query's own file is left out."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from twinview.data.images import load_image

    if ids is None:  # every crop one "person", each file its own "camera": only the same file is left out
        q_cams, g_cams = same_file_keys(query, gallery)
        q_pids, g_pids = np.zeros(len(query), dtype=np.int64), np.zeros(len(gallery), dtype=np.int64)
    else:
        q_pids, g_pids, q_cams, g_cams = ids
    picks = np.linspace(0, len(query) - 1, min(n_queries, len(query))).round().astype(int)
    fig = Figure(figsize=(11 * 0.9, len(picks) * 1.8), dpi=100)
    for row, qi in enumerate(picks):
        keep = ~((g_pids == q_pids[qi]) & (g_cams == q_cams[qi]))
        order = np.flatnonzero(keep)[np.argsort(dist[qi][keep], kind="stable")[:10]]
        colours = ["0.6" if ids is None else "green" if g_pids[j] == q_pids[qi] else "red" for j in order]
        for col, (record, colour) in enumerate([(query[qi], "black"),
                                                *zip([gallery[j] for j in order], colours, strict=True)]):
            ax = fig.add_subplot(len(picks), 11, row * 11 + col + 1)
            ax.imshow(load_image(record.path)[..., :3])
            h, w = ax.get_images()[0].get_array().shape[:2]
            ax.add_patch(Rectangle((0, 0), w - 1, h - 1, fill=False, edgecolor=colour, lw=3))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title("query" if col == 0 else str(col), fontsize=7)
    fig.suptitle("top-10 gallery matches (no person ids given)" if ids is None else
                 "top-10 gallery matches (green: same identity, red: other)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    return out


def evaluate_run(model_path: Path, data: Path | None, out: Path, metric: str = "cosine", rerank: bool = False,
                 flip: bool = True, size: Sequence[int] | None = None, device: str = "auto",
                 query: Path | None = None, gallery: Path | None = None) -> str:
    """``twinview reid eval``: score a re-ID run or a pretraining run on the Market-1501 folder ``data``,
    or on ``query`` against ``gallery`` (each a folder of images or a CSV:
    :func:`twinview.data.person_folder.read_person_source`); returns what the command prints (eval.md
    and the pictures written). Give ``data`` or both ``query`` and ``gallery``; ``out`` must not be,
    contain or lie inside those (or a folder holding their images): ``OutputError``."""
    from engine.device import select_device
    from twinview.errors import check_output

    if (data is None) == (query is None and gallery is None) or (query is None) != (gallery is None):
        raise ValueError("evaluate_run: give data, or query and gallery")
    if data is not None:
        from twinview.data.market1501 import read_market1501

        check_output(out, kind="evaluation")
        market = read_market1501(Path(data))
        sets, title = (market.query, market.gallery), Path(data).name
    else:
        from twinview.data.market1501 import GALLERY, QUERY
        from twinview.data.person_folder import read_person_source

        sets = (read_person_source(query, QUERY), read_person_source(gallery, GALLERY))
        title = f"{Path(query).name} / {Path(gallery).name}"
        # Not inside a source folder either: folders are read with their subfolders, so a later run
        # would take top10.png for a crop.
        folders = sorted({r.path.parent for records in sets for r in records})
        check_output(out, [query, gallery, *folders], kind="evaluation")
    dev = select_device(device)
    model, meta = load_reid_model(model_path, dev, size=size)
    ecfg = ReIDEvalConfig(flip=flip, metric=metric, rerank=rerank)
    result = evaluate_records(model, meta, *sets, ecfg, out, dev, title=title)
    pictures = [] if "unscored" in result else [f"CMC curve: {out / 'cmc_curve.png'}"]
    return "\n".join([(out / "eval.md").read_text(), *pictures, f"top-10 results: {out / 'top10.png'}"])
