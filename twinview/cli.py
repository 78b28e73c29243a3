"""The ``twinview`` command. Each subcommand imports its layer lazily, so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from twinview.data.errors import DataError


def _cmd_inspect(args: argparse.Namespace) -> int:
    from twinview.data.inspect import inspect_path

    report = inspect_path(args.path)
    print(json.dumps(report, indent=2 if args.pretty else None))
    return 1 if report["problems"] else 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from twinview.data.synth import generate

    summary = generate(args.kind, Path(args.out), seed=args.seed, size=args.size)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from pretrain.config import PretrainConfig
    from pretrain.trainer import run_pretraining
    from twinview.config import load_config

    config = args.config
    if config is None and args.resume is not None:
        config = args.resume / "config.yaml"
    cfg = load_config(PretrainConfig, config, args.set)
    result = run_pretraining(cfg, resume=args.resume)
    print(json.dumps({"run_dir": str(result.run_dir), "steps": result.steps, "final_loss": result.final_loss,
                      "encoder": str(result.encoder_path), "monitor": result.monitor}, indent=2))
    return 0


def _cmd_views(args: argparse.Namespace) -> int:
    from pretrain.view_grid import save_view_grid_from_data

    out = save_view_grid_from_data(args.preset, args.data, args.out, n_samples=args.samples,
                                   size=tuple(args.size) if args.size else None, seed=args.seed,
                                   volumes=args.volumes)
    print(out)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from twinview.demo import run_demo

    return run_demo(Path(args.out), seed=args.seed, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twinview",
        description="Contrastive self-supervised learning for medical segmentation and person re-ID.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="inspect data sets and generate synthetic ones",
                          description="Inspect data in the standard layouts; generate synthetic data.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    inspect = data_sub.add_parser(
        "inspect", help="detect the layout, open every file, print a JSON report",
        description="Detect the layout of PATH (market1501, msd, nifti, dicom, images, dsb2018), open "
                    "every file and print one JSON object with counts and problems. Exit code 0 "
                    "without problems, 1 when problems were found, 2 when PATH is no readable layout.")
    inspect.add_argument("path", type=Path, help="data folder")
    inspect.add_argument("--pretty", action="store_true", help="indent the JSON")
    inspect.set_defaults(func=_cmd_inspect)

    synth = data_sub.add_parser(
        "synth", help="write a synthetic data set in a standard layout",
        description="Write a deterministic synthetic data set: msd (3D MRI-like volumes, MSD layout), "
                    "market (pedestrian crops, Market-1501 layout), nuclei (microscopy, DSB2018 layout).")
    synth.add_argument("kind", choices=("msd", "market", "nuclei"))
    synth.add_argument("--out", required=True, type=Path, help="new (or empty) output folder")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", choices=("small", "medium"), default="small")
    synth.set_defaults(func=_cmd_synth)

    pre = sub.add_parser(
        "pretrain", help="contrastive pretraining (SimCLR, MoCo v2, BYOL, SimSiam) on unlabelled data",
        description="Pretrain an encoder without labels. Under torchrun each process takes its share of "
                    "every batch (DistributedDataParallel). Writes checkpoints, metrics.csv, TensorBoard "
                    "logs, the resolved config.yaml, loss_curve.png and encoder.pt into the run folder.")
    pre.add_argument("--config", type=Path, help="YAML file, e.g. configs/pretrain/demo_market_simclr.yaml")
    pre.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    pre.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue the run in RUN_DIR from its newest checkpoint")
    pre.set_defaults(func=_cmd_pretrain)

    views = sub.add_parser("views", help="write a PNG grid of augmented views of a preset",
                           description="Show what a view preset (ct, mri, microscopy, reid, natural) does "
                                       "to a few samples of DATA.")
    views.add_argument("preset", choices=("ct", "mri", "microscopy", "reid", "natural"))
    views.add_argument("data", type=Path, help="data folder in any layout twinview reads")
    views.add_argument("--out", type=Path, required=True, help="PNG file to write")
    views.add_argument("--samples", type=int, default=4)
    views.add_argument("--size", type=int, nargs="+", help="output size, H W (or D H W)")
    views.add_argument("--seed", type=int, default=0)
    views.add_argument("--3d", dest="volumes", action="store_true",
                       help="MSD scans as 3D volumes (ct/mri presets) instead of 2D slices")
    views.set_defaults(func=_cmd_views)

    demo = sub.add_parser("demo", help="run the main job end to end on synthetic data",
                          description="Generate synthetic data and run every stage of twinview on it.")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="results folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true",
                      help="small data, one epoch: checks that every stage runs (used by the slow tests)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DataError as err:
        print(f"twinview: error: {err}", file=sys.stderr)
        return 2
