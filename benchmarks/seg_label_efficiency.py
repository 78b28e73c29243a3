"""Label efficiency on MSD Task04 Hippocampus: pretrained encoder against random init, few to all labels.

1. A fixed, seeded held-out test split (40 cases) is drawn once and written to ``split.json``.
2. SimCLR pretrains a 2D ResNet-18 on the slices of every *other* volume, without labels.
3. A 2D FlexibleUNet (same encoder) is fine-tuned at each label fraction from (a) that encoder and
   (b) random init, with the same seeds, labelled subsets, steps and schedule; the small fractions
   are repeated with several seeds (each seed draws its own labelled subset).
4. Every model is scored on the test cases in 3D (MONAI Dice, HD95 in mm). The table (mean and
   standard deviation over seeds) and a Dice-versus-labels plot go to ``benchmarks/results/``.

Every stage skips work already done and resumes a killed run from its last checkpoint, so the command
can be re-run after an interruption. The defaults took 77.9 min from scratch on 2 CPU cores, alone
(15.9 min pretraining, 61.8 min fine-tuning and scoring); on a GPU use e.g.
``--steps 0.05:2000,0.1:3000,0.25:4000,1.0:8000 --batch-size 32 --pretrain-epochs 100``.

    python benchmarks/seg_label_efficiency.py [--data ../shared/data/Task04_Hippocampus]
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

from twinview.provenance import cpu_cores, cpu_name  # noqa: E402 - after the sys.path entry

ARMS = {"pretrained": "SimCLR-pretrained encoder", "random": "random init (same network)"}


def parse_steps(text: str) -> dict[float, int]:
    return {float(k): int(v) for k, v in (item.split(":") for item in text.split(","))}


def pretrain_encoder(args: argparse.Namespace, test_ids: list[str], out: Path) -> Path:
    from downstream.recipes import pretrain

    return pretrain(REPO / "configs/pretrain/hippocampus2d_simclr.yaml", [
        f"out_dir={out / 'pretrain_simclr'}", f"data.path={args.data}", "model.small_stem=false",
        "data.workers=0", f"data.size=[{args.pretrain_size},{args.pretrain_size}]",
        f"train.epochs={args.pretrain_epochs}", f"train.batch_size={args.pretrain_batch}",
        "train.knn_every_epochs=0", "optim.warmup_epochs=1", f"train.progress={str(not args.quiet).lower()}"],
        exclude_cases=test_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/Task04_Hippocampus"))
    parser.add_argument("--work", type=Path, default=REPO / "runs/bench_seg_label_efficiency",
                        help="checkpoints and per-run results (resumable)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    parser.add_argument("--fractions", default="0.05,0.1,0.25,1.0")
    parser.add_argument("--steps", default="0.05:150,0.1:200,0.25:300,1.0:800",
                        help="training steps per label fraction")
    parser.add_argument("--seeds", type=int, default=3, help="seeds at fractions below 1")
    parser.add_argument("--full-seeds", type=int, default=1, help="seeds at fraction 1")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--test-cases", type=int, default=40)
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--pretrain-size", type=int, default=48)
    parser.add_argument("--pretrain-batch", type=int, default=128)
    parser.add_argument("--arms", default=",".join(ARMS), help="which starts to run: pretrained,random")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra fine-tuning config override (repeatable), e.g. "
                             "model.freeze_encoder_steps=50; use a separate --work folder")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--command", help="the command to quote in the results (when re-tabulating)")
    args = parser.parse_args()

    from downstream.seg.config import SegDataConfig
    from downstream.seg.data import make_split, read_task

    args.work.mkdir(parents=True, exist_ok=True)
    split_file = args.work / "split.json"
    task = read_task(SegDataConfig(path=args.data, kind="msd"))
    if not split_file.exists():
        split = make_split([c.case_id for c in task.cases],
                           SegDataConfig(path=args.data, test_cases=args.test_cases, val_cases=0), seed=0)
        split_file.write_text(json.dumps({"test": split["test"], "val": []}, indent=1) + "\n")
    test_ids = json.loads(split_file.read_text())["test"]
    started = time.perf_counter()
    encoder_dir = pretrain_encoder(args, test_ids, args.work)
    pretrain_s = time.perf_counter() - started

    steps = parse_steps(args.steps)
    fractions = [float(f) for f in args.fractions.split(",")]
    arms = args.arms.split(",")
    if unknown := set(arms) - set(ARMS):
        parser.error(f"--arms: unknown {sorted(unknown)}; choose from {list(ARMS)}")
    from downstream.recipes import label_efficiency

    plan = [(f, seed, [f"train.steps={steps[f]}", f"optim.warmup_steps={min(50, steps[f] // 10)}", *args.set])
            for f in fractions for seed in range(args.seeds if f < 1 else args.full_seeds)]
    common = [f"data.path={args.data}", f"data.split_file={split_file}",
              f"train.batch_size={args.batch_size}", "train.val_every_steps=0", "data.val_cases=0",
              f"train.progress={str(not args.quiet).lower()}"]
    results: dict[str, dict[float, list[dict]]] = {arm: {} for arm in arms}
    for s in label_efficiency(REPO / "configs/seg/hippocampus2d.yaml", args.work, encoder_dir, plan, common,
                              arms):
        results[s["arm"]].setdefault(s["fraction"], []).append(s)
        test = s["test"]
        print(f"{s['arm']:10s} labels {s['fraction']:>5g} ({s['train_cases']:3d} cases) seed {s['seed']}: "
              f"Dice {test['dice_mean']:.3f}  HD95 {test['hd95_mean']:.2f} mm", flush=True)
    write_results(args, results, fractions, steps, len(test_ids), pretrain_s)


def _stats(runs: list[dict], key: str) -> tuple[float, float]:
    values = [r["test"][key] for r in runs]
    return float(np.mean(values)), float(np.std(values))


def write_results(args: argparse.Namespace, results: dict, fractions: list[float], steps: dict[float, int],
                  n_test: int, pretrain_s: float) -> None:
    rows, table = [], []
    header = ("| labels | cases | init | seeds | mean Dice | per seed | empty-mask runs | Dice anterior | "
              "Dice posterior | HD95 (mm) | steps |")
    table += [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for fraction in fractions:
        for arm in results:
            runs = results[arm][fraction]
            dice, dice_sd = _stats(runs, "dice_mean")
            ant, _ = _stats(runs, "dice_Anterior")
            post, _ = _stats(runs, "dice_Posterior")
            hd, hd_sd = _stats(runs, "hd95_mean")
            cases = runs[0]["train_cases"]
            per_seed = [r["test"]["dice_mean"] for r in runs]
            empty = sum(d == 0.0 for d in per_seed)  # every test case predicted without the structure
            rows.append({"fraction": fraction, "cases": cases, "arm": arm, "seeds": len(runs), "dice": dice,
                         "dice_sd": dice_sd, "dice_anterior": ant, "dice_posterior": post, "hd95": hd,
                         "hd95_sd": hd_sd, "steps": steps[fraction],
                         "seconds": [r.get("seconds") for r in runs], "per_seed": per_seed,
                         "empty_mask_runs": empty})
            table.append(f"| {fraction:.0%} | {cases} | {ARMS[arm]} | {len(runs)} "
                         f"| {dice:.3f} ± {dice_sd:.3f} | {' / '.join(f'{d:.3f}' for d in per_seed)} "
                         f"| {empty} "
                         f"| {ant:.3f} | {post:.3f} | {hd:.2f} ± {hd_sd:.2f} | {steps[fraction]} |")
    gaps = []
    for f in fractions if len(results) == len(ARMS) else []:
        pre = next(r["dice"] for r in rows if r["fraction"] == f and r["arm"] == "pretrained")
        rnd = next(r["dice"] for r in rows if r["fraction"] == f and r["arm"] == "random")
        gaps.append(f"{f:.0%}: {pre - rnd:+.3f}")
    machine = f"{cpu_name()}, {cpu_cores()} cores, no GPU used"
    command = args.command or "python benchmarks/seg_label_efficiency.py " + " ".join(sys.argv[1:])
    md = (f"# Label efficiency on MSD Task04 Hippocampus (2D FlexibleUNet, ResNet-18)\n\n"
          f"Command: `{command.strip()}`  \nMachine: {machine}  \n"
          f"Test split: {n_test} fixed held-out cases, scored in 3D (MONAI Dice; HD95 in mm).  \n"
          f"Pretraining: SimCLR on the slices of the other volumes, no labels, {args.pretrain_epochs} epochs "
          f"at {args.pretrain_size}x{args.pretrain_size} "
          f"({pretrain_s / 60:.1f} min in this invocation; 0 when "
          f"reused).  \nFine-tuning: batch {args.batch_size}, AdamW, Dice+CE; mean ± sd over seeds.\n\n"
          + "\n".join(table) + "\n"
          + (f"\nPretrained minus random init, mean Dice: {', '.join(gaps)}\n" if gaps else ""))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "seg_label_efficiency.md").write_text(md)
    (args.results / "seg_label_efficiency.json").write_text(json.dumps(
        {"machine": machine, "command": command, "rows": rows}, indent=2) + "\n")
    plot(rows, args.results / "seg_label_efficiency.png")
    print(md)


def plot(rows: list[dict], out: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.add_subplot()
    for arm, label in ARMS.items():
        if not any(r["arm"] == arm for r in rows):
            continue
        pts = sorted((r["cases"], r["dice"], r["dice_sd"]) for r in rows if r["arm"] == arm)
        x, y, sd = (np.array(v) for v in zip(*pts, strict=True))
        ax.errorbar(x, y, yerr=sd, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training volumes")
    ax.set_ylabel("mean Dice on the test cases")
    ax.set_title("Hippocampus: Dice versus labels")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main()
