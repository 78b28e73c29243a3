"""Re-ID without identity labels on Market-1501-mini: Cluster Contrast on top of the SimCLR encoder.

1. SimCLR pretrains a ResNet-18 on the training crops without labels (the settings of
   ``reid_market_mini.py``; ``--encoder`` reuses a finished pretraining run).
2. That encoder used as is (average pooling, no training) is scored on query/gallery.
3. Cluster Contrast (``configs/reid/market_cluster.yaml``: DBSCAN on the k-reciprocal Jaccard distance
   every epoch, ClusterNCE against a cluster memory, strong-baseline model) starts from it, with
   ``--seeds`` seeds; identity labels are never read for training (only for the purity column).
4. The table puts the label-free rows beside the supervised strong-baseline rows of
   ``benchmarks/results/reid_market_mini.json`` (same crops, same protocol) and states the fraction of
   the supervised rank-1 reached. A plot shows clusters, purity and rank-1 per epoch.

Every stage skips finished work and resumes killed runs. On a GPU use e.g. ``--size 256,128 --epochs 50
--iters 400`` with ``--set train.k=16`` (the paper's batch of 256).

    python benchmarks/reid_label_free.py [--data ../shared/data/Market-1501-mini]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.reid_market_mini import evaluate_untrained, pretrain  # noqa: E402 - same SimCLR start
from twinview.provenance import cpu_cores, cpu_name  # noqa: E402 - after the sys.path entry

METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def cluster_contrast(args: argparse.Namespace, encoder: Path, seed: int) -> dict:
    from downstream.recipes import finetune_reid
    from downstream.reid.cluster import read_clustering

    out = args.work / f"cluster_contrast_s{seed}"
    done = (out / "eval.json").exists()
    h, w = args.size
    started = time.perf_counter()
    result = finetune_reid(REPO / "configs/reid/market_cluster.yaml", [
        f"out_dir={out}", f"data.path={args.data}", f"data.size=[{h},{w}]", f"train.epochs={args.epochs}",
        f"cluster.iters_per_epoch={args.iters}", f"cluster.eps={args.eps}",
        f"model.encoder_weights={encoder}", f"train.seed={seed}",
        f"train.progress={str(not args.quiet).lower()}", "train.ckpt_every_steps=50", *args.set])
    if not done:
        result["train_minutes"] = (time.perf_counter() - started) / 60
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    result["clustering"] = read_clustering(out / "clusters.csv")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/Market-1501-mini"))
    parser.add_argument("--work", type=Path, default=REPO / "runs/bench_reid_label_free")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    parser.add_argument("--size", default="64,32", help="crop H,W")
    parser.add_argument("--epochs", type=int, default=8, help="Cluster Contrast epochs (one clustering each)")
    parser.add_argument("--iters", type=int, default=100, help="steps per epoch")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eps", type=float, default=0.5,
                        help="DBSCAN radius (the paper's 0.6 suits ImageNet-started features; on the "
                             "CPU-sized SimCLR start it merged identities: cluster purity 0.13)")
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--encoder", help="a finished pretraining run folder to reuse instead of pretraining")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Cluster Contrast config override (repeatable); use a separate --work")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    args.size = [int(v) for v in args.size.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    encoder = pretrain(args)
    pretrain_min = (time.perf_counter() - started) / 60
    as_is = evaluate_untrained(args, "encoder_as_is", encoder)
    runs = [cluster_contrast(args, encoder, seed) for seed in range(args.seeds)]
    write_results(args, encoder, pretrain_min, as_is, runs)


def write_results(args: argparse.Namespace, encoder: Path, pretrain_min: float, as_is: dict,
                  runs: list[dict]) -> None:
    supervised_file = args.results / "reid_market_mini.json"
    supervised = json.loads(supervised_file.read_text())["results"] if supervised_file.exists() else {}
    mean = {k: float(np.mean([r[k] for r in runs])) for k in METRICS}
    sd = {k: float(np.std([r[k] for r in runs])) for k in METRICS}
    minutes = sum(r.get("train_minutes", 0.0) for r in runs)
    lines = ["| model | labels used | rank-1 | rank-5 | rank-10 | mAP | mINP | share of supervised rank-1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    reference = supervised.get("pretrained_ft", {}).get("rank1")

    def share(rank1: float) -> str:
        return f"{rank1 / reference:.0%}" if reference else "-"

    lines.append("| SimCLR encoder as is | none | " + " | ".join(f"{as_is[k]:.3f}" for k in METRICS)
                 + f" | {share(as_is['rank1'])} |")
    lines.append(f"| SimCLR + Cluster Contrast ({len(runs)} seeds, mean ± sd) | none | "
                 + " | ".join(f"{mean[k]:.3f} ± {sd[k]:.3f}" for k in METRICS)
                 + f" | {share(mean['rank1'])} |")
    for key, label in (("pretrained_ft", "SimCLR + strong baseline"),
                       ("random_ft", "random init + strong baseline")):
        if key in supervised:
            r = supervised[key]
            lines.append(f"| {label} | identities | " + " | ".join(f"{r[k]:.3f}" for k in METRICS)
                         + f" | {share(r['rank1'])} |")
    per_seed = ", ".join(f"seed {i}: {r['rank1']:.3f} / {r['mAP']:.3f}" for i, r in enumerate(runs))
    gain = mean["rank1"] - as_is["rank1"]
    command = ("python benchmarks/reid_label_free.py " + " ".join(sys.argv[1:])).strip()
    machine = f"{cpu_name()}, {cpu_cores()} cores, no GPU used"
    last = [r["clustering"][-1] for r in runs if r["clustering"]]
    clusters = ", ".join(f"{int(c['clusters'])} clusters / {int(c['outliers'])} outliers "
                         f"(purity {float(c['purity']):.2f})" for c in last)
    md = (f"# Re-ID without labels on Market-1501-mini: Cluster Contrast\n\n"
          f"Command: `{command}`  \nMachine: {machine}  \n"
          f"Crops {args.size[0]}x{args.size[1]}; SimCLR pretraining without labels "
          f"({'reused ' + str(encoder) if args.encoder else f'{args.pretrain_epochs} epochs'}, "
          f"{pretrain_min:.1f} min in this invocation); Cluster Contrast {args.epochs} epochs x {args.iters} "
          f"steps, eps {args.eps} (`configs/reid/market_cluster.yaml`"
          f"{' with ' + ', '.join(args.set) if args.set else ''}: "
          f"ResNet-18, last stride 1, BNNeck, DBSCAN on the Jaccard distance), {minutes:.1f} min for "
          f"{len(runs)} seeds in this invocation. Evaluation: "
          f"{as_is['queries']} queries, {as_is['gallery']} gallery images, Market-1501 protocol, cosine "
          f"distance, flip averaging. Supervised rows: `benchmarks/results/reid_market_mini.md` (same crops "
          f"and protocol).\n\n" + "\n".join(lines)
          + f"\n\nPer seed (rank-1 / mAP): {per_seed}.  \nCluster Contrast minus the encoder as is: "
          f"{100 * gain:+.1f} rank-1 points.  \nLast clustering: {clusters}.\n")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "reid_label_free.md").write_text(md)
    (args.results / "reid_label_free.json").write_text(json.dumps(
        {"command": command, "machine": machine, "size": args.size, "epochs": args.epochs,
         "iters": args.iters, "encoder_as_is": as_is, "cluster_contrast": runs, "mean": mean, "sd": sd,
         "supervised": supervised}, indent=2) + "\n")
    plot(runs, as_is, args.results / "reid_label_free.png")
    print(md)


def plot(runs: list[dict], as_is: dict, out: Path) -> None:
    """Per epoch and seed: clusters (left), purity and rank-1 (right; epoch 0 is the encoder as loaded)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), dpi=110)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for seed, r in enumerate(runs):
        rows = r["clustering"]
        epochs = [int(c["epoch"]) for c in rows]
        left.plot(epochs, [int(c["clusters"]) for c in rows], "o-", label=f"clusters, seed {seed}")
        left.plot(epochs, [int(c["outliers"]) for c in rows], "x--", label=f"outliers, seed {seed}")
        right.plot(epochs, [float(c["purity"]) for c in rows], "s--", label=f"purity, seed {seed}")
        pts = [(int(c["epoch"]), float(c["rank1"])) for c in rows if "rank1" in c]
        pts.append((len(rows), r["rank1"]))  # after the last epoch
        right.plot(*zip(*pts, strict=True), "o-", label=f"rank-1, seed {seed}")
    right.axhline(as_is["rank1"], color="grey", lw=1, ls=":", label="encoder as is, rank-1")
    left.set(xlabel="epoch", ylabel="count", title="pseudo-identities per clustering")
    right.set(xlabel="epoch", ylim=(0, 1), title="cluster purity and rank-1")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main()
