"""Segmentation training on data larger than its memory budget: disk cache against the in-memory path.

A synthetic CT-like set (MSD layout: int16 Hounsfield units, air around a body, an organ-like blob as
the label) is written twice: a small set that fits in memory and a large one several times the budget.
Each run trains a 3D U-Net (``configs/seg/hippocampus3d.yaml`` settings, 64^3 patches) in a fresh process
and reports its peak resident memory (``ru_maxrss``) and steps/s after the first steps:

1. in memory (``data.cache=ram``, today's path) on the small set: the peer;
2. from the disk cache (``data.cache=disk``, ``data.cache_ram_gb`` the budget) on the large set, first
   run (it preprocesses every case into the cache) and second run (it reads the cache);
3. in memory on the large set: what the in-memory path would need for it.

    python benchmarks/seg_memory_budget.py [--large 48] [--budget-gb 0.15]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twinview.provenance import cpu_cores, cpu_name  # noqa: E402 - after the sys.path entry

SHAPE = (160, 160, 96)

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from downstream.seg.config import SegConfig
from downstream.seg.train import run_segmentation
from twinview.config import load_config

cfg = load_config(SegConfig, Path({repo!r}) / "configs/seg/hippocampus3d.yaml", {overrides!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
run_segmentation(cfg)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_rss_mb": peak / 1024, "rss_after_imports_mb": before / 1024, "seconds": seconds}}))
"""


def write_ct_set(root: Path, cases: int, seed: int) -> int:
    """``cases`` CT-like volumes in MSD layout; returns their size in bytes as float32."""
    import nibabel as nib

    if (root / "dataset.json").exists():
        return cases * int(np.prod(SHAPE)) * 4
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    training = []
    for i in range(cases):
        body = (grid[0] / 0.85) ** 2 + (grid[1] / 0.7) ** 2 < 1
        centre = rng.uniform(-0.3, 0.3, 3)
        organ = (((grid - centre[:, None, None, None]) / np.array([0.35, 0.3, 0.4])[:, None, None, None]) ** 2
                 ).sum(0) < 1
        hu = np.where(body, rng.normal(40, 15, SHAPE), -1000.0)
        hu[organ & body] += 60
        name = f"ct_{i:03d}.nii.gz"
        affine = np.diag([0.8, 0.8, 2.5, 1.0])
        nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image((organ & body).astype(np.uint8), affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "synthetic CT", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ"},
        "training": training, "test": []}))
    return cases * int(np.prod(SHAPE)) * 4


def run(args: argparse.Namespace, name: str, data: Path, extra: list[str]) -> dict:
    out = args.work / name
    overrides = [f"out_dir={out}", f"data.path={data}", "data.roi=[64,64,64]", "data.test_cases=0",
                 "data.val_cases=0", "data.label_fraction=1.0", "data.orientation=",
                 f"train.steps={args.steps}",
                 "train.batch_size=2", "train.val_every_steps=0", "train.progress=false",
                 f"train.ckpt_every_steps={args.steps}", "optim.warmup_steps=2", *extra]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    code = CHILD.format(repo=str(REPO), overrides=overrides)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows = (out / "metrics.csv").read_text().strip().splitlines()[1:]
    rates = [float(r.split(",")[4]) for r in rows][1:]  # images/s per logged interval, the first left out
    result["steps_per_s"] = float(np.median(rates)) / 2 if rates else float("nan")
    print(f"  {name}: {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs/bench_seg_memory")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    parser.add_argument("--small", type=int, default=8, help="volumes in the set that fits")
    parser.add_argument("--large", type=int, default=48, help="volumes in the set larger than the budget")
    parser.add_argument("--budget-gb", type=float, default=0.15, help="data.cache_ram_gb for the disk runs")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    small_bytes = write_ct_set(args.work / "ct_small", args.small, seed=1)
    large_bytes = write_ct_set(args.work / "ct_large", args.large, seed=2)
    cache = args.work / "cache"
    disk = ["data.cache=disk", f"data.cache_dir={cache}", f"data.cache_ram_gb={args.budget_gb}"]
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    runs = {"ram_small": run(args, "ram_small", args.work / "ct_small", []),
            "disk_large_first": run(args, "disk_large_first", args.work / "ct_large", disk),
            "disk_large_cached": run(args, "disk_large_cached", args.work / "ct_large", disk),
            "ram_large": run(args, "ram_large", args.work / "ct_large", [])}
    write_results(args, runs, small_bytes, large_bytes)


def write_results(args: argparse.Namespace, runs: dict, small_bytes: int, large_bytes: int) -> None:
    gb = 2**30
    labels = {"ram_small": f"in memory, small set ({args.small} volumes, {small_bytes / gb:.2f} GB)",
              "disk_large_first": f"disk cache, large set ({args.large} volumes, {large_bytes / gb:.2f} GB), "
                                  "first run (builds the cache)",
              "disk_large_cached": "disk cache, large set, second run (cache built)",
              "ram_large": "in memory, large set"}
    peer = runs["ram_small"]
    lines = ["| run | peak RSS (GB) | RSS after imports (GB) | steps/s | steps/s vs in-memory small "
             "| wall (s) |", "|---|---:|---:|---:|---:|---:|"]
    for key, label in labels.items():
        r = runs[key]
        ratio = r["steps_per_s"] / peer["steps_per_s"]
        lines.append(f"| {label} | {r['peak_rss_mb'] / 1024:.2f} | {r['rss_after_imports_mb'] / 1024:.2f} | "
                     f"{r['steps_per_s']:.2f} | {ratio:.2f} | {r['seconds']:.0f} |")
    command = ("python benchmarks/seg_memory_budget.py " + " ".join(sys.argv[1:])).strip()
    machine = f"{cpu_name()}, {cpu_cores()} cores, no GPU used"
    md = (f"# Segmentation training within a memory budget\n\nCommand: `{command}`  \nMachine: {machine}  \n"
          f"Synthetic CT-like volumes {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} (int16 on disk, float32 preprocessed: "
          f"{np.prod(SHAPE) * 4 / 2**20:.1f} MB each), 3D FlexibleUNet (ResNet-18), 64^3 patches, batch 2, "
          f"{args.steps} steps; disk runs with `data.cache_ram_gb={args.budget_gb}`. Peak RSS is the whole "
          f"process (Python, torch, model, data); steps/s is the median over the logged intervals after the "
          f"first.\n\n" + "\n".join(lines) + "\n")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "seg_memory_budget.md").write_text(md)
    (args.results / "seg_memory_budget.json").write_text(json.dumps(
        {"command": command, "machine": machine, "shape": SHAPE, "budget_gb": args.budget_gb,
         "small_bytes": small_bytes, "large_bytes": large_bytes, "runs": runs}, indent=2) + "\n")
    print(md)


if __name__ == "__main__":
    main()
