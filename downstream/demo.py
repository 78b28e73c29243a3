"""``make demo``: every stage of twinview, end to end, on data the project generates itself.

Stages (each skipped when its results already exist, so a killed demo resumes where it stopped):
1. synthetic data in the standard layouts (Market-1501, MSD, DSB2018), each checked by ``inspect``;
2. contrastive pretraining (SimCLR) on the synthetic pedestrian crops, without labels, compared by
   query/gallery retrieval with the same encoder at random initialisation;
3. segmentation with few labels: SimCLR on the slices of the synthetic MRI volumes (no labels), then a
   2D FlexibleUNet fine-tuned on a few labelled volumes from that encoder and from random init, scored
   on held-out volumes (Dice, HD95);
4. re-ID with labels: the strong-baseline head trained from the stage-2 encoder and from random init,
   scored under the Market-1501 protocol;
5. the pretrained arms of stages 3 and 4 exported to ONNX (``models/``) for the browser apps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEG_VOLUMES, SEG_SEEDS, SEG_STEPS = 2, 3, 110  # stage 3: the few-label regime, mean and spread over seeds


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _data_stage(out: Path, seed: int, quick: bool) -> dict[str, Path]:
    from twinview.data.inspect import inspect_path
    from twinview.data.synth import generate

    paths = {}
    sizes = (("market", "small" if quick else "medium"), ("msd", "small" if quick else "medium"),
             ("nuclei", "small"))
    for kind, size in sizes:
        path = out / "data" / kind
        if not path.exists():
            generate(kind, path, seed=seed, size=size)
        report = inspect_path(path)
        (out / "data" / f"inspect_{kind}.json").write_text(json.dumps(report, indent=2) + "\n")
        if report["problems"]:
            raise RuntimeError(f"{path}: synthetic data has problems: {report['problems'][:3]}")
        print(f"  {kind:7s} {report['format']:11s} {path}  {_counts(report)}")
        paths[kind] = path
    return paths


def _counts(report: dict) -> str:
    if "splits" in report:
        splits = report["splits"].items()
        return ", ".join(f"{name}: {s['images']} images of {s['ids']} ids" for name, s in splits)
    return ", ".join(f"{k}: {v}" for k, v in report.items() if isinstance(v, int))


def _pretrain_stage(out: Path, market: Path, seed: int, quick: bool) -> dict:
    import torch

    from downstream.recipes import pretrain
    from engine.device import select_device
    from pretrain.config import PretrainConfig
    from pretrain.monitor import monitor_encoder
    from pretrain.trainer import build_model
    from twinview.config import load_config

    run_dir = out / "pretrain_simclr"
    overrides = [f"out_dir={run_dir}", f"data.path={market}", f"train.seed={seed}",
                 *(["train.epochs=1", "train.progress=false"] if quick else [])]
    pretrain(REPO / "configs/pretrain/demo_market_simclr.yaml", overrides)
    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/demo_market_simclr.yaml", overrides)
    pretrained = json.loads((run_dir / "monitor.json").read_text())
    torch.manual_seed(seed)
    random_encoder = build_model(cfg, spatial_dims=2).encoder
    device = select_device(cfg.train.device)
    baseline = monitor_encoder(cfg, random_encoder.to(device), device, None)
    summary = {"pretrained": pretrained, "random_init": baseline, "run_dir": str(run_dir),
               "loss_curve": str(run_dir / "loss_curve.png"),
               "embedding_map": str(run_dir / "embedding_map.png")}
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [("SimCLR pretrained (no labels)", pretrained), ("same encoder, random init", baseline)]
    print(f"  {'retrieval on synthetic query/gallery':38s} rank-1    mAP")
    for name, m in rows:
        print(f"  {name:38s} {m['rank1']:.3f}  {m['mAP']:.3f}")
    return summary


def _seg_stage(out: Path, msd: Path, seed: int, quick: bool) -> dict:
    import numpy as np

    from downstream.recipes import encoder_starts, label_efficiency, pretrain
    from downstream.seg.config import SegConfig
    from downstream.seg.data import make_split, read_task
    from twinview.config import load_config

    test_cases, labelled = (2, 1) if quick else (10, SEG_VOLUMES)
    seeds = [seed] if quick else [seed + i for i in range(SEG_SEEDS)]
    progress = str(not quick).lower()
    common = [f"data.path={msd}", f"data.test_cases={test_cases}", "data.val_cases=0",
              "train.val_every_steps=0", f"train.steps={4 if quick else SEG_STEPS}", "train.batch_size=16",
              "optim.warmup_steps=2", f"train.progress={progress}"]
    probe = load_config(SegConfig, REPO / "configs/seg/hippocampus2d.yaml", common)
    test_ids = make_split([c.case_id for c in read_task(probe.data).cases], probe.data, seed)["test"]
    # the test volumes stay unseen, even without labels
    pre_dir = pretrain(REPO / "configs/pretrain/hippocampus2d_simclr.yaml", [
        f"out_dir={out / 'pretrain_seg_simclr'}", f"data.path={msd}", "model.small_stem=false",
        "data.size=[48,48]", "data.workers=0", f"train.epochs={1 if quick else 3}",
        f"train.batch_size={32 if quick else 128}", "train.knn_every_epochs=0", "optim.warmup_epochs=1",
        f"train.progress={progress}"], exclude_cases=test_ids)
    rows = label_efficiency(REPO / "configs/seg/hippocampus2d.yaml", out / "seg", encoder_starts(pre_dir),
                            [(labelled, s, []) for s in seeds], common)
    results: dict = {"labelled_volumes": labelled, "test_volumes": test_cases, "seeds": seeds}
    title = f"segmentation, {labelled} labelled volume{'s' if labelled > 1 else ''}"
    print(f"  {title:38s} Dice            HD95 (mm)  ({len(seeds)} seeds, {test_cases} test volumes)")
    for arm, label in (("pretrained", "SimCLR-pretrained encoder"), ("random", "random init")):
        runs = [r for r in rows if r["arm"] == arm]
        dice = [r["test"]["dice_mean"] for r in runs]
        hd95 = [r["test"]["hd95_mean"] for r in runs]
        r = results[arm] = {"dice_mean": float(np.mean(dice)), "dice_sd": float(np.std(dice)),
                            "hd95_mean": float(np.mean(hd95)), "hd95_sd": float(np.std(hd95)), "runs": runs}
        print(f"  {label:38s} {r['dice_mean']:.3f} ± {r['dice_sd']:.3f}  "
              f"{r['hd95_mean']:5.2f} ± {r['hd95_sd']:.2f}")
    (out / "seg_summary.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _reid_stage(out: Path, market: Path, seed: int, quick: bool) -> dict:
    from downstream.recipes import finetune_reid

    results = {}
    for arm, weights in (("pretrained", out / "pretrain_simclr"), ("random", "")):
        results[arm] = finetune_reid(REPO / "configs/reid/market.yaml", [
            f"out_dir={out / f'reid_{arm}'}", f"data.path={market}", "data.size=[64,32]",
            f"train.seed={seed}",
            f"train.epochs={1 if quick else 5}", f"model.encoder_weights={weights}",
            f"train.progress={str(not quick).lower()}", *(["train.p=4"] if quick else [])])
    print(f"  {'re-ID, trained with identity labels':38s} rank-1    mAP")
    for arm, label in (("pretrained", "from the SimCLR encoder (stage 2)"), ("random", "from random init")):
        print(f"  {label:38s} {results[arm]['rank1']:.3f}  {results[arm]['mAP']:.3f}")
    (out / "reid_summary.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _export_stage(out: Path, seg: dict) -> dict[str, str]:
    from downstream.export import export_run

    models = out / "models"
    sources = {"reid.onnx": out / "reid_pretrained",
               "segmentation.onnx": Path(seg["pretrained"]["runs"][0]["run_dir"])}
    done = {}
    for name, run in sources.items():
        target = models / name
        exported = export_run(run, target, overwrite=True)
        done[name] = str(target)
        print(f"  {name:18s} from {run.name}: onnxruntime within {exported.max_abs_diff:.1e} of torch")
    return done


def run_demo(out: Path, seed: int = 0, quick: bool = False) -> int:
    """Run every stage into ``out``; ``quick`` shrinks data and training to a smoke test (CI)."""
    out.mkdir(parents=True, exist_ok=True)
    start = _stage("1/5 synthetic data (Market-1501, MSD and DSB2018 layouts), checked by inspect")
    paths = _data_stage(out, seed, quick)
    print(f"  done in {time.perf_counter() - start:.0f} s")
    start = _stage("2/5 SimCLR pretraining on the synthetic crops, no labels")
    _pretrain_stage(out, paths["market"], seed, quick)
    print(f"  done in {time.perf_counter() - start:.0f} s")
    start = _stage("3/5 segmentation with few labels: pretrained encoder against random init")
    seg = _seg_stage(out, paths["msd"], seed, quick)
    print(f"  done in {time.perf_counter() - start:.0f} s")
    start = _stage("4/5 re-ID (BNNeck, ID + triplet): pretrained encoder against random init")
    _reid_stage(out, paths["market"], seed, quick)
    print(f"  done in {time.perf_counter() - start:.0f} s")
    start = _stage("5/5 ONNX export of the pretrained models for the browser apps")
    models = _export_stage(out, seg)
    print(f"  done in {time.perf_counter() - start:.0f} s")
    print(f"\nResults are in {out.resolve()}:\n"
          f"  data/                    synthetic data sets and their inspect reports\n"
          f"  pretrain_simclr/         checkpoints, metrics.csv, loss_curve.png, embedding_map.png,\n"
          f"                           encoder.pt (weights for the downstream models)\n"
          f"  pretrain_summary.json    retrieval of the pretrained encoder against random init\n"
          f"  pretrain_seg_simclr/     SimCLR on the MRI slices (no labels)\n"
          f"  seg/runs/                segmentation runs: model.pt, model.json, test_metrics.csv, overlays/\n"
          f"  seg_summary.json         Dice and HD95 of both starts\n"
          f"  reid_pretrained/, reid_random/  re-ID runs: model.pt, eval.md, cmc_curve.png, top10.png\n"
          f"  reid_summary.json        rank-1, mAP and mINP of both starts\n"
          f"  models/                  the pretrained re-ID and segmentation models as ONNX")
    print(f"\nTwo browser apps run on {', '.join(Path(m).name for m in models.values())} "
          "(Ctrl-C stops them):\n"
          f"  .venv/bin/twinview app retrieval --demo-out {out}\n"
          f"  .venv/bin/twinview app segmentation --demo-out {out}")
    return 0
