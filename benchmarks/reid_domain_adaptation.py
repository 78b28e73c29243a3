"""Re-ID domain adaptation without target labels, both directions: synthetic Market <-> Market-1501-mini.

For each direction a strong-baseline model is trained with identity labels on the source set, scored
on the target's query/gallery as is (direct transfer), then adapted to the target's training crops
with Cluster Contrast (``configs/reid/market_cluster.yaml``; the target's labels are read only for
the purity column) and scored again. The model trained with labels on the target (the other
direction's source) is the reference row.

1. the synthetic Market set (``twinview.data.synth``, "medium": 100 training ids) is generated;
2. a supervised model on each set, from random init (``configs/reid/market.yaml``);
3. Cluster Contrast from each onto the other set.

Every stage skips finished work and resumes killed runs. Defaults take about 35 min on 2 CPU cores
(64x32 crops); on a GPU use e.g. ``--size 256,128 --source-epochs 60 --epochs 50``.

    python benchmarks/reid_domain_adaptation.py [--data ../shared/data/Market-1501-mini]
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

METRICS = ("rank1", "rank5", "mAP", "mINP")
NAMES = {"synthetic": "synthetic Market", "market": "Market-1501-mini"}


def supervised(args: argparse.Namespace, name: str, data: Path, epochs: int) -> dict:
    """A strong-baseline run trained with identity labels on ``data``, from random init."""
    from downstream.recipes import finetune_reid

    out = args.work / f"supervised_{name}"
    started = time.perf_counter()
    result = finetune_reid(REPO / "configs/reid/market.yaml", [
        f"out_dir={out}", f"data.path={data}", f"data.size=[{args.size[0]},{args.size[1]}]",
        f"train.epochs={epochs}", "model.encoder_weights=", f"train.seed={args.seed}",
        f"train.progress={str(not args.quiet).lower()}"])
    return {**result, "run": str(out), "minutes": (time.perf_counter() - started) / 60}


def adapt(args: argparse.Namespace, source: str, target: str, data: Path, weights: str, iters: int) -> dict:
    """Cluster Contrast on ``data`` (no labels) from the supervised ``weights``; epoch 0 of its
    clustering log scores the loaded backbone on the target, before any adaptation."""
    from downstream.recipes import finetune_reid
    from downstream.reid.cluster import read_clustering

    out = args.work / f"adapt_{source}_to_{target}"
    started = time.perf_counter()
    result = finetune_reid(REPO / "configs/reid/market_cluster.yaml", [
        f"out_dir={out}", f"data.path={data}", f"data.size=[{args.size[0]},{args.size[1]}]",
        f"train.epochs={args.epochs}", f"cluster.iters_per_epoch={iters}", f"cluster.eps={args.eps}",
        f"model.encoder_weights={weights}", f"train.seed={args.seed}",
        f"train.progress={str(not args.quiet).lower()}", "train.ckpt_every_steps=50"])
    clustering = read_clustering(out / "clusters.csv")
    before = {k: float(clustering[0][k]) for k in ("rank1", "mAP")}
    return {"after": result, "before": before, "clustering": clustering, "run": str(out),
            "minutes": (time.perf_counter() - started) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/Market-1501-mini")
    parser.add_argument("--work", type=Path, default=REPO / "runs/bench_reid_da")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    parser.add_argument("--size", default="64,32", help="crop H,W")
    parser.add_argument("--source-epochs", default="5,4",
                        help="supervised epochs on the synthetic set and on Market-1501-mini")
    parser.add_argument("--epochs", type=int, default=8, help="Cluster Contrast epochs")
    parser.add_argument("--iters", default="100,50",
                        help="Cluster Contrast steps per epoch on Market-1501-mini and on the synthetic set")
    parser.add_argument("--eps", type=float, default=0.5, help="DBSCAN radius")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    args.size = [int(v) for v in args.size.split(",")]
    synth_epochs, market_epochs = (int(v) for v in args.source_epochs.split(","))
    market_iters, synth_iters = (int(v) for v in args.iters.split(","))
    args.work.mkdir(parents=True, exist_ok=True)

    from twinview.data.synth import generate

    synthetic = args.work / "synthetic_market"
    if not synthetic.exists():
        generate("market", synthetic, seed=args.seed, size="medium")
    data = {"synthetic": synthetic, "market": args.data}
    sources = {"synthetic": supervised(args, "synthetic", synthetic, synth_epochs),
               "market": supervised(args, "market", args.data, market_epochs)}
    directions = {}
    plan = (("synthetic", "market", market_iters), ("market", "synthetic", synth_iters))
    for source, target, iters in plan:
        directions[f"{source}_to_{target}"] = {
            "source": source, "target": target,
            **adapt(args, source, target, data[target], sources[source]["run"], iters),
            "target_supervised": sources[target]}
    write_results(args, directions, sources, synth_epochs, market_epochs)


def write_results(args: argparse.Namespace, directions: dict, sources: dict, synth_epochs: int,
                  market_epochs: int) -> None:
    lines = ["| source (labels) -> target (no labels) | on target | rank-1 | mAP |", "|---|---|---:|---:|"]
    for d in directions.values():
        head = f"{NAMES[d['source']]} -> {NAMES[d['target']]}"
        rows = (("source model as is (direct transfer)", d["before"]),
                ("+ Cluster Contrast on the target, no labels", d["after"]),
                ("reference: trained with the target's labels", d["target_supervised"]))
        for label, r in rows:
            lines.append(f"| {head} | {label} | {r['rank1']:.3f} | {r['mAP']:.3f} |")
    command = ("python benchmarks/reid_domain_adaptation.py " + " ".join(sys.argv[1:])).strip()
    machine = f"{cpu_name()}, {cpu_cores()} cores, no GPU used"
    minutes = sum(s["minutes"] for s in sources.values()) + sum(d["minutes"] for d in directions.values())
    md = (f"# Re-ID domain adaptation without target labels\n\n"
          f"Command: `{command}`  \nMachine: {machine}  \n"
          f"Crops {args.size[0]}x{args.size[1]}, seed {args.seed}. Supervised models: strong baseline "
          f"(`configs/reid/market.yaml`, ResNet-18 from random init) for {synth_epochs} epochs on the "
          f"synthetic set and {market_epochs} on Market-1501-mini. Adaptation: Cluster Contrast "
          f"(`configs/reid/market_cluster.yaml`) for {args.epochs} epochs, eps {args.eps}. Each row is "
          f"scored on the target's query/gallery (Market-1501 protocol, cosine distance, flip averaging). "
          f"{minutes:.1f} min in this invocation.\n\n" + "\n".join(lines) + "\n")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "reid_domain_adaptation.md").write_text(md)
    (args.results / "reid_domain_adaptation.json").write_text(json.dumps(
        {"command": command, "machine": machine, "size": args.size, "seed": args.seed,
         "directions": directions, "sources": sources}, indent=2) + "\n")
    plot(directions, args.results / "reid_domain_adaptation.png")
    print(md)


def plot(directions: dict, out: Path) -> None:
    """Rank-1 on the target per adaptation epoch (epoch 0: the source model as loaded), beside the
    model trained with the target's labels."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), dpi=110)
    for i, d in enumerate(directions.values()):
        ax = fig.add_subplot(1, len(directions), i + 1)
        rows = [r for r in d["clustering"] if "rank1" in r]
        pts = [(int(r["epoch"]), float(r["rank1"])) for r in rows]
        pts.append((len(d["clustering"]), d["after"]["rank1"]))  # after the last epoch
        ax.plot(*zip(*pts, strict=True), "o-", label="adapted without labels")
        ax.plot([int(r["epoch"]) for r in d["clustering"]], [float(r["purity"]) for r in d["clustering"]],
                "s--", label="cluster purity")
        ax.axhline(d["target_supervised"]["rank1"], color="grey", ls=":", label="trained with target labels")
        ax.set(xlabel="epoch", ylabel="rank-1 on target", ylim=(0, 1),
               title=f"{NAMES[d['source']]} -> {NAMES[d['target']]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main()
