"""Re-ID on Market-1501-mini: what pretraining without labels buys, with and without fine-tuning.

Four encoders, one protocol (query/gallery, Market-1501 rules, cosine distance, flip averaging):

1. random init, no training;
2. SimCLR-pretrained on the training crops without labels, used directly (BNNeck untrained);
3. the same pretrained encoder fine-tuned with the strong-baseline head (BNNeck, ID + triplet, P x K);
4. the same head and schedule from random init.

Stages skip finished work and resume killed runs from their last checkpoint. Defaults fit about
60-80 min on 2 CPU cores at 64x32 crops (the pretraining resolution); ``--encoder`` reuses a finished
pretraining run (e.g. ``runs/bench_quality/simclr`` of ``pretrain_quality.py``, same settings). On a
GPU use e.g. ``--size 256,128 --epochs 60 --pretrain-epochs 200``; for the full Market-1501 point
``--data`` at its folder (same layout).

    python benchmarks/reid_market_mini.py [--data ../shared/data/Market-1501-mini]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twinview.provenance import cpu_cores, cpu_name  # noqa: E402 - after the sys.path entry

ROWS = {"random": "random init, no training", "pretrained": "SimCLR pretrained, no labels",
        "pretrained_ft": "SimCLR pretrained + fine-tuned", "random_ft": "random init + fine-tuned"}


def pretrain(args: argparse.Namespace) -> Path:
    from downstream import recipes

    if args.encoder:
        return Path(args.encoder)
    h, w = args.size
    return recipes.pretrain(REPO / "configs/pretrain/market_simclr.yaml", [
        f"out_dir={args.work / 'pretrain_simclr'}", f"data.path={args.data}", f"data.size=[{h},{w}]",
        "data.workers=1", f"train.epochs={args.pretrain_epochs}", "train.batch_size=128",
        "train.knn_every_epochs=0", "optim.warmup_epochs=2", f"train.progress={str(not args.quiet).lower()}"])


def evaluate_untrained(args: argparse.Namespace, name: str, encoder: Path | None) -> dict:
    import torch

    from downstream.reid.config import ReIDEvalConfig
    from downstream.reid.evaluate import evaluate_market, load_reid_model, untrained_reid_model

    out = args.work / name
    if not (out / "eval.json").exists():
        if encoder is None:
            model, meta = untrained_reid_model(args.size)
        else:
            model, meta = load_reid_model(encoder, size=args.size)
        evaluate_market(model, meta, args.data, ReIDEvalConfig(), out, torch.device("cpu"),
                        progress=not args.quiet)
    return json.loads((out / "eval.json").read_text())


def finetune(args: argparse.Namespace, name: str, encoder: Path | None) -> dict:
    from downstream.recipes import finetune_reid

    out = args.work / name
    done = (out / "eval.json").exists()
    h, w = args.size
    started = time.perf_counter()
    result = finetune_reid(REPO / "configs/reid/market.yaml", [
        f"out_dir={out}", f"data.path={args.data}", f"data.size=[{h},{w}]", f"train.epochs={args.epochs}",
        f"model.encoder_weights={encoder or ''}", f"train.progress={str(not args.quiet).lower()}",
        "train.ckpt_every_steps=50"])
    if not done:
        result["train_minutes"] = (time.perf_counter() - started) / 60
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/Market-1501-mini"))
    parser.add_argument("--work", type=Path, default=REPO / "runs/bench_reid_market_mini")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    parser.add_argument("--size", default="64,32", help="crop H,W for fine-tuning and evaluation")
    parser.add_argument("--epochs", type=int, default=12, help="fine-tuning epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--encoder", help="a finished pretraining run folder to reuse instead of pretraining")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    args.size = [int(v) for v in args.size.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    encoder = pretrain(args)
    pretrain_min = (time.perf_counter() - started) / 60
    results = {
        "random": evaluate_untrained(args, "random", None),
        "pretrained": evaluate_untrained(args, "pretrained", encoder),
        "pretrained_ft": finetune(args, "pretrained_ft", encoder),
        "random_ft": finetune(args, "random_ft", None),
    }
    lines = ["| encoder | rank-1 | rank-5 | rank-10 | mAP | mINP | fine-tuning (min) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, label in ROWS.items():
        r = results[key]
        minutes = f"{r['train_minutes']:.1f}" if "train_minutes" in r else "-"
        values = " | ".join(f"{r[k]:.3f}" for k in ("rank1", "rank5", "rank10", "mAP", "mINP"))
        lines.append(f"| {label} | {values} | {minutes} |")
    gain = results["pretrained_ft"]["rank1"] - results["random_ft"]["rank1"]
    command = ("python benchmarks/reid_market_mini.py " + " ".join(sys.argv[1:])).strip()
    machine = f"{cpu_name()}, {cpu_cores()} cores, no GPU used"
    md = (f"# Re-ID on Market-1501-mini: pretrained against random init\n\n"
          f"Command: `{command}`  \nMachine: {machine}  \n"
          f"Crops {args.size[0]}x{args.size[1]}; fine-tuning {args.epochs} epochs (ResNet-18, last stride 1, "
          f"BNNeck, ID + triplet, P=16 x K=4, Adam, warm-up + cosine); pretraining: SimCLR without labels "
          f"({'reused ' + str(encoder) if args.encoder else f'{args.pretrain_epochs} epochs'}, "
          f"{pretrain_min:.1f} min in this invocation). Evaluation: {results['random']['queries']} queries "
          f"({results['random']['skipped_queries']} without a valid match, skipped), "
          f"{results['random']['gallery']} gallery images, cosine distance, flip averaging.\n\n"
          + "\n".join(lines) + f"\n\nPretrained + fine-tuned minus random init + fine-tuned: "
          f"{100 * gain:+.1f} rank-1 points.\n")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "reid_market_mini.md").write_text(md)
    (args.results / "reid_market_mini.json").write_text(json.dumps(
        {"command": command, "machine": machine, "size": args.size, "epochs": args.epochs,
         "results": results}, indent=2) + "\n")
    plot(results, args.results / "reid_market_mini_cmc.png")
    print(md)


def plot(results: dict, out: Path) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.add_subplot()
    for key, label in ROWS.items():
        cmc = np.array(results[key]["cmc"])
        ax.plot(np.arange(1, len(cmc) + 1), 100 * cmc, label=label)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title("Market-1501-mini CMC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main()
