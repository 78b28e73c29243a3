"""Label efficiency on MSD Task04 Hippocampus: four starts of one 2D U-Net, from one labelled volume to all.

1. A fixed, seeded split is drawn once and written to ``split.json``: 40 test cases and a few validation
   cases; the labelled training subsets come from the rest.
2. Without labels, on the slices of every volume except the test cases:
   - SimCLR pretrains a ResNet-18 encoder (two augmentations of one slice are positives);
   - GCL pretrains the same encoder with positional positives (slices from the same quarter of different
     volumes; Chaitanya et al. 2020);
   - local contrast then pretrains the U-Net decoder on the fixed GCL encoder.
3. A 2D FlexibleUNet is fine-tuned from random init, the SimCLR encoder, the GCL encoder, and the GCL
   encoder with the pretrained decoder, with the same seeds, labelled subsets, steps and schedule. The
   labels are 1, 2 and 4 volumes and 5 %, 10 %, 25 % and 100 % of the training volumes; below 100 %
   every setting is repeated with 3 seeds (each draws its own subset). The weights scored are those of
   the step best on the validation cases (``train.final_weights=best``), never chosen on the test cases.
4. Every model is scored on the test cases in 3D (MONAI Dice, HD95 in mm). The table (mean and standard
   deviation over seeds, gains over random init) and a Dice-versus-labels plot go to ``benchmarks/results/``.

Every stage skips work already done and resumes a killed run from its last checkpoint, so the command
can be re-run after an interruption. On a GPU use longer schedules, e.g. ``--steps
n1:1000,n2:1000,n4:1500,0.05:2000,0.1:3000,0.25:4000,1.0:8000 --pretrain-epochs 100 --local-epochs 20``.

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

from downstream.recipes import (  # noqa: E402 - after the sys.path entry
    label_tag,
    parse_labels,
    parse_steps,
    plot_label_efficiency,
)
from twinview.provenance import cpu_cores, cpu_name  # noqa: E402

ARMS = {"random": "random init", "simclr": "SimCLR encoder", "gcl": "GCL encoder",
        "gcl_local": "GCL encoder + local decoder"}
DEFAULT_LABELS = "n1,n2,n4,0.05,0.1,0.25,1.0"
DEFAULT_STEPS = "n1:200,n2:200,n4:200,0.05:200,0.1:250,0.25:300,1.0:800"


def label_name(labels: float | int) -> str:
    return f"{labels} volume{'s' if labels != 1 else ''}" if isinstance(labels, int) else f"{labels:.0%}"


def pretrain_starts(args: argparse.Namespace, held_out: list[str], arms: list[str]
                    ) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Each arm's weight overrides, pretraining what they need; and the minutes each pretraining took in
    this invocation (0 when reused)."""
    from downstream.recipes import pretrain

    progress = f"train.progress={str(not args.quiet).lower()}"
    size = args.pretrain_size
    common = [f"data.path={args.data}", "data.workers=0", f"data.size=[{size},{size}]",
              f"train.epochs={args.pretrain_epochs}", f"train.batch_size={args.pretrain_batch}",
              "train.knn_every_epochs=0", "optim.warmup_epochs=1", progress]
    minutes: dict[str, float] = {}

    def run(name: str, config: str, overrides: list[str]) -> Path:
        started = time.perf_counter()
        out = pretrain(REPO / "configs/pretrain" / config, [f"out_dir={args.work / name}", *overrides],
                       exclude_cases=held_out)
        minutes[name] = (time.perf_counter() - started) / 60
        return out

    starts: dict[str, list[str]] = {"random": ["model.encoder_weights="]}
    if "simclr" in arms:
        simclr = run("pretrain_simclr", "hippocampus2d_simclr.yaml", [*common, "model.small_stem=false"])
        starts["simclr"] = [f"model.encoder_weights={simclr}"]
    if {"gcl", "gcl_local"} & set(arms):
        gcl = run("pretrain_gcl", "hippocampus2d_gcl.yaml", common)
        starts["gcl"] = [f"model.encoder_weights={gcl}"]
        if "gcl_local" in arms:
            local = run("pretrain_local", "hippocampus2d_local.yaml", [
                f"data.path={args.data}", "data.workers=0", f"model.encoder_weights={gcl}",
                f"train.epochs={args.local_epochs}", f"train.batch_size={args.local_batch}", progress])
            starts["gcl_local"] = [f"model.encoder_weights={local}", f"model.decoder_weights={local}"]
    return {arm: starts[arm] for arm in arms}, minutes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/Task04_Hippocampus"))
    parser.add_argument("--work", type=Path, default=REPO / "runs/bench_seg_label_efficiency",
                        help="checkpoints and per-run results (resumable)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    parser.add_argument("--labels", default=DEFAULT_LABELS,
                        help="labelled volumes (nK) and fractions of the training volumes")
    parser.add_argument("--steps", default=DEFAULT_STEPS, help="training steps per label setting")
    parser.add_argument("--seeds", type=int, default=3, help="seeds below 100 %% of the labels")
    parser.add_argument("--full-seeds", type=int, default=1, help="seeds at 100 %%")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--test-cases", type=int, default=40)
    parser.add_argument("--val-cases", type=int, default=5, help="validation cases that pick the step")
    parser.add_argument("--validations", type=int, default=4, help="validations per fine-tuning run")
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--pretrain-size", type=int, default=48)
    parser.add_argument("--pretrain-batch", type=int, default=128)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--local-batch", type=int, default=64)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"which starts to run, from {','.join(ARMS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra fine-tuning config override (repeatable); use a separate --work folder")
    parser.add_argument("--keep-other-labels", action="store_true",
                        help="keep the rows of label settings not run now from the existing results JSON")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--command", help="the command to quote in the results (when re-tabulating)")
    args = parser.parse_args()
    arms = args.arms.split(",")
    if unknown := set(arms) - set(ARMS):
        parser.error(f"--arms: unknown {sorted(unknown)}; choose from {list(ARMS)}")
    labels = [parse_labels(t) for t in args.labels.split(",")]
    steps = parse_steps(args.steps)
    if missing := [label_name(x) for x in labels if label_tag(x) not in steps]:
        parser.error(f"--steps gives no steps for {missing}")

    from downstream.recipes import label_efficiency
    from downstream.seg.config import SegDataConfig
    from downstream.seg.data import make_split, read_task

    args.work.mkdir(parents=True, exist_ok=True)
    split_file = args.work / "split.json"
    task = read_task(SegDataConfig(path=args.data, kind="msd"))
    if not split_file.exists():
        split = make_split([c.case_id for c in task.cases], SegDataConfig(
            path=args.data, test_cases=args.test_cases, val_cases=args.val_cases), seed=0)
        split_file.write_text(json.dumps({"test": split["test"], "val": split["val"]}, indent=1) + "\n")
    split = json.loads(split_file.read_text())
    starts, pretrain_minutes = pretrain_starts(args, split["test"], arms)

    def schedule(n: int) -> list[str]:
        return [f"train.steps={n}", f"optim.warmup_steps={min(50, n // 10)}",
                f"train.val_every_steps={max(1, n // args.validations)}", "train.final_weights=best",
                *args.set]

    plan = [(x, seed, schedule(steps[label_tag(x)])) for x in labels
            for seed in range(args.full_seeds if isinstance(x, float) and x == 1.0 else args.seeds)]
    common = [f"data.path={args.data}", f"data.split_file={split_file}",
              f"train.batch_size={args.batch_size}", f"data.val_cases={len(split['val'])}",
              f"train.progress={str(not args.quiet).lower()}"]
    results: dict[str, dict[str, list[dict]]] = {arm: {} for arm in arms}
    for s in label_efficiency(REPO / "configs/seg/hippocampus2d.yaml", args.work, starts, plan, common):
        results[s["arm"]].setdefault(label_tag(s["labels"]), []).append(s)
        print(f"{s['arm']:10s} {label_name(s['labels']):>10s} ({s['train_cases']:3d} cases) "
              f"seed {s['seed']}: Dice {s['test']['dice_mean']:.3f}  HD95 {s['test']['hd95_mean']:.2f} mm "
              f"(step {s['best']['step'] if s.get('best') else '-'})", flush=True)
    rows = result_rows(results, labels, steps, f"{cpu_name()}, {cpu_cores()} cores, no GPU used")
    if args.keep_other_labels:
        rows += _kept_rows(args.results / "seg_label_efficiency.json", labels)
    write_results(args, rows, split, pretrain_minutes)


def _stats(runs: list[dict], key: str) -> tuple[float, float]:
    values = [r["test"][key] for r in runs]
    return float(np.mean(values)), float(np.std(values))


def result_rows(results: dict, labels: list[float | int], steps: dict[str, int], machine: str) -> list[dict]:
    """One row per label setting and start: mean and sd over seeds, gain over random init."""
    rows = []
    for x in labels:
        base = _stats(results["random"][label_tag(x)], "dice_mean")[0] if "random" in results else None
        for arm in results:
            runs = results[arm][label_tag(x)]
            dice, dice_sd = _stats(runs, "dice_mean")
            hd, hd_sd = _stats(runs, "hd95_mean")
            rows.append({"labels": x, "cases": runs[0]["train_cases"], "arm": arm, "seeds": len(runs),
                         "dice": dice, "dice_sd": dice_sd,
                         "gain": None if base is None or arm == "random" else dice - base,
                         "dice_anterior": _stats(runs, "dice_Anterior")[0],
                         "dice_posterior": _stats(runs, "dice_Posterior")[0], "hd95": hd, "hd95_sd": hd_sd,
                         "steps": steps[label_tag(x)],
                         "selected_steps": [(r.get("best") or {}).get("step") for r in runs],
                         "per_seed": [r["test"]["dice_mean"] for r in runs],
                         "minutes": sum(r.get("seconds") or 0.0 for r in runs) / 60, "machine": machine})
    return rows


def _kept_rows(path: Path, labels: list[float | int]) -> list[dict]:
    """Rows of earlier invocations for the label settings this one did not run (their work folder may be
    gone); each keeps the machine it was measured on."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    tags = {label_tag(x) for x in labels}
    return [{**r, "machine": r.get("machine", old["machine"])} for r in old["rows"]
            if label_tag(r["labels"]) not in tags]


def _label_order(x: float | int) -> tuple[bool, float]:
    return isinstance(x, float), float(x)  # volume counts first, then fractions


def write_results(args: argparse.Namespace, rows: list[dict], split: dict,
                  pretrain_minutes: dict[str, float]) -> None:
    rows = sorted(rows, key=lambda r: (_label_order(r["labels"]), list(ARMS).index(r["arm"])))
    table = ["| labels | cases | init | seeds | mean Dice | gain over random | per seed | Dice anterior | "
             "Dice posterior | HD95 (mm) | steps | minutes |", "|---" * 12 + "|"]
    for r in rows:
        shown = "" if r["gain"] is None else f"{r['gain'] * 100:+.1f} points"
        table.append(f"| {label_name(r['labels'])} | {r['cases']} | {ARMS[r['arm']]} | {r['seeds']} "
                     f"| {r['dice']:.3f} ± {r['dice_sd']:.3f} | {shown} "
                     f"| {' / '.join(f'{d:.3f}' for d in r['per_seed'])} | {r['dice_anterior']:.3f} "
                     f"| {r['dice_posterior']:.3f} | {r['hd95']:.2f} ± {r['hd95_sd']:.2f} | {r['steps']} "
                     f"| {r['minutes']:.1f} |")
    machines: dict[str, list[str]] = {}
    for r in rows:
        names = machines.setdefault(r["machine"], [])
        if label_name(r["labels"]) not in names:
            names.append(label_name(r["labels"]))
    machine = (next(iter(machines)) if len(machines) == 1 else
               "; ".join(f"{m} ({', '.join(names)})" for m, names in machines.items()))
    command = args.command or "python benchmarks/seg_label_efficiency.py " + " ".join(sys.argv[1:])
    pre = ", ".join(f"{k.removeprefix('pretrain_')} {v:.1f}" for k, v in pretrain_minutes.items())
    md = (f"# Label efficiency on MSD Task04 Hippocampus (2D FlexibleUNet, ResNet-18)\n\n"
          f"Command: `{command.strip()}`  \nMachine: {machine}  \n"
          f"Split: {len(split['test'])} fixed held-out test cases, scored in 3D (MONAI Dice; HD95 in mm); "
          f"{len(split['val'])} validation cases pick the step of each run.  \n"
          f"Pretraining on the slices of the other volumes, no labels: SimCLR and GCL {args.pretrain_epochs} "
          f"epochs at {args.pretrain_size}x{args.pretrain_size}, local (decoder) {args.local_epochs} "
          f"epochs at 64x64; minutes in this invocation (0 when reused): {pre}.  \n"
          f"Fine-tuning: batch {args.batch_size}, AdamW, Dice+CE; mean ± sd over seeds; minutes summed over "
          f"seeds.\n\n" + "\n".join(table) + "\n")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "seg_label_efficiency.md").write_text(md)
    (args.results / "seg_label_efficiency.json").write_text(json.dumps(
        {"machine": machine, "command": command, "split": split, "pretrain_minutes": pretrain_minutes,
         "rows": rows}, indent=2) + "\n")
    plot_label_efficiency(rows, ARMS, "cases", "dice", args.results / "seg_label_efficiency.png",
                          xlabel="labelled training volumes", ylabel="mean Dice on the test cases",
                          title="Hippocampus: Dice versus labels", log_x=True)
    print(md)

if __name__ == "__main__":
    main()
