"""Recipes that chain runs: pretrain without labels, fine-tune from that encoder and from random init,
and the label-efficiency sweep. ``twinview demo`` and the benchmark scripts both run them, so what the
demo shows and what the benchmarks measure cannot drift apart.

Every step is idempotent: a finished run is reused, a killed one resumes, and a run folder made with
other settings stops the recipe with an error that names the keys (:class:`twinview.run_folder.RunFolder`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from twinview.config import load_config, to_dict
from twinview.run_folder import RunFolder


def _existing(run_dir: Path, final: str, cfg: Any) -> RunFolder | None:
    """The run already in ``run_dir`` (checked to match the config ``cfg``), or None when there is none."""
    run = RunFolder(run_dir, final)
    if not run_dir.is_dir() or not run.holds_run():
        return None
    return RunFolder.open(run_dir, final, to_dict(cfg), resume=True, defaults=to_dict(type(cfg)()))


def _timed_summary(cfg: Any, run: Callable[..., Any], scores: str) -> dict[str, Any]:
    """``summary.json`` of the run ``cfg`` describes: unless it exists, ``run`` trains (or resumes) and
    scores it, and the summary is the run's ``scores`` file plus the ``seconds`` that took."""
    run_dir = Path(cfg.out_dir)
    existing = _existing(run_dir, "model.pt", cfg)
    summary = run_dir / "summary.json"
    if existing is None or not summary.exists():
        started = time.perf_counter()
        run(cfg, resume=existing.path if existing is not None else None)
        data = json.loads((run_dir / scores).read_text())
        summary.write_text(json.dumps({**data, "seconds": time.perf_counter() - started}, indent=2) + "\n")
    return json.loads(summary.read_text())


def pretrain(config_file: Path, overrides: Sequence[str], exclude_cases: Iterable[str] = ()) -> Path:
    """A pretraining run's folder, trained (or resumed) unless it has finished; ``exclude_cases`` keeps
    MSD cases (a test split) out of the unlabelled data."""
    from pretrain.config import PretrainConfig
    from pretrain.trainer import run_pretraining

    cfg = load_config(PretrainConfig, config_file, [*overrides, f"data.exclude_cases={list(exclude_cases)}"])
    run = _existing(Path(cfg.out_dir), "encoder.pt", cfg)
    if run is None or not run.finished:
        run_pretraining(cfg, resume=run.path if run is not None else None)
    return Path(cfg.out_dir)


def finetune_seg(config_file: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """A segmentation run's ``summary.json`` (test Dice and HD95), trained and scored unless it was."""
    from downstream.seg.config import SegConfig
    from downstream.seg.train import run_segmentation

    return _timed_summary(load_config(SegConfig, config_file, overrides), run_segmentation, "summary.json")


def finetune_reid(config_file: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """A re-ID run's ``eval.json`` (CMC, mAP, mINP), trained and scored unless it was."""
    from downstream.reid.config import ReIDConfig
    from downstream.reid.train import run_reid

    cfg = load_config(ReIDConfig, config_file, overrides)
    run_dir = Path(cfg.out_dir)
    run = _existing(run_dir, "model.pt", cfg)
    if run is None or not (run_dir / "eval.json").exists():
        run_reid(cfg, resume=run.path if run is not None else None)
    return json.loads((run_dir / "eval.json").read_text())


def finetune_det(config_file: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """A detection run's ``summary.json`` (test AP, AP50, AP75, AP small; training images and time),
    trained and scored unless it was."""
    from downstream.det.config import DetConfig
    from downstream.det.train import run_detection

    return _timed_summary(load_config(DetConfig, config_file, overrides), run_detection, "eval.json")


def encoder_starts(encoder_dir: Path | str) -> dict[str, list[str]]:
    """The two starts of the classic comparison: a pretrained encoder and random init."""
    return {"pretrained": [f"model.encoder_weights={encoder_dir}"], "random": ["model.encoder_weights="]}


def label_tag(labels: float | int) -> str:
    """A plan entry's labels in a run folder name: ``f0.25`` for a fraction, ``n2`` for a count."""
    return f"n{labels}" if isinstance(labels, int) else f"f{labels:g}"


def label_efficiency(config: Path, work: Path, starts: Mapping[str, Sequence[str]],
                     plan: Iterable[tuple[float | int, int, Sequence[str]]], common: Sequence[str],
                     finetune: Any = finetune_seg) -> list[dict[str, Any]]:
    """Fine-tune (``finetune_seg`` or ``finetune_det`` with ``config``) every ``(labels, seed, overrides)``
    of ``plan`` from each start of ``starts`` (name -> the overrides that set its weights, e.g.
    :func:`encoder_starts`) into ``work/runs/<start>_<label_tag>_s<seed>``. ``labels`` is a fraction of the
    labelled training data (a float, ``data.label_fraction``) or a number of labelled cases (an int,
    ``data.label_cases``); the same seed draws the same labelled subset for every start. Returns one row
    per run: arm, labels, fraction (None for counts), seed and the run's summary."""
    rows = []
    for labels, seed, extra in plan:
        amount = f"data.label_cases={labels}" if isinstance(labels, int) else f"data.label_fraction={labels}"
        for arm, weights in starts.items():
            run_dir = work / "runs" / f"{arm}_{label_tag(labels)}_s{seed}"
            summary = finetune(config, [*common, f"out_dir={run_dir}", amount, f"train.seed={seed}", *weights,
                                        *extra])
            fraction = None if isinstance(labels, int) else labels
            rows.append({"arm": arm, "labels": labels, "fraction": fraction, "seed": seed,
                         "run_dir": str(run_dir), **summary})
    return rows


def parse_labels(token: str) -> float | int:
    """A label setting on a command line: ``n2`` -> 2 labelled cases, ``0.05`` -> 5 % of them."""
    return int(token[1:]) if token.startswith("n") else float(token)


def parse_steps(text: str) -> dict[str, int]:
    """``n1:100,1.0:800`` -> training steps per label setting, keyed by :func:`label_tag` (``n1``,
    ``f1``): as numbers, one labelled case and 100 % would be the same key."""
    return {label_tag(parse_labels(k)): int(v) for k, v in (item.split(":") for item in text.split(","))}


def plot_label_efficiency(rows: Sequence[Mapping[str, Any]], arms: Mapping[str, str], x: str, y: str,
                          out: Path, *, xlabel: str, ylabel: str, title: str, log_x: bool = False,
                          figsize: tuple[float, float] = (6.5, 4.2)) -> None:
    """One curve per start (``arms``: row ``arm`` -> legend) of ``y`` (± ``<y>_sd`` over seeds) against
    ``x``, saved to ``out``."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=110)
    ax = fig.add_subplot()
    for arm, label in arms.items():
        pts = sorted((r[x], r[y], r[f"{y}_sd"]) for r in rows if r["arm"] == arm)
        if pts:
            xs, ys, sd = (np.array(v) for v in zip(*pts, strict=True))
            ax.errorbar(xs, ys, yerr=sd, marker="o", capsize=3, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
