"""Pretraining throughput: twinview's trainer against lightly's implementation of each method.

Same backbone (torchvision ResNet-18), batch, resolution, head sizes and view recipe (the SimCLR
recipe, which lightly ships for every method), same symmetric losses, same optimiser, same data (JPEG
crops decoded on the fly, no loader workers, so the data path counts). twinview runs its real
trainer (``run_pretraining``, which logs the wall time of every step in ``metrics.csv``); lightly runs
the training step of its examples (fp32, default memory format). Each (implementation, method) runs
in its own process, so the peak resident memory is its own. The median step time after warm-up gives images/s.

    pip install -e ".[bench]"
    python benchmarks/pretrain_throughput.py                      # CPU-sized defaults
    python benchmarks/pretrain_throughput.py --batch 256 --size 128 --steps 50   # on a GPU

Writes ``benchmarks/results/pretrain_throughput_<device>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("simclr", "moco", "byol", "simsiam")
HEADS = {  # the papers' sizes, which both libraries default to
    "simclr": {"proj_hidden": 2048, "proj_out": 128},
    "moco": {"proj_hidden": 2048, "proj_out": 128, "queue_size": 4096},
    "byol": {"proj_hidden": 4096, "proj_out": 256, "pred_hidden": 4096},
    "simsiam": {"proj_hidden": 2048, "proj_out": 2048, "pred_hidden": 512},
}


def default_data() -> Path:
    real = REPO.parent / "shared" / "data" / "Market-1501-mini" / "bounding_box_train"
    if real.is_dir():
        return real
    from twinview.data.synth import generate

    out = Path(tempfile.mkdtemp()) / "market"
    generate("market", out, seed=0, size="medium")
    return out / "bounding_box_train"


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_twinview(method: str, args: argparse.Namespace) -> list[float]:
    from pretrain.config import PretrainConfig
    from pretrain.trainer import run_pretraining
    from twinview.config import load_config

    run = Path(tempfile.mkdtemp()) / "run"
    heads = [f"method.{k}={v}" for k, v in HEADS[method].items()]
    cfg = load_config(PretrainConfig, None, [
        f"out_dir={run}", f"data.path={args.data}", "data.kind=images", "data.views=natural",
        f"data.size=[{args.size},{args.size}]", "data.workers=0", f"method.name={method}", *heads,
        "optim.name=sgd", "optim.lr=0.06", "optim.warmup_epochs=0", f"train.batch_size={args.batch}",
        f"train.max_steps={args.warmup + args.steps}", "train.epochs=1000", "train.log_every_steps=1",
        "train.ckpt_every_steps=1000000", "train.knn_every_epochs=0", "train.progress=false"])
    run_pretraining(cfg)
    import csv

    with (run / "metrics.csv").open() as fh:
        return [args.batch / float(r["images_per_s"]) for r in csv.DictReader(fh)][args.warmup:]


def run_lightly(method: str, args: argparse.Namespace) -> list[float]:
    import copy

    import torch
    import torchvision
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss
    from lightly.models import modules, utils
    from lightly.transforms import SimCLRTransform
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    class Crops(Dataset):
        def __init__(self, folder: Path, transform) -> None:  # noqa: ANN001
            self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".png"})
            self.transform = transform

        def __len__(self) -> int:
            return len(self.paths)

        def __getitem__(self, i: int):  # noqa: ANN204
            return self.transform(Image.open(self.paths[i]).convert("RGB"))

    transform = SimCLRTransform(input_size=args.size, cj_strength=0.5, cj_bright=0.8, cj_contrast=0.8,
                                cj_sat=0.8, cj_hue=0.2, min_scale=0.08, gaussian_blur=0.5)
    loader = DataLoader(Crops(args.data, transform), batch_size=args.batch, shuffle=True, drop_last=True,
                        num_workers=0)
    backbone = torchvision.models.resnet18()
    backbone.fc = torch.nn.Identity()
    h = HEADS[method]
    if method == "simclr":
        head = modules.SimCLRProjectionHead(512, h["proj_hidden"], h["proj_out"])
        criterion = NTXentLoss(temperature=0.1)
    elif method == "moco":
        head = modules.MoCoProjectionHead(512, h["proj_hidden"], h["proj_out"])
        criterion = NTXentLoss(temperature=0.2, memory_bank_size=(h["queue_size"], h["proj_out"]))
    elif method == "byol":
        head = modules.BYOLProjectionHead(512, h["proj_hidden"], h["proj_out"])
        predictor = modules.BYOLPredictionHead(h["proj_out"], h["pred_hidden"], h["proj_out"])
        criterion = NegativeCosineSimilarity()
    else:
        head = modules.SimSiamProjectionHead(512, h["proj_hidden"], h["proj_out"])
        predictor = modules.SimSiamPredictionHead(h["proj_out"], h["pred_hidden"], h["proj_out"])
        criterion = NegativeCosineSimilarity()
    online = torch.nn.Sequential(backbone, head).to(device)
    params = list(online.parameters())
    if method in ("byol", "simsiam"):
        predictor = predictor.to(device)
        params += list(predictor.parameters())
    if method in ("moco", "byol"):
        momentum = copy.deepcopy(online)
        utils.deactivate_requires_grad(momentum)
    optimizer = torch.optim.SGD(params, lr=0.06 * args.batch / 256, momentum=0.9)

    times: list[float] = []
    tick = time.perf_counter()
    while len(times) < args.warmup + args.steps:
        for x0, x1 in loader:
            x0, x1 = x0.to(device), x1.to(device)
            if method == "simclr":
                loss = criterion(online(x0), online(x1))
            elif method == "moco":
                utils.update_momentum(online, momentum, 0.99)
                q0, q1 = online(x0), online(x1)
                with torch.no_grad():
                    k0, k1 = momentum(x0), momentum(x1)
                loss = 0.5 * (criterion(q0, k1) + criterion(q1, k0))  # symmetric, as twinview's
            elif method == "byol":
                utils.update_momentum(online, momentum, 0.99)
                p0, p1 = predictor(online(x0)), predictor(online(x1))
                with torch.no_grad():
                    z0, z1 = momentum(x0), momentum(x1)
                loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
            else:
                z0, z1 = online(x0), online(x1)
                loss = 0.5 * (criterion(predictor(z0), z1.detach()) + criterion(predictor(z1), z0.detach()))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - tick)
            tick = now
            if len(times) >= args.warmup + args.steps:
                break
    return times[args.warmup:]


def worker(impl: str, method: str, args: argparse.Namespace) -> None:
    times = (run_twinview if impl == "twinview" else run_lightly)(method, args)
    print(json.dumps({"median_step_s": statistics.median(times), "steps": len(times),
                      "peak_mb": peak_memory_mb()}))


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="folder of crops (default: Market-1501-mini "
                        "train from ../shared/data, else synthetic)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args)
        return
    args.data = args.data or default_data()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for method in args.methods:
        result = {}
        for impl in ("twinview", "lightly"):
            cmd = [sys.executable, __file__, "--worker", impl, method, "--data", str(args.data),
                   "--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
            result[impl] = json.loads(out.strip().splitlines()[-1])
            print(f"{method:8s} {impl:9s} {result[impl]}", flush=True)
        tw, li = result["twinview"], result["lightly"]
        rows.append({"method": method, "twinview_img_s": args.batch / tw["median_step_s"],
                     "lightly_img_s": args.batch / li["median_step_s"],
                     "ratio": li["median_step_s"] / tw["median_step_s"],
                     "twinview_peak_mb": tw["peak_mb"], "lightly_peak_mb": li["peak_mb"]})
    mem = "GPU peak allocated" if device == "cuda" else "peak RSS"
    lines = [f"# Pretraining throughput, twinview vs lightly ({device_name()})", "",
             f"ResNet-18, batch {args.batch}, {args.size}x{args.size} SimCLR-recipe views of "
             f"`{args.data}`, loader workers 0; median of {args.steps} steps after {args.warmup} warm-up; "
             f"images/s counts images (each gives two views). Memory: {mem}.", "",
             f"| method | twinview img/s | lightly img/s | ratio | twinview {mem} MB | lightly {mem} MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['method']} | {r['twinview_img_s']:.1f} | {r['lightly_img_s']:.1f} | {r['ratio']:.2f} | "
              f"{r['twinview_peak_mb']:.0f} | {r['lightly_peak_mb']:.0f} |" for r in rows]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    out = REPO / "benchmarks" / "results" / f"pretrain_throughput_{device}"
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"device": device_name(), "args": {
        k: str(v) for k, v in vars(args).items() if k != "worker"}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
