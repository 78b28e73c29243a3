"""onnxruntime against torch eager on the CPU, for the networks the apps run.

Each network is exported with ``twinview export`` (from a run folder written here with random weights:
speed does not depend on the weights), then timed on the same input by torch eager (``torch.no_grad``,
eval mode) and by an onnxruntime session (all graph optimisations, intra-op threads = cores):

* re-ID (ResNet-18, last stride 1, BNNeck) on 128x64 crops, batch 1 and 32;
* segmentation, 2D FlexibleUNet on 64x64 slices, batch 1 and 16;
* segmentation, 3D U-Net (MONAI's residual UNet) on one 48x48x48 patch, batch 1 and 4.

The 3D FlexibleUNet does not export (MONAI's 3D ResNet builds its shortcut padding from the batch size),
so volumes are served by the 3D U-Net.

Medians of repeated calls after warm-up, the ratio torch / onnxruntime (above 1: onnxruntime faster) and
the largest absolute difference of the outputs. Writes ``benchmarks/results/onnx_vs_torch.{md,json}``.

    python benchmarks/onnx_vs_torch.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from twinview.provenance import cpu_cores, cpu_name

REPO = Path(__file__).resolve().parents[1]


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def reid_run(folder: Path) -> torch.nn.Module:
    from downstream.reid.model import ReIDModel
    from engine.checkpoint import atomic_save
    from pretrain.views import preset_metadata
    from twinview.model_card import write_card_for

    model = ReIDModel(100, "resnet18", last_stride=1, pooling="avg").eval()
    meta = {"encoder": "resnet18", "last_stride": 1, "pooling": "avg", "num_classes": 100, "size": [128, 64],
            "source": "reid", "encoder_weights": "", "preprocessing": preset_metadata("reid", (128, 64))}
    atomic_save({"model": model.state_dict(), "model_config": meta}, folder / "model.pt")
    write_card_for(folder / "model.pt", meta, "reid")
    return model


def seg_run(folder: Path, dims: int, roi: list[int], arch: str = "flexunet") -> torch.nn.Module:
    from downstream.seg.config import SegModelConfig
    from downstream.seg.model import build_seg_model
    from engine.checkpoint import atomic_save
    from twinview.model_card import write_card_for

    net = build_seg_model(SegModelConfig(arch=arch), dims, 1, 3).eval()
    meta = {"arch": arch, "encoder": "resnet18", "unet_channels": [32, 64, 128, 256, 512],
            "spatial_dims": dims, "in_channels": 1, "out_channels": 3,
            "labels": {"0": "background", "1": "anterior", "2": "posterior"}, "task": "Hippocampus",
            "kind": "msd", "modality": "MRI", "encoder_weights": "", "roi": roi,
            "preprocessing": {"intensity": {"kind": "zscore_nonzero"}, "resize": "sliding_window",
                              "orientation": "RAS", "spacing": None, "slice_axis": 2 if dims == 2 else None,
                              "channel_policy": "as stored"}}
    atomic_save({"model": net.state_dict(), "model_config": meta}, folder / "model.pt")
    write_card_for(folder / "model.pt", meta, "segmentation")
    return net


def main() -> None:
    import onnxruntime as ort

    from downstream.export import export_run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    started = time.perf_counter()
    cores = cpu_cores()
    torch.set_num_threads(cores)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = cores
    rows = []
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="twinview-onnx-bench-") as tmp:
        work = Path(tmp)
        cases = [("re-ID ResNet-18, 128x64", reid_run(work / "reid"), "reid",
                  [(1, 3, 128, 64), (32, 3, 128, 64)]),
                 ("2D FlexibleUNet, 64x64 slices", seg_run(work / "seg2d", 2, [64, 64]), "seg2d",
                  [(1, 1, 64, 64), (16, 1, 64, 64)]),
                 ("3D U-Net, 48x48x48 patches", seg_run(work / "seg3d", 3, [48, 48, 48], "unet"), "seg3d",
                  [(1, 1, 48, 48, 48), (4, 1, 48, 48, 48)])]
        for name, model, folder, shapes in cases:
            exported = export_run(work / folder, work / f"{folder}.onnx")
            session = ort.InferenceSession(str(exported.path), options, providers=["CPUExecutionProvider"])
            for shape in shapes:
                x = torch.randn(*shape)
                feed = {"input": x.numpy()}
                with torch.no_grad():
                    eager = median_ms(lambda x=x, model=model: model(x), args.repeats)
                    want = model(x).numpy()
                onnx_ms = median_ms(lambda feed=feed, s=session: s.run(None, feed), args.repeats)
                diff = float(np.max(np.abs(session.run(None, feed)[0] - want)))
                rows.append({"network": name, "batch": shape[0], "torch_ms": eager, "onnxruntime_ms": onnx_ms,
                             "speedup": eager / onnx_ms, "max_abs_diff": diff,
                             "export_max_abs_diff": exported.max_abs_diff})
                print(rows[-1], flush=True)
    minutes = (time.perf_counter() - started) / 60
    lines = [f"# onnxruntime against torch eager ({cpu_name()}, {cores} cores, no GPU)", "",
             f"Medians of {args.repeats} calls after 3 warm-up calls; torch {torch.__version__} eager in "
             f"eval mode under `no_grad` with {cores} threads; onnxruntime {ort.__version__}, all graph "
             f"optimisations, {cores} intra-op threads; `python benchmarks/onnx_vs_torch.py`, "
             f"{minutes:.1f} min in all, run alone.", "",
             "| network | batch | torch (ms) | onnxruntime (ms) | torch / onnxruntime | max abs diff |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['network']} | {r['batch']} | {r['torch_ms']:.1f} | {r['onnxruntime_ms']:.1f} | "
              f"{r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |" for r in rows]
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "onnx_vs_torch.md").write_text("\n".join(lines) + "\n")
    (args.results / "onnx_vs_torch.json").write_text(json.dumps(
        {"cpu": cpu_name(), "cores": cores, "repeats": args.repeats, "minutes": minutes, "rows": rows},
        indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
