"""``twinview seg predict`` and ``twinview seg eval``: apply a trained run to new or labelled data.

Volumes are preprocessed as in training; the prediction is mapped back through the inverse of the
orientation and spacing steps (MONAI ``Invertd``, nearest neighbour) and written as NIfTI with the
input's own affine and header, so it overlays the input in any viewer. 2D images give PNG masks.
Structure volumes (mL) come from the voxel size of the written mask. Masks are named
``<case>_mask.nii.gz`` / ``<case>_mask.png``; the output folder is written whole or not at all and never
over an input or a folder twinview did not write (see :func:`predict`).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import monai.transforms as mt
import numpy as np
import torch
from monai.data import MetaTensor

from downstream.seg.config import SegDataConfig, SegTrainConfig
from downstream.seg.data import (
    TWO_D_KINDS,
    Case,
    SegTask,
    intensity_transform,
    load_case,
    load_image_2d,
    read_task,
    spatial_transform,
)
from downstream.seg.evaluate import (
    data_config_from,
    evaluate_cases,
    labels_of,
    load_model,
    metrics_table,
    model_file,
    save_overlay,
)
from downstream.seg.inference import predict_logits
from engine.device import select_device
from twinview.errors import DataError, display_path


def _task_of(meta: dict[str, Any], data: SegDataConfig) -> SegTask:
    return SegTask(meta["task"], meta["kind"], labels_of(meta), meta["modality"], meta["in_channels"], [],
                   data.mask_values or None)


PREDICTIONS_FILE, VOLUMES_FILE, OVERLAYS = "predictions.json", "volumes.csv", "overlays"
PREDICTIONS_KIND = "twinview-seg-predictions"


def input_cases(path: Path, kind: str, data: SegDataConfig | None = None) -> list[Case]:
    """The images to predict: a file, a folder of NIfTI files or images, an MSD task or nnU-Net raw
    folder (training and test cases), per-case folders (with ``data``'s patterns), the ``images/`` of
    image/mask pairs, or a folder of DICOM series (one case per series, named after its folder). 2D
    images are refused for a task of volumes, and two inputs of the same case name (their masks would
    overwrite each other)."""
    from twinview.data import case_folders, image_pairs, nnunet
    from twinview.data.images import is_image, list_image_files
    from twinview.data.nifti import case_id, is_nifti, nifti_files
    from twinview.errors import missing_path

    two_d = kind in TWO_D_KINDS
    if path.is_file():
        if not (is_nifti(path) or is_image(path)):
            raise DataError(path, "not a NIfTI file (.nii/.nii.gz) or an image")
        if not two_d and not is_nifti(path):
            raise DataError(path, "a 2D image; the model segments 3D volumes")
        return [Case(case_id(path) if is_nifti(path) else path.stem, path, None)]
    if not path.is_dir():
        raise missing_path(path)
    if nnunet.is_nnunet(path):
        ds = nnunet.read_nnunet(path)
        found = [*ds.test, *ds.training]
        return _unique([Case(c.case_id, c.channels[0], None, channels=c.channels) for c in found])
    if (path / "dataset.json").exists():
        from twinview.data.msd import read_msd

        msd = read_msd(path)
        return _unique([Case(r.case_id, r.image, None) for r in [*msd.test, *msd.training]])
    if not two_d and data is not None and data.image and case_folders.is_case_folders(path):
        found = case_folders.read_case_folders(path, case_folders.CasePatterns(tuple(data.image), data.label))
        return [Case(c.case_id, c.channels[0], None, channels=c.channels) for c in found]
    from twinview.data.inspect import detect_format

    if not two_d and detect_format(path) == "dicom":
        from twinview.data.dicom import read_dicom_series

        series = read_dicom_series(path)
        return [Case(f"{r.folder.name or 'series'}_{i:03d}", r.folder, None, r.series_uid)
                for i, r in enumerate(series)]
    files = nifti_files(path) if not two_d else []
    if files:
        return _unique([Case(case_id(f), f, None) for f in files])
    if two_d and image_pairs.is_image_pairs(path):
        path = path / image_pairs.IMAGES_DIR  # not the masks beside them
    images = list_image_files(path)
    if not images:
        raise DataError(path, "no NIfTI files or images found")
    if not two_d:
        raise DataError(images[0], "a 2D image; the model segments 3D volumes")
    return _unique([Case(p.stem, p, None) for p in images])


def _unique(cases: list[Case]) -> list[Case]:
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen:
            raise DataError(case.image, f"same case name {display_path(case.case_id)!r} as "
                                        f"{display_path(seen[case.case_id])}; their masks would overwrite "
                                        "each other: predict them separately")
        seen[case.case_id] = case.image
    return cases


def foreign_predictions(folder: Path) -> str | None:
    """Why ``folder`` is not an earlier output of :func:`predict` (None when it is one).

    Recognised by its ``predictions.json`` (or, from older versions, ``volumes.csv``) listing the masks;
    any other file in it makes it foreign, since replacing the folder would delete that file."""
    listed: set[str] = set()
    marker = folder / PREDICTIONS_FILE
    try:
        if marker.is_file():
            info = json.loads(marker.read_text())
            if not isinstance(info, dict) or info.get("kind") != PREDICTIONS_KIND:
                return f"its {PREDICTIONS_FILE} is not twinview's"
            listed = {Path(row["mask"]).name for row in info.get("rows", [])}
        elif (folder / VOLUMES_FILE).is_file():  # written before predictions.json existed
            with (folder / VOLUMES_FILE).open(newline="") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames is None or reader.fieldnames[:3] != ["case", "input", "mask"]:
                    return f"its {VOLUMES_FILE} is not twinview's"
                listed = {Path(row["mask"]).name for row in reader}
        else:
            return f"no {PREDICTIONS_FILE}"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, csv.Error):
        return f"its {PREDICTIONS_FILE} or {VOLUMES_FILE} is unreadable"
    for entry in folder.iterdir():
        if entry.name in (PREDICTIONS_FILE, VOLUMES_FILE) or (entry.name in listed and entry.is_file()):
            continue
        if entry.name == OVERLAYS and entry.is_dir() and all(
                f.is_file() and f.suffix == ".png" for f in entry.iterdir()):
            continue
        return f"it holds {display_path(entry.name)}, which no prediction wrote"
    return None


def _load_input(case: Case, task: SegTask) -> dict[str, MetaTensor]:
    if task.image_dims == 3:
        return load_case(case, task, with_label=False)
    if task.kind == "dsb2018":
        from twinview.data.dsb2018 import load_rgb

        image = np.moveaxis(load_rgb(case.image), -1, 0).astype(np.float32)
    else:
        image = load_image_2d(case.image, task.in_channels)
    return {"image": MetaTensor(torch.from_numpy(np.ascontiguousarray(image)), affine=torch.eye(4))}


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    """A row with its names printable (bytes of non-UTF-8 names escaped), for the CSV and JSON files."""
    return {k: display_path(v) if k in ("case", "input", "mask") else v for k, v in row.items()}


def predict(inputs: Path, run: Path, out: Path, overlays: bool = True,
            device: str = "auto", overwrite: bool = False) -> list[dict[str, Any]]:
    """Write one mask per input (``<case>_mask.nii.gz`` for volumes, ``<case>_mask.png`` for 2D images),
    overlay PNGs, ``volumes.csv`` and ``predictions.json`` into the folder ``out``; returns the rows.

    ``out`` must not be, contain or lie inside an input (the data or the model file), and must be new, an
    empty folder, or an earlier prediction folder (replaced only with ``overwrite``): else
    ``OutputError``. Everything is written into a temporary sibling folder that is renamed into place when
    complete, so a failure leaves no half-written folder and an earlier ``out`` as it was.
    """
    from twinview.errors import check_output, missing_path

    inputs, out = Path(inputs), Path(os.path.abspath(out))
    if not inputs.exists():
        raise missing_path(inputs)
    check_output(out, [inputs, model_file(run)], kind="prediction folder", foreign=foreign_predictions,
                 overwrite=overwrite)
    dev = select_device(device)
    model, meta = load_model(run, dev)
    data = data_config_from(meta)
    task = _task_of(meta, data)
    cases = input_cases(inputs, task.kind, data)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        results = _predict_into(tmp, out, cases, model, meta, data, task, overlays)
        rows = [_shown(r) for r in results]
        with (tmp / VOLUMES_FILE).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (tmp / PREDICTIONS_FILE).write_text(json.dumps(
            {"kind": PREDICTIONS_KIND, "model": display_path(model_file(run).resolve()), "rows": rows},
            indent=1) + "\n")
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return results


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out``, replacing an earlier prediction folder there (checked again
    now: it may have appeared while the model ran)."""
    from twinview.errors import check_output

    check_output(out, kind="prediction folder", foreign=foreign_predictions, overwrite=overwrite)
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)  # a non-empty folder cannot be renamed over: move the earlier one aside first
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _predict_into(folder: Path, out: Path, cases: list[Case], model: torch.nn.Module, meta: dict[str, Any],
                  data: SegDataConfig, task: SegTask, overlays: bool) -> list[dict[str, Any]]:
    """Masks and overlays into ``folder``; the rows name the masks as they will be under ``out``."""
    import nibabel as nib
    from PIL import Image

    train = SegTrainConfig()
    spatial = spatial_transform(data, task, keys=["image"])
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
                raise RuntimeError(f"{display_path(case.image)}: prediction shape {mask.shape} "
                                   f"does not match {tuple(original.shape[1:])}")
            affine = original.affine.numpy()
            header = None
            if not case.series_uid:  # NIfTI: keep the input's header (and so its exact affine)
                source = nib.load(str(case.image))
                header, affine = source.header.copy(), source.affine
                header.set_data_dtype(np.uint8)
            name = f"{case.case_id}_mask.nii.gz"
            nib.save(nib.Nifti1Image(mask, affine, header), str(folder / name))
            spacing = tuple(float(np.linalg.norm(affine[:3, i])) for i in range(3))
            image = original.numpy()
        else:
            mask = pred[0].numpy().astype(np.uint8)
            name = f"{case.case_id}_mask.png"
            Image.fromarray(mask).save(folder / name)
            spacing = (1.0, 1.0)
            image = _load_input(case, task)["image"].numpy()
        row: dict[str, Any] = {"case": case.case_id, "input": str(case.image), "mask": str(out / name)}
        voxel = float(np.prod(spacing)) / (1000.0 if task.image_dims == 3 else 1.0)
        unit = "ml" if task.image_dims == 3 else "px"
        for c, label in sorted(task.labels.items()):
            if c:
                row[f"volume_{unit}_{label}"] = float((mask == c).sum()) * voxel
        if overlays:
            save_overlay(image, mask, folder / OVERLAYS / f"{case.case_id}.png", data.slice_axis)
        results.append(row)
    return results


def evaluate_run(run: Path, out: Path, data_path: str | None = None, split: str = "test",
                 device: str = "auto") -> tuple[dict[str, float], str]:
    """Metrics of a run on its own split (``test``/``val``/``train``) or on ``all`` cases of ``data_path``.

    ``out`` (a folder) must not be a file, nor be, contain or lie inside the data or the model file:
    ``OutputError``."""
    from twinview.errors import check_output

    out = Path(out)
    check_output(out, [model_file(run)], kind="evaluation folder")
    dev = select_device(device)
    model, meta = load_model(run, dev)
    data = data_config_from(meta, data_path or "")
    if data_path:
        data.kind = "auto"  # another copy of the data may come in another layout
    else:
        from downstream.seg.config import SegConfig
        from twinview.config import load_config

        data.path = load_config(SegConfig, Path(run) / "config.yaml").data.path
    check_output(out, [data.path] if data.path else [], kind="evaluation folder")
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
