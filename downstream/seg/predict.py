"""``twinview seg predict`` and ``twinview seg eval``: apply a trained run to new or labelled data.

Volumes are preprocessed as in training; the prediction is mapped back through the inverse of the
orientation and spacing steps (MONAI ``Invertd``, nearest neighbour) and written as NIfTI with the
input's own affine and header, so it overlays the input in any viewer. 2D images give PNG masks.
Structure volumes (mL) come from the voxel size of the written mask.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import monai.transforms as mt
import numpy as np
import torch
from monai.data import MetaTensor

from downstream.seg.config import SegTrainConfig
from downstream.seg.data import Case, SegTask, intensity_transform, load_case, read_task, spatial_transform
from downstream.seg.evaluate import (
    data_config_from,
    evaluate_cases,
    labels_of,
    load_model,
    metrics_table,
    save_overlay,
)
from downstream.seg.inference import predict_logits
from pretrain.trainer import select_device
from twinview.data.errors import DataError


def _task_of(meta: dict[str, Any]) -> SegTask:
    return SegTask(meta["task"], meta["kind"], labels_of(meta), meta["modality"], meta["in_channels"], [])


def input_cases(path: Path, kind: str) -> list[Case]:
    """The images to predict: a file, a folder of NIfTI files or images, an MSD task folder, or a folder of
    DICOM series (one case per series, named after its folder)."""
    from twinview.data.images import is_image, list_image_files
    from twinview.data.nifti import case_id, is_nifti, nifti_files

    if path.is_file():
        if not (is_nifti(path) or is_image(path)):
            raise DataError(path, "not a NIfTI file (.nii/.nii.gz) or an image")
        return [Case(case_id(path) if is_nifti(path) else path.stem, path, None)]
    if not path.is_dir():
        raise DataError(path, "no such file or folder")
    if (path / "dataset.json").exists():
        from twinview.data.msd import read_msd

        msd = read_msd(path)
        return [Case(r.case_id, r.image, None) for r in [*msd.test, *msd.training]]
    from twinview.data.inspect import detect_format

    if kind != "dsb2018" and detect_format(path) == "dicom":
        from twinview.data.dicom import read_dicom_series

        series = read_dicom_series(path)
        return [Case(f"{r.folder.name or 'series'}_{i:03d}", r.folder, None, r.series_uid)
                for i, r in enumerate(series)]
    files = nifti_files(path) if kind != "dsb2018" else []
    if files:
        return [Case(case_id(f), f, None) for f in files]
    images = list_image_files(path)
    if not images:
        raise DataError(path, "no NIfTI files or images found")
    return [Case(p.stem, p, None) for p in images]


def _load_input(case: Case, task: SegTask) -> dict[str, MetaTensor]:
    if task.image_dims == 3:
        return load_case(case, task, with_label=False)
    from twinview.data.dsb2018 import load_rgb

    image = np.moveaxis(load_rgb(case.image), -1, 0).astype(np.float32)
    return {"image": MetaTensor(torch.from_numpy(np.ascontiguousarray(image)), affine=torch.eye(4))}


def predict(inputs: Path, run: Path, out: Path, overlays: bool = True,
            device: str = "auto") -> list[dict[str, Any]]:
    """Write one mask per input (NIfTI for volumes, PNG for 2D images) and overlay PNGs; returns volumes."""
    import nibabel as nib
    from PIL import Image

    dev = select_device(device)
    model, meta = load_model(run, dev)
    task = _task_of(meta)
    data = data_config_from(meta)
    train = SegTrainConfig()
    cases = input_cases(Path(inputs), task.kind)
    spatial = spatial_transform(data, task, keys=["image"])
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for case in cases:
        sample = spatial(_load_input(case, task))
        sample = intensity_transform(data, task)(sample)
        logits = predict_logits(model, sample["image"], meta["spatial_dims"], data.roi, data.slice_axis,
                                train.sw_batch_size, train.overlap)
        pred = logits.argmax(0, keepdim=True).float()
        if task.image_dims == 3:
            sample["pred"] = MetaTensor(pred, meta=sample["image"].meta)
            pred = mt.Invertd(keys="pred", transform=spatial, orig_keys="image",
                              nearest_interp=True)(sample)["pred"]
            mask = pred.as_tensor()[0].numpy().round().astype(np.uint8)
            original = _load_input(case, task)["image"]
            if mask.shape != tuple(original.shape[1:]):
                raise RuntimeError(f"{case.image}: prediction shape {mask.shape} "
                                   f"does not match {tuple(original.shape[1:])}")
            affine = original.affine.numpy()
            header = None
            if not case.series_uid:  # NIfTI: keep the input's header (and so its exact affine)
                source = nib.load(str(case.image))
                header, affine = source.header.copy(), source.affine
                header.set_data_dtype(np.uint8)
            target = out / f"{case.case_id}.nii.gz"
            nib.save(nib.Nifti1Image(mask, affine, header), str(target))
            spacing = tuple(float(np.linalg.norm(affine[:3, i])) for i in range(3))
            image = original.numpy()
        else:
            mask = pred[0].numpy().astype(np.uint8)
            target = out / f"{case.case_id}.png"
            Image.fromarray(mask).save(target)
            spacing = (1.0, 1.0)
            image = _load_input(case, task)["image"].numpy()
        row: dict[str, Any] = {"case": case.case_id, "input": str(case.image), "mask": str(target)}
        voxel = float(np.prod(spacing)) / (1000.0 if task.image_dims == 3 else 1.0)
        unit = "ml" if task.image_dims == 3 else "px"
        for c, name in sorted(task.labels.items()):
            if c:
                row[f"volume_{unit}_{name}"] = float((mask == c).sum()) * voxel
        if overlays:
            save_overlay(image, mask, out / "overlays" / f"{case.case_id}.png", data.slice_axis)
        results.append(row)
    with (out / "volumes.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    return results


def evaluate_run(run: Path, out: Path, data_path: str | None = None, split: str = "test",
                 device: str = "auto") -> tuple[dict[str, float], str]:
    """Metrics of a run on its own split (``test``/``val``/``train``) or on ``all`` cases of ``data_path``."""
    dev = select_device(device)
    model, meta = load_model(run, dev)
    data = data_config_from(meta, data_path or "")
    if not data_path:
        from downstream.seg.config import SegConfig
        from twinview.config import load_config

        data.path = load_config(SegConfig, Path(run) / "config.yaml").data.path
    task = read_task(data)
    if split == "all":
        ids = [c.case_id for c in task.cases]
    else:
        split_file = Path(run) / "split.json"
        ids = json.loads(split_file.read_text())[split]
        if not ids:
            raise DataError(split_file, f"the {split} split is empty")
    _, summary = evaluate_cases(model, meta, task, data, ids, out, dev, SegTrainConfig(),
                                csv_name="metrics.csv")
    table = metrics_table(summary, labels_of(meta))
    (out / "metrics.md").write_text(f"{len(ids)} cases ({split}) of {data.path}\n\n{table}\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary, table
