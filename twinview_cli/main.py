"""The ``twinview`` command: each subcommand parses, calls one library function and prints.

Subcommands import their layer lazily, so ``--help`` stays fast and needs no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twinview.errors import DataError, TwinviewError, display_path
from twinview.provenance import twinview_version
from twinview_cli.launch import DEMO_MODELS


def _cmd_inspect(args: argparse.Namespace) -> int:
    from twinview.data.case_folders import CasePatterns
    from twinview.data.inspect import LayoutOptions, inspect_path

    patterns = CasePatterns(tuple(args.image), args.label or "") if args.image else None
    options = LayoutOptions(patterns, args.mask_suffix, _mask_values(args.mask_values))
    report = inspect_path(args.path, options)
    print(json.dumps(report, indent=2 if args.pretty else None))
    return 1 if report["problems"] else 0


def _mask_values(text: str | None) -> dict[int, int] | None:
    """``"0:0,255:1"`` as ``{0: 0, 255: 1}``."""
    if not text:
        return None
    try:
        return {int(k): int(v) for k, v in (pair.split(":") for pair in text.split(","))}
    except ValueError:
        reason = f"--mask-values {text!r}: expected STORED:CLASS pairs, e.g. 0:0,255:1"
        raise DataError(None, reason) from None


def _cmd_convert(args: argparse.Namespace) -> int:
    from twinview.data.convert import convert

    print(json.dumps(convert(args.source, args.out, args.to), indent=2))
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from twinview.data.synth import generate

    print(json.dumps(generate(args.kind, Path(args.out), seed=args.seed, size=args.size), indent=2))
    return 0


def _cmd_coco(args: argparse.Namespace) -> int:
    from twinview.data.coco import coco_summary, dsb2018_coco, write_coco

    if args.out.suffix.lower() != ".json" or args.out.is_dir():
        raise DataError(args.out, "the output must be a .json file path")
    det_set = dsb2018_coco(args.root)
    print(json.dumps({"out": display_path(write_coco(det_set, args.out)), **coco_summary(det_set)}, indent=2))
    return 0


def _print_config(cfg: Any) -> int:
    import yaml

    from twinview.config import to_dict

    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from pretrain.config import PretrainConfig
    from twinview.config import run_config

    cfg = run_config(PretrainConfig, args.config, args.resume, args.set)
    if args.print_config:
        return _print_config(cfg)
    from pretrain.trainer import run_pretraining

    result = run_pretraining(cfg, resume=args.resume)
    print(json.dumps({"run_dir": str(result.run_dir), "steps": result.steps, "final_loss": result.final_loss,
                      "encoder": str(result.encoder_path), "monitor": result.monitor}, indent=2))
    return 0


def _cmd_seg_train(args: argparse.Namespace) -> int:
    from downstream.seg.config import SegConfig
    from twinview.config import run_config

    overrides = list(args.set)
    if args.label_fraction is not None:
        overrides.append(f"data.label_fraction={args.label_fraction}")
    if args.label_cases is not None:
        overrides.append(f"data.label_cases={args.label_cases}")
    cfg = run_config(SegConfig, args.config, args.resume, overrides)
    if args.print_config:
        return _print_config(cfg)
    from downstream.seg.train import run_segmentation

    result = run_segmentation(cfg, resume=args.resume)
    if result.table:
        print(result.table)
    print(json.dumps({"run_dir": str(result.run_dir), "steps": result.steps, "final_loss": result.final_loss,
                      "model": str(result.model_path), "test": result.summary}, indent=2))
    return 0


def _cmd_seg_predict(args: argparse.Namespace) -> int:
    from downstream.seg.predict import predict

    for row in predict(args.input, args.model, args.out, overlays=not args.no_overlays, device=args.device,
                       overwrite=args.overwrite):
        print(json.dumps(row))
    return 0


def _cmd_seg_eval(args: argparse.Namespace) -> int:
    from downstream.seg.predict import evaluate_run

    _, table = evaluate_run(args.model, args.out, data_path=args.data, split=args.split, device=args.device)
    print(f"{table}\n\nper-case metrics: {args.out / 'metrics.csv'}")
    return 0


def _cmd_det_train(args: argparse.Namespace) -> int:
    from downstream.det.config import DetConfig
    from twinview.config import run_config

    overrides = list(args.set)
    if args.label_fraction is not None:
        overrides.append(f"data.label_fraction={args.label_fraction}")
    cfg = run_config(DetConfig, args.config, args.resume, overrides)
    if args.print_config:
        return _print_config(cfg)
    from downstream.det.train import run_detection

    result = run_detection(cfg, resume=args.resume)
    print(json.dumps({"run_dir": str(result.run_dir), "steps": result.steps, "final_loss": result.final_loss,
                      "model": str(result.model_path), "test": result.test}, indent=2))
    return 0


def _cmd_det_eval(args: argparse.Namespace) -> int:
    from downstream.det.evaluate import evaluate_run

    metrics = evaluate_run(args.run, args.out, data=args.data, split=args.split, device=args.device)
    print(json.dumps({**metrics, "eval": str(args.out / "eval.json")}, indent=2))
    return 0


def _cmd_det_predict(args: argparse.Namespace) -> int:
    from downstream.det.predict import predict

    print(json.dumps(predict(args.run, args.images, args.out, device=args.device, draw_score=args.min_score),
                     indent=2))
    return 0


def _cmd_reid_train(args: argparse.Namespace) -> int:
    from downstream.reid.config import ReIDConfig
    from twinview.config import run_config

    cfg = run_config(ReIDConfig, args.config, args.resume, args.set)
    if args.print_config:
        return _print_config(cfg)
    from downstream.reid.train import run_reid

    result = run_reid(cfg, resume=args.resume)
    print(result.report)
    print(json.dumps({"run_dir": str(result.run_dir), "steps": result.steps, "final_loss": result.final_loss,
                      "model": str(result.model_path), **result.metrics}, indent=2))
    return 0


def _cmd_reid_eval(args: argparse.Namespace) -> int:
    given = [args.data is not None, args.query is not None, args.gallery is not None]
    if given not in ([True, False, False], [False, True, True]):
        args.parser.error("give --data MARKET_FOLDER, or --query PATH and --gallery PATH (one of the two)")
    from downstream.reid.evaluate import evaluate_run

    print(evaluate_run(args.model, args.data, args.out, metric=args.metric, rerank=args.rerank,
                       flip=not args.no_flip, size=args.size, device=args.device, query=args.query,
                       gallery=args.gallery))
    return 0


def _cmd_reid_index(args: argparse.Namespace) -> int:
    from downstream.reid.search import index_gallery

    print(json.dumps(index_gallery(args.gallery, args.model, args.out, device=args.device,
                                   overwrite=args.overwrite)))
    return 0


def _cmd_reid_query(args: argparse.Namespace) -> int:
    from downstream.reid.search import query_index

    for hit in query_index(args.index, args.image, args.k, args.model, device=args.device):
        print(json.dumps({"rank": hit.rank, "score": round(hit.score, 4), "path": hit.path, "pid": hit.pid,
                          "camid": hit.camid}))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from downstream.export import export_run

    done = export_run(args.run, args.out, overwrite=args.overwrite)
    print(json.dumps({"onnx": str(done.path), "task": done.task, "max_abs_diff": done.max_abs_diff,
                      "opset": done.card["export"]["opset"]}))
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    from twinview_cli.launch import launch

    return launch(args.app, args.model, getattr(args, "gallery", None), demo_out=args.demo_out,
                  port=args.port, max_upload_mb=args.max_upload_mb)


def _cmd_views(args: argparse.Namespace) -> int:
    from pretrain.view_grid import save_view_grid_from_data

    print(save_view_grid_from_data(args.preset, args.data, args.out, n_samples=args.samples,
                                   size=tuple(args.size) if args.size else None, seed=args.seed,
                                   volumes=args.volumes))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from downstream.demo import run_demo

    return run_demo(Path(args.out), seed=args.seed, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twinview",
        description="Contrastive self-supervised learning for medical segmentation and person re-ID.",
    )
    parser.add_argument("--version", action="version", version=f"twinview {twinview_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="inspect and convert data sets, generate synthetic ones",
                          description="Inspect data in the standard layouts; convert DSB2018 to COCO; "
                                      "generate synthetic data.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    inspect = data_sub.add_parser(
        "inspect", help="detect the layout, open every file, print a JSON report",
        description="Detect the layout of PATH (market1501, nnunet, msd, case_folders, image_pairs, nifti, "
                    "dicom, images, dsb2018, coco), open every file and print one JSON object with counts "
                    "and problems. Exit code 0 without problems, 1 when problems were found, 2 when PATH is "
                    "no readable layout.")
    inspect.add_argument("path", type=Path, help="data folder (or a COCO JSON file)")
    inspect.add_argument("--pretty", action="store_true", help="indent the JSON")
    inspect.add_argument("--image", action="append", metavar="PATTERN",
                         help="per-case folders: a file-name pattern per image channel, in order (repeat); "
                              "without it the patterns are guessed and reported")
    inspect.add_argument("--label", metavar="PATTERN", help="per-case folders: the label file's pattern")
    inspect.add_argument("--mask-suffix", help="image/mask pairs: the mask stem's suffix (default: found)")
    inspect.add_argument("--mask-values", metavar="STORED:CLASS,...",
                         help="image/mask pairs: stored mask value to class, e.g. 0:0,255:1")
    inspect.set_defaults(func=_cmd_inspect, parser=inspect)

    convert_cmd = data_sub.add_parser(
        "convert", help="rewrite a labelled set as nnU-Net raw, MSD, per-case folders or 2D pairs",
        description="Write the labelled volumes of SOURCE (an MSD task or an nnU-Net raw data set) in "
                    "another layout: nnunet (dataset.json, imagesTr/CASE_XXXX.nii.gz, labelsTr/), msd (4D "
                    "images for several channels) or case_folders (CASE/<channel>.nii.gz and "
                    "CASE/seg.nii.gz; prints the patterns that read them). Voxels and affines are kept. "
                    "A DSB2018 folder converts to image_pairs (images/<id>.png, masks/<id>_mask.png: the "
                    "union of the nucleus masks, 0/255).")
    convert_cmd.add_argument("source", type=Path, help="an MSD task, nnU-Net raw data set or DSB2018 folder")
    convert_cmd.add_argument("--to", required=True, choices=("nnunet", "msd", "case_folders", "image_pairs"))
    convert_cmd.add_argument("--out", required=True, type=Path, help="new (or empty) output folder")
    convert_cmd.set_defaults(func=_cmd_convert, parser=convert_cmd)

    synth = data_sub.add_parser(
        "synth", help="write a synthetic data set in a standard layout",
        description="Write a deterministic synthetic data set: msd (3D MRI-like volumes, MSD layout), "
                    "market (pedestrian crops, Market-1501 layout), nuclei (microscopy, DSB2018 layout).")
    synth.add_argument("kind", choices=("msd", "market", "nuclei"))
    synth.add_argument("--out", required=True, type=Path, help="new (or empty) output folder")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", choices=("small", "medium"), default="small")
    synth.set_defaults(func=_cmd_synth, parser=synth)

    coco_cmd = data_sub.add_parser(
        "coco", help="convert DSB2018 nuclei masks to a COCO detection JSON",
        description="Write one box per nucleus mask of the DSB2018 samples in ROOT as a COCO JSON "
                    "(category 1 'nucleus'; file names relative to the JSON's folder) and print a summary.")
    coco_cmd.add_argument("root", type=Path, help="DSB2018 folder")
    coco_cmd.add_argument("--out", required=True, type=Path, help="output .json file")
    coco_cmd.set_defaults(func=_cmd_coco, parser=coco_cmd)

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
    pre.add_argument("--print-config", action="store_true",
                     help="print the resolved config (file, --set, resumed run) and exit")
    pre.set_defaults(func=_cmd_pretrain, parser=pre)

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
    views.set_defaults(func=_cmd_views, parser=views)

    seg = sub.add_parser("seg", help="segmentation: fine-tune, predict, evaluate",
                         description="Segmentation with a MONAI U-Net fine-tuned from a pretrained encoder.")
    seg_sub = seg.add_subparsers(dest="seg_command", required=True, metavar="ACTION")
    seg_train = seg_sub.add_parser(
        "train", help="fine-tune a segmentation model and evaluate it on the held-out test cases",
        description="Train on a seeded subset of the labelled cases (data.label_fraction), validate by "
                    "sliding windows, then evaluate on the fixed test split. The run folder holds "
                    "config.yaml, split.json, checkpoints, metrics.csv, loss_curve.png, model.pt, "
                    "test_metrics.csv, summary.json and overlays/.")
    seg_train.add_argument("--config", type=Path, help="YAML file, e.g. configs/seg/hippocampus2d.yaml")
    seg_train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config value, e.g. --set model.encoder_weights=runs/pre "
                                "(repeatable)")
    seg_train.add_argument("--label-fraction", type=float, metavar="F",
                           help="train on this fraction of the labelled cases "
                                "(same as --set data.label_fraction=F)")
    seg_train.add_argument("--label-cases", type=int, metavar="N",
                           help="train on N labelled cases, overriding the fraction "
                                "(same as --set data.label_cases=N)")
    seg_train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    seg_train.add_argument("--print-config", action="store_true",
                     help="print the resolved config (file, --set, resumed run) and exit")
    seg_train.set_defaults(func=_cmd_seg_train, parser=seg_train)
    seg_pred = seg_sub.add_parser(
        "predict", help="write masks (NIfTI with the input's affine, or PNG) and overlay PNGs",
        description="Segment INPUT (a NIfTI file, a folder of them, an MSD task folder, or 2D images) with "
                    "a trained run into a new folder OUT (never an input's): <case>_mask.nii.gz (or .png), "
                    "overlays/<case>.png, volumes.csv (structure volumes in mL from the voxel spacing) and "
                    "predictions.json.")
    seg_pred.add_argument("input", type=Path)
    seg_pred.add_argument("--model", type=Path, required=True, metavar="RUN", help="run folder or model.pt")
    seg_pred.add_argument("--out", type=Path, required=True)
    seg_pred.add_argument("--no-overlays", action="store_true")
    seg_pred.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    seg_pred.add_argument("--overwrite", action="store_true",
                          help="replace an earlier prediction folder written by twinview")
    seg_pred.set_defaults(func=_cmd_seg_predict, parser=seg_pred)
    seg_eval = seg_sub.add_parser(
        "eval", help="Dice and HD95 (mm) per structure: print the table, write it as CSV",
        description="Evaluate a trained run on its own split (--split test|val|train) or on all labelled "
                    "cases of --data. Writes metrics.csv (per case), metrics.md, summary.json and overlays.")
    seg_eval.add_argument("--model", type=Path, required=True, metavar="RUN")
    seg_eval.add_argument("--out", type=Path, required=True)
    seg_eval.add_argument("--data", help="labelled data folder (default: the run's own data)")
    seg_eval.add_argument("--split", default="test", choices=("test", "val", "train", "all"))
    seg_eval.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    seg_eval.set_defaults(func=_cmd_seg_eval, parser=seg_eval)

    det = sub.add_parser("det", help="object detection: fine-tune, evaluate, predict",
                         description="Object detection (Faster R-CNN or RetinaNet) on a pretrained encoder.")
    det_sub = det.add_subparsers(dest="det_command", required=True, metavar="ACTION")
    det_train = det_sub.add_parser(
        "train", help="fine-tune a detector and evaluate it on the held-out test images",
        description="Train on a seeded subset of the labelled images (data.label_fraction), keep best.pt by "
                    "val AP50, then evaluate on the fixed test split. The run folder holds config.yaml, "
                    "split.json, checkpoints, metrics.csv, loss_curve.png, model.pt, model.json, eval.json "
                    "and results.json.")
    det_train.add_argument("--config", type=Path, help="YAML file, e.g. configs/det/nuclei.yaml")
    det_train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config value, e.g. --set model.encoder_weights=runs/pre "
                                "(repeatable)")
    det_train.add_argument("--label-fraction", type=float, metavar="F",
                           help="train on this fraction of the labelled images "
                                "(same as --set data.label_fraction=F)")
    det_train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    det_train.add_argument("--print-config", action="store_true",
                           help="print the resolved config (file, --set, resumed run) and exit")
    det_train.set_defaults(func=_cmd_det_train, parser=det_train)
    det_eval = det_sub.add_parser(
        "eval", help="COCO AP, AP50, AP75, AP_small on a run's test images or on other labelled data",
        description="Evaluate RUN (a run folder, its model.pt or best.pt) with pycocotools on its own split "
                    "(--split, default test) or on all images of --data (a COCO JSON file or a DSB2018 "
                    "folder). Writes eval.json and results.json (COCO results).")
    det_eval.add_argument("run", type=Path, metavar="RUN")
    det_eval.add_argument("--data", help="labelled data (default: the run's own)")
    det_eval.add_argument("--split", choices=("test", "val", "train", "all"),
                          help="images to evaluate (default: test, or all of --data)")
    det_eval.add_argument("--out", type=Path, required=True)
    det_eval.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    det_eval.set_defaults(func=_cmd_det_eval, parser=det_eval)
    det_pred = det_sub.add_parser(
        "predict", help="detect in images: COCO results JSON and PNGs with the boxes drawn",
        description="Detect in IMAGES (an image, a folder of images, or a COCO JSON file whose true boxes "
                    "are drawn too) with RUN into OUT: results.json (COCO results), images.json and "
                    "boxes/<image>.png.")
    det_pred.add_argument("run", type=Path, metavar="RUN")
    det_pred.add_argument("images", type=Path, metavar="IMAGES")
    det_pred.add_argument("--out", type=Path, required=True, metavar="DIR")
    det_pred.add_argument("--min-score", type=float, default=0.5,
                          help="draw detections scoring at least this (results.json keeps all)")
    det_pred.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    det_pred.set_defaults(func=_cmd_det_predict, parser=det_pred)

    reid = sub.add_parser("reid", help="person re-ID: train, evaluate, index a gallery, query it",
                          description="Person re-identification on a pretrained encoder (strong baseline).")
    reid_sub = reid.add_subparsers(dest="reid_command", required=True, metavar="ACTION")
    reid_train = reid_sub.add_parser(
        "train", help="train BNNeck + ID/triplet head on bounding_box_train, evaluate on query/gallery",
        description="Fine-tune a re-ID model (optionally from model.encoder_weights) with P x K batches, "
                    "then evaluate it under the Market-1501 protocol. Writes config.yaml, checkpoints, "
                    "metrics.csv, loss_curve.png, model.pt, eval.json, eval.md, cmc_curve.png, top10.png.")
    reid_train.add_argument("--config", type=Path, help="YAML file, e.g. configs/reid/market.yaml")
    reid_train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config value (repeatable)")
    reid_train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    reid_train.add_argument("--print-config", action="store_true",
                     help="print the resolved config (file, --set, resumed run) and exit")
    reid_train.set_defaults(func=_cmd_reid_train, parser=reid_train)
    reid_eval = reid_sub.add_parser(
        "eval", help="CMC, mAP and mINP on query/gallery; CMC curve and top-10 PNGs",
        description="Evaluate a re-ID run (model.pt) or, with no labels at all, a pretraining run "
                    "(encoder.pt) under the Market-1501 protocol, on a Market-1501 folder (--data) or on "
                    "a query set and a gallery of your own (--query and --gallery: each a folder of images "
                    "or a CSV path,person_id[,camera]). Same-camera matches are ignored only when both "
                    "sides give cameras; without person ids nothing is scored and top10.png shows the "
                    "nearest gallery crops.")
    reid_eval.add_argument("--model", type=Path, required=True, metavar="RUN")
    reid_eval.add_argument("--data", type=Path, metavar="MARKET_FOLDER",
                           help="Market-1501 folder: query/ against bounding_box_test/")
    reid_eval.add_argument("--query", type=Path, metavar="PATH",
                           help="instead of --data: the query crops, a folder of images or a .csv file")
    reid_eval.add_argument("--gallery", type=Path, metavar="PATH",
                           help="with --query: the gallery, a folder of images or a .csv file")
    reid_eval.add_argument("--out", type=Path, required=True)
    reid_eval.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine")
    reid_eval.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (k1=20, k2=6, 0.3)")
    reid_eval.add_argument("--no-flip", action="store_true", help="do not average with mirrored crops")
    reid_eval.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                           help="crop size (default: the model's)")
    reid_eval.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    reid_eval.set_defaults(func=_cmd_reid_eval, parser=reid_eval)
    reid_index = reid_sub.add_parser(
        "index", help="embed a gallery folder into a faiss index",
        description="Embed every crop of GALLERY with RUN's model into a faiss index folder holding the "
                    "paths, person ids and cameras (null where unknown) and the model's fingerprint. "
                    "GALLERY is a folder of images (subfolders included; ids and cameras from Market-1501 "
                    "names when every name is one) or a CSV path,person_id[,camera].")
    reid_index.add_argument("gallery", type=Path, help="a folder of images or a .csv file")
    reid_index.add_argument("--model", type=Path, required=True, metavar="RUN")
    reid_index.add_argument("--out", type=Path, required=True, metavar="INDEX")
    reid_index.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    reid_index.add_argument("--overwrite", action="store_true",
                            help="replace an earlier index folder written by twinview")
    reid_index.set_defaults(func=_cmd_reid_index, parser=reid_index)
    reid_query = reid_sub.add_parser(
        "query", help="the k most similar gallery crops to an image",
        description="Rank the indexed gallery for IMAGE with the index's own model (refused if that "
                    "model's weights changed). Prints one JSON line per hit.")
    reid_query.add_argument("index", type=Path)
    reid_query.add_argument("image", type=Path)
    reid_query.add_argument("-k", type=int, default=10)
    reid_query.add_argument("--model", type=Path, metavar="RUN", help="override the index's model file")
    reid_query.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    reid_query.set_defaults(func=_cmd_reid_query, parser=reid_query)

    export = sub.add_parser(
        "export", help="write a run's network as one ONNX file carrying its model card",
        description="Export the network of RUN (a pretraining run's encoder, a segmentation run or a re-ID "
                    "run; or its encoder.pt/model.pt) to one self-contained ONNX file with a dynamic batch "
                    "axis and the run's model card in its metadata. onnxruntime is checked against torch "
                    "on a real-shaped batch; above 1e-4 nothing is written.")
    export.add_argument("run", type=Path, metavar="RUN")
    export.add_argument("--out", type=Path, required=True, metavar="FILE.onnx")
    export.add_argument("--overwrite", action="store_true", help="replace an existing file")
    export.set_defaults(func=_cmd_export, parser=export)

    app = sub.add_parser("app", help="start a browser app (retrieval or segmentation) on an ONNX model",
                         description="Serve a Streamlit app on localhost from a model written by `twinview "
                                     "export` (onnxruntime, no torch). Without --model the demo's export is "
                                     "used (demo_out/models/).")
    app_sub = app.add_subparsers(dest="app", required=True, metavar="APP")
    for name, what in (("retrieval", "rank a gallery of person crops for a query"),
                       ("segmentation", "segment an uploaded scan or image, with overlays and volumes")):
        one = app_sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        one.add_argument("--model", type=Path, metavar="FILE.onnx",
                         help=f"exported model (default: DEMO_OUT/{DEMO_MODELS[name]})")
        if name == "retrieval":
            one.add_argument("--gallery", type=Path, metavar="DIR",
                             help="a folder of images, a Market-1501 root or a `twinview reid index` folder "
                                  "(default: DEMO_OUT/data/market)")
        one.add_argument("--demo-out", type=Path, default=Path("demo_out"), metavar="DEMO_OUT",
                         help="where `make demo` wrote its results")
        one.add_argument("--port", type=int, default=8501)
        one.add_argument("--max-upload-mb", type=int, default=None,
                         help="largest upload accepted (default: 20 for retrieval, 512 for segmentation)")
        one.set_defaults(func=_cmd_app, parser=one)

    demo = sub.add_parser("demo", help="run the main job end to end on synthetic data",
                          description="Generate synthetic data and run every stage of twinview on it.")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="results folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true",
                      help="small data, one epoch: checks that every stage runs (used by the slow tests)")
    demo.set_defaults(func=_cmd_demo, parser=demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a user's mistake is one line on stderr and exit code 2."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # report a mistyped flag with the usage of the subcommand it was given to
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args))
    except TwinviewError as err:
        print(f"twinview: error: {err}", file=sys.stderr)
    except OSError as err:
        if err.filename is None:
            raise
        print(f"twinview: error: {display_path(err.filename)}: {err.strerror}", file=sys.stderr)
    return 2
