"""Do refactors move results? Short deterministic runs whose final weights are hashed and compared.

Runs, through the ``twinview`` command only (so the script reads the same before and after a change
of the library's insides), on synthetic data it generates:

* one short pretraining per method (SimCLR, MoCo v2, BYOL, SimSiam) with ``train.deterministic=true``;
* one short segmentation run (2D FlexibleUNet on synthetic MRI slices, with validation);
* one short re-ID run (strong baseline on synthetic crops).

Each run's final weights (``encoder.pt``, ``model.pt`` and the full state of the last checkpoint) are
hashed tensor by tensor (SHA-256 over names, dtypes, shapes and bytes). ``--record`` writes the hashes
to ``benchmarks/results/results_unchanged.json``; without it the script compares against that file,
prints a table and exits 1 if any hash differs. Hashes are exact: compare on the machine that recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "results_unchanged.json"
QUIET = ["train.progress=false", "train.device=cpu", "train.seed=0"]


def state_hash(state: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            digest.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def twinview(*args: str) -> None:
    cmd = [str(Path(sys.executable).parent / "twinview"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def last_checkpoint(run: Path) -> Path:
    return sorted(run.glob("ckpt-*.pt"))[-1]


def run_all(work: Path) -> dict[str, dict[str, str]]:
    market, msd = work / "market", work / "msd"
    twinview("data", "synth", "market", "--out", str(market), "--seed", "0")
    twinview("data", "synth", "msd", "--out", str(msd), "--seed", "0")
    hashes: dict[str, dict[str, str]] = {}
    for method in ("simclr", "moco", "byol", "simsiam"):
        run = work / f"pretrain_{method}"
        twinview("pretrain", "--config", str(REPO / f"configs/pretrain/market_{method}.yaml"), *sets([
            f"out_dir={run}", f"data.path={market}", "data.size=[32,16]", "data.workers=0",
            "train.batch_size=16", "train.epochs=2", "train.max_steps=5", "train.ckpt_every_steps=2",
            "train.knn_every_epochs=0", "train.deterministic=true", "train.channels_last=false",
            "method.queue_size=64", *QUIET]))
        ckpt = torch.load(last_checkpoint(run), weights_only=True)
        hashes[f"pretrain_{method}"] = {
            "encoder.pt": state_hash(torch.load(run / "encoder.pt", weights_only=True)["encoder"]),
            "checkpoint": state_hash(ckpt["model"]), "step": str(ckpt["step"])}
    seg = work / "seg"
    twinview("seg", "train", "--config", str(REPO / "configs/seg/hippocampus2d.yaml"), *sets([
        f"out_dir={seg}", f"data.path={msd}", "data.test_cases=2", "data.val_cases=1", "train.steps=6",
        "train.batch_size=4", "train.val_every_steps=3", "train.ckpt_every_steps=2", "optim.warmup_steps=2",
        "data.roi=[32,32]", *QUIET]))
    ckpt = torch.load(last_checkpoint(seg), weights_only=True)
    dice = json.loads((seg / "summary.json").read_text())["test"]["dice_mean"]
    hashes["seg"] = {"model.pt": state_hash(torch.load(seg / "model.pt", weights_only=True)["model"]),
                     "checkpoint": state_hash(ckpt["model"]), "step": str(ckpt["step"]),
                     "test_dice": f"{dice:.6f}"}
    reid = work / "reid"
    twinview("reid", "train", "--config", str(REPO / "configs/reid/market.yaml"), *sets([
        f"out_dir={reid}", f"data.path={market}", "data.size=[64,32]", "train.epochs=2", "train.p=4",
        "train.k=4", "train.ckpt_every_steps=2", f"model.encoder_weights={work / 'pretrain_moco'}", *QUIET]))
    ckpt = torch.load(last_checkpoint(reid), weights_only=True)
    hashes["reid"] = {"model.pt": state_hash(torch.load(reid / "model.pt", weights_only=True)["model"]),
                      "checkpoint": state_hash(ckpt["model"]), "step": str(ckpt["step"]),
                      "rank1": f"{json.loads((reid / 'eval.json').read_text())['rank1']:.6f}"}
    return hashes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="write the reference hashes")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    start = time.perf_counter()
    work = args.keep or Path(tempfile.mkdtemp(prefix="twinview-unchanged-"))
    try:
        hashes = run_all(work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    minutes = (time.perf_counter() - start) / 60
    if args.record:
        RESULTS.write_text(json.dumps(hashes, indent=2) + "\n")
        print(f"recorded {RESULTS} in {minutes:.1f} min")
        return 0
    reference = json.loads(RESULTS.read_text())
    print("| run | file | reference | now | equal |\n|---|---|---|---|---|")
    same = True
    for run, files in reference.items():
        for name, ref in files.items():
            now = hashes.get(run, {}).get(name, "missing")
            same &= now == ref
            print(f"| {run} | {name} | {ref[:12]} | {now[:12]} | {'yes' if now == ref else 'NO'} |")
    print(f"\n{'all equal' if same else 'RESULTS MOVED'} ({minutes:.1f} min)")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
