"""Does pretraining without labels help retrieval? SimCLR and MoCo v2 on Market-1501-mini.

Each method is pretrained on ``bounding_box_train`` with its labels unused, then its encoder embeds
``query/`` and ``bounding_box_test/``, and retrieval is scored under the Market-1501 protocol (rank-1,
rank-5, mAP, mINP; cosine distance). The baseline is the same encoder at random initialisation
(same seed, same preprocessing). Runs live in ``runs/bench_quality/`` and resume when interrupted.

    python benchmarks/pretrain_quality.py                            # CPU defaults (2 cores: ~1 h)
    python benchmarks/pretrain_quality.py --set train.epochs=200 --set data.size=[128,64]   # a GPU

Writes ``benchmarks/results/pretrain_quality.md`` and ``.json``, plus each run's loss curve and
embedding map beside them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = ["data.size=[64,32]", "data.workers=1", "train.batch_size=128", "train.epochs=8",
            "train.knn_every_epochs=0", "train.ckpt_every_steps=50", "optim.warmup_epochs=2"]


def score(cfg, encoder: torch.nn.Module) -> dict[str, float]:  # noqa: ANN001
    from pretrain.monitor import embed_market

    s = embed_market(cfg.data, encoder, torch.device("cpu")).scores
    return {"rank1": float(s.cmc[0]), "rank5": float(s.cmc[4]), "mAP": s.mAP, "mINP": s.mINP,
            "queries_scored": s.num_valid, "queries_skipped": s.num_skipped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "Market-1501-mini")
    parser.add_argument("--methods", nargs="+", default=["simclr", "moco"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bench_quality")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: Market-1501 folder not found (pass --data)")
    from downstream.recipes import pretrain
    from pretrain.config import PretrainConfig
    from pretrain.trainer import build_model
    from twinview.config import load_config

    results_dir = REPO / "benchmarks" / "results"
    rows = {}
    for method in args.methods:
        run = args.runs / method
        config = REPO / "configs" / "pretrain" / f"market_{method}.yaml"
        overrides = [*DEFAULTS, f"data.path={args.data}", f"out_dir={run}", *args.set]
        cfg = load_config(PretrainConfig, config, overrides)
        start = time.perf_counter()
        pretrain(config, overrides)
        minutes = (time.perf_counter() - start) / 60
        model = build_model(cfg, spatial_dims=2)
        model.encoder.load_state_dict(torch.load(run / "encoder.pt", weights_only=True)["encoder"])
        rows[method] = {**score(cfg, model.encoder), "train_minutes_this_call": round(minutes, 1),
                        "epochs": cfg.train.epochs, "size": cfg.data.size, "batch": cfg.train.batch_size}
        for name in ("loss_curve.png", "embedding_map.png"):
            if (run / name).exists():
                shutil.copy(run / name, results_dir / f"pretrain_quality_{method}_{name}")
        if "random" not in rows:
            torch.manual_seed(cfg.train.seed)
            rows["random"] = score(cfg, build_model(cfg, spatial_dims=2).encoder)
        print(method, rows[method], "random init", rows["random"], flush=True)

    lines = ["# Pretraining quality: retrieval on Market-1501-mini without labels", "",
             f"Data `{args.data}` (train crops for pretraining, labels unused; query/gallery for scoring, "
             "Market-1501 protocol, cosine distance). Settings: " + ", ".join(DEFAULTS + args.set) + ".", "",
             "| encoder | rank-1 | rank-5 | mAP | mINP |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        label = "random init (same encoder)" if name == "random" else f"{name} pretrained, no labels"
        lines.append(f"| {label} | {r['rank1']:.3f} | {r['rank5']:.3f} | {r['mAP']:.3f} | {r['mINP']:.3f} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    (results_dir / "pretrain_quality.md").write_text(table)
    (results_dir / "pretrain_quality.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
