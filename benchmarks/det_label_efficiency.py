"""Detection on DSB2018 nuclei: the twinview-pretrained encoder against random init, few to all images.

1. A fixed, seeded split of the images (test and val) is drawn once and written to ``split.json``; the
   table names the test images.
2. SimCLR (microscopy views) pretrains a ResNet-18 on the *training* images only, without labels.
3. A Faster R-CNN (ResNet-18 + FPN, trainable BatchNorm) is fine-tuned at each fraction of the training
   images from (a) that encoder and (b) random init, with the same seeds, subsets, steps and schedule;
   the small fraction is repeated with several seeds (each draws its own subset).
4. Every model is scored on the test images with pycocotools (AP, AP50, AP75, AP small). The table (mean
   and standard deviation over seeds) and an AP50-versus-images plot go to ``benchmarks/results/``.

Every stage skips work already done and resumes a killed run, so the command can be re-run after an
interruption.

    python benchmarks/det_label_efficiency.py [--data ../shared/data/dsb2018-nuclei]
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

from downstream.recipes import label_tag, parse_steps, plot_label_efficiency  # noqa: E402 - after the sys.path entry
from twinview.provenance import cpu_cores, cpu_name  # noqa: E402

ARMS = {"pretrained": "SimCLR-pretrained encoder", "random": "random init (same network)"}
METRICS = ("AP50", "AP", "AP75", "AP_small")


def fixed_split(args: argparse.Namespace) -> tuple[Path, dict[str, list[str]], dict[str, str]]:
    """``split.json`` in the work folder (drawn once), its ids, and each image id's sample name."""
    from downstream.det.config import DetDataConfig
    from downstream.det.data import read_det_set, split_ids

    det_set = read_det_set(DetDataConfig(path=args.data, kind="dsb2018"))
    names = {str(image.id): image.path.stem for image in det_set.images}
    split_file = args.work / "split.json"
    if not split_file.exists():
        cfg = DetDataConfig(path=args.data, kind="dsb2018", test_cases=args.test_images,
                            val_cases=args.val_images)
        split = split_ids(det_set, cfg, seed=0)
        split_file.write_text(json.dumps({"test": split["test"], "val": split["val"]}, indent=1) + "\n")
    return split_file, json.loads(split_file.read_text()), names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/dsb2018-nuclei"))
    parser.add_argument("--work", type=Path, default=REPO / "runs/bench_det_label_efficiency",
                        help="checkpoints and per-run results (resumable)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    parser.add_argument("--fractions", default="0.25,1.0")
    parser.add_argument("--steps", default="0.25:200,1.0:400", help="training steps per fraction")
    parser.add_argument("--seeds", type=int, default=3, help="seeds at fractions below 1")
    parser.add_argument("--full-seeds", type=int, default=1, help="seeds at fraction 1")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--test-images", type=int, default=10)
    parser.add_argument("--val-images", type=int, default=5)
    parser.add_argument("--pretrain-epochs", type=int, default=200)
    parser.add_argument("--pretrain-batch", type=int, default=32)
    parser.add_argument("--arms", default=",".join(ARMS), help="which starts to run: pretrained,random")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    arms = args.arms.split(",")
    if unknown := set(arms) - set(ARMS):
        parser.error(f"--arms: unknown {sorted(unknown)}; choose from {list(ARMS)}")

    from downstream.recipes import encoder_starts, finetune_det, label_efficiency, pretrain

    args.work.mkdir(parents=True, exist_ok=True)
    split_file, split, names = fixed_split(args)
    held_out = [names[i] for i in split["test"] + split["val"]]
    progress = str(not args.quiet).lower()
    started = time.perf_counter()
    encoder_dir = pretrain(REPO / "configs/pretrain/nuclei_simclr.yaml", [
        f"out_dir={args.work / 'pretrain_simclr'}", f"data.path={args.data}",
        f"train.epochs={args.pretrain_epochs}", f"train.batch_size={args.pretrain_batch}",
        f"train.progress={progress}"], exclude_cases=held_out)
    pretrain_s = time.perf_counter() - started

    steps = parse_steps(args.steps)
    fractions = [float(f) for f in args.fractions.split(",")]
    plan = [(f, seed, [f"train.steps={steps[label_tag(f)]}",
                       f"optim.warmup_steps={min(50, steps[label_tag(f)] // 10)}"])
            for f in fractions for seed in range(args.seeds if f < 1 else args.full_seeds)]
    common = [f"data.path={args.data}", f"data.split_file={split_file}",
              f"train.batch_size={args.batch_size}", "train.val_every_steps=0", f"train.progress={progress}"]
    results: dict[str, dict[float, list[dict]]] = {arm: {} for arm in arms}
    starts = {arm: weights for arm, weights in encoder_starts(encoder_dir).items() if arm in arms}
    for s in label_efficiency(REPO / "configs/det/nuclei.yaml", args.work, starts, plan, common,
                              finetune=finetune_det):
        results[s["arm"]].setdefault(s["fraction"], []).append(s)
        print(f"{s['arm']:10s} images {s['fraction']:>5g} ({s['train_images']:3d}) seed {s['seed']}: "
              f"AP50 {s['AP50']:.3f}  AP {s['AP']:.3f}", flush=True)
    write_results(args, results, fractions, steps, [names[i] for i in split["test"]], pretrain_s)


def write_results(args: argparse.Namespace, results: dict, fractions: list[float], steps: dict[str, int],
                  test_names: list[str], pretrain_s: float) -> None:
    rows = []
    table = ["| images | init | seeds | AP50 | per seed | AP | AP75 | AP small | steps | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for fraction in fractions:
        for arm, runs in ((arm, results[arm][fraction]) for arm in results):
            values = {m: [r[m] or 0.0 for r in runs] for m in METRICS}  # null: nothing of that size
            stats = {m: (float(np.mean(v)), float(np.std(v))) for m, v in values.items()}
            minutes = sum(r["seconds"] for r in runs) / 60
            rows.append({"fraction": fraction, "train_images": runs[0]["train_images"], "arm": arm,
                         "seeds": len(runs), **{m: stats[m][0] for m in METRICS},
                         **{f"{m}_sd": stats[m][1] for m in METRICS},
                         "per_seed_AP50": [r["AP50"] for r in runs],
                         "steps": steps[label_tag(fraction)], "minutes": minutes})
            per_seed = " / ".join(f"{v:.3f}" for v in values["AP50"])
            table.append(f"| {fraction:.0%} ({runs[0]['train_images']}) | {ARMS[arm]} | {len(runs)} "
                         f"| {stats['AP50'][0]:.3f} ± {stats['AP50'][1]:.3f} "
                         f"| {per_seed} | {stats['AP'][0]:.3f} "
                         f"| {stats['AP75'][0]:.3f} | {stats['AP_small'][0]:.3f} "
                         f"| {steps[label_tag(fraction)]} "
                         f"| {minutes:.1f} |")
    machine = f"{cpu_name()}, {cpu_cores()} cores, no GPU used"
    command = "python benchmarks/det_label_efficiency.py " + " ".join(sys.argv[1:])
    md = (f"# Detection on DSB2018 nuclei (Faster R-CNN, ResNet-18 + FPN, configs/det/nuclei.yaml)\n\n"
          f"Command: `{command.strip()}`  \nMachine: {machine}  \n"
          f"Test images ({len(test_names)}, fixed): {', '.join(n[:12] for n in test_names)}  \n"
          f"Pretraining: SimCLR, microscopy views, on the training images only, no labels, "
          f"{args.pretrain_epochs} epochs ({pretrain_s / 60:.1f} min in this invocation; 0 when reused).  \n"
          f"Fine-tuning: batch {args.batch_size}, 256x256 crops, AdamW; pycocotools AP on the test images; "
          f"mean ± sd over seeds; minutes summed over seeds.\n\n" + "\n".join(table) + "\n")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "det_label_efficiency.md").write_text(md)
    (args.results / "det_label_efficiency.json").write_text(json.dumps(
        {"machine": machine, "command": command, "test_images": test_names, "rows": rows}, indent=2) + "\n")
    plot_label_efficiency(rows, ARMS, "train_images", "AP50", args.results / "det_label_efficiency.png",
                          xlabel="labelled training images", ylabel="AP50 on the test images",
                          title="DSB2018 nuclei: detection versus labels", figsize=(6, 4))
    print(md)


if __name__ == "__main__":
    main()
