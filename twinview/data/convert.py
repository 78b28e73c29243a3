"""Convert labelled sets between layouts: MSD, nnU-Net v2 raw and per-case folders (volumes), and
DSB2018 to 2D image/mask pairs.

Voxels, affines and label values are copied unchanged; only the file arrangement differs, so a model
trained on one layout scores the same on another. Writes go to a new folder (an existing non-empty
output is refused) and never into the source.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from twinview.data import case_folders, image_pairs, msd, nnunet
from twinview.data.nifti import load_nifti
from twinview.data.nnunet import SegCase
from twinview.errors import DataError, display_path

PathLike = str | os.PathLike[str]
LAYOUTS = ("nnunet", "msd", "case_folders", "image_pairs")


@dataclass(frozen=True)
class VolumeSet:
    """A labelled volume set in no particular layout: names, channels, labels and cases."""

    name: str
    channel_names: dict[int, str]
    labels: dict[int, str]
    training: list[SegCase]
    test: list[SegCase]


def read_volume_set(root: PathLike, patterns: case_folders.CasePatterns | None = None) -> VolumeSet:
    """An MSD task, an nnU-Net raw data set (by their dataset.json) or per-case folders (read with
    ``patterns``; labelled cases as training, the others as test; no label names) as a
    :class:`VolumeSet`."""
    root = Path(root)
    if nnunet.is_nnunet(root):
        ds = nnunet.read_nnunet(root)
        return VolumeSet(ds.name, ds.channel_names, ds.labels, ds.training, ds.test)
    if patterns is not None and not (root / msd.DATASET_JSON).exists():
        cases = case_folders.read_case_folders(root, patterns)
        names = dict(enumerate(patterns.modality_names()))
        return VolumeSet(root.name, names, {}, [c for c in cases if c.label is not None],
                         [c for c in cases if c.label is None])
    task = msd.read_msd(root)
    channels = {int(k): v for k, v in task.modality.items()} or {0: "image"}
    return VolumeSet(task.name, channels, task.labels,
                     [SegCase(r.case_id, (r.image,), r.label) for r in task.training],
                     [SegCase(r.case_id, (r.image,), None) for r in task.test])


def convert(source: PathLike, out: PathLike, layout: str) -> dict[str, Any]:
    """Write the MSD or nnU-Net set at ``source`` to ``out`` in ``layout`` (one of :data:`LAYOUTS`;
    ``image_pairs`` takes a DSB2018 folder): ``{"out", "layout", "training", "test"}``, and the config
    lines that read a layout without a dataset.json back (``patterns``, or ``labels`` and
    ``mask_values``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(out, "output folder is not empty")
    if out.resolve().is_relative_to(source.resolve()):
        raise DataError(out, f"inside the source {display_path(source)}: write elsewhere")
    if layout == "image_pairs":
        return _dsb2018_pairs(source, out)
    data = read_volume_set(source)
    summary: dict[str, Any] = {"out": str(out), "layout": layout, "training": len(data.training),
                               "test": len(data.test)}
    if layout == "nnunet":
        _write_nnunet(data, out)
    elif layout == "msd":
        _write_msd(data, out)
    else:
        summary["patterns"] = case_folders.describe(_write_case_folders(data, out))
    return summary


def channel_arrays(case: SegCase, n_channels: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The case's channels as 3D arrays, and the affine of its first file."""
    arrays, affine = [], None
    for path in case.channels:
        data, file_affine = load_nifti(path)
        affine = file_affine if affine is None else affine
        arrays += [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[3])]
    if len(arrays) != n_channels:
        raise DataError(case.channels[0], f"{len(arrays)} channels, the data set has {n_channels}")
    return arrays, affine


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), path)
    return path


def _write_nnunet(data: VolumeSet, out: Path) -> None:
    n = len(data.channel_names)
    for folder, cases in ((nnunet.IMAGES_TR, data.training), (nnunet.IMAGES_TS, data.test)):
        for case in cases:
            arrays, affine = channel_arrays(case, n)
            for c, array in enumerate(arrays):
                _save(array, affine, out / folder / f"{case.case_id}_{c:04d}.nii.gz")
            if case.label is not None:
                nnunet.copy_label(case.label, out / nnunet.LABELS_TR / f"{case.case_id}.nii.gz")
    nnunet.write_dataset_json(out, data.channel_names, data.labels, len(data.training), data.name)


def _write_msd(data: VolumeSet, out: Path) -> None:
    n = len(data.channel_names)

    def image(case: SegCase, folder: str) -> str:
        """The case's channels as one volume (4D, channels last, when several), as dataset.json lists it."""
        arrays, affine = channel_arrays(case, n)
        path = _save(np.stack(arrays, axis=-1) if n > 1 else arrays[0], affine,
                     out / folder / f"{case.case_id}.nii.gz")
        return f"./{path.relative_to(out).as_posix()}"

    def label(case: SegCase) -> str:
        nnunet.copy_label(case.label, out / "labelsTr" / f"{case.case_id}.nii.gz")
        return f"./labelsTr/{case.case_id}.nii.gz"

    training = [{"image": image(case, "imagesTr"), "label": label(case)} for case in data.training]
    test = [image(case, "imagesTs") for case in data.test]
    body = {"name": data.name, "modality": {str(k): v for k, v in data.channel_names.items()},
            "labels": {str(k): v for k, v in data.labels.items()}, "numTraining": len(training),
            "numTest": len(test), "training": training, "test": test}
    (out / msd.DATASET_JSON).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


def _write_case_folders(data: VolumeSet, out: Path) -> case_folders.CasePatterns:
    """``out/<case>/<channel name>.nii.gz`` per channel and ``out/<case>/seg.nii.gz`` (training cases;
    test cases have no ``seg``); the patterns that read them back."""
    n = len(data.channel_names)
    names = [case_folders.safe_name(data.channel_names[c]) for c in range(n)]
    if len(set(names)) != n:
        names = [f"{name}_{c}" for c, name in enumerate(names)]
    for case in [*data.training, *data.test]:
        arrays, affine = channel_arrays(case, n)
        for name, array in zip(names, arrays, strict=True):
            _save(array, affine, out / case.case_id / f"{name}.nii.gz")
        if case.label is not None:
            nnunet.copy_label(case.label, out / case.case_id / "seg.nii.gz")
    return case_folders.CasePatterns(tuple(f"{name}.nii.gz" for name in names), "seg.nii.gz")


def _dsb2018_pairs(source: Path, out: Path) -> dict[str, Any]:
    """``images/<id>.png`` (the sample's image, copied) and ``masks/<id>_mask.png`` (the union of its
    nucleus masks, 0/255) per labelled DSB2018 sample; unlabelled samples get no mask."""
    import shutil

    from PIL import Image

    from twinview.data.dsb2018 import load_nuclei, read_dsb2018

    records = read_dsb2018(source)
    images, masks = out / image_pairs.IMAGES_DIR, out / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(exist_ok=True)
    labelled = 0
    for record in records:
        shutil.copyfile(record.image, images / f"{record.sample_id}{record.image.suffix}")
        if record.masks:
            semantic = (load_nuclei(record).semantic > 0).astype(np.uint8) * 255
            Image.fromarray(semantic).save(masks / f"{record.sample_id}_mask.png")
            labelled += 1
    return {"out": str(out), "layout": "image_pairs", "training": labelled, "test": len(records) - labelled,
            "labels": {0: "background", 1: "nucleus"}, "mask_values": {0: 0, 255: 1}}
