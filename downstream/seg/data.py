"""Labelled cases for segmentation: reading, checking, splitting, preprocessing and training patches.

A case is read by the project's own readers (so bad files raise ``DataError`` naming the file), turned
into MONAI ``MetaTensor``s that carry the affine, then preprocessed by MONAI dictionary transforms:
orientation, optional resampling to a spacing, intensity normalisation per modality (CT window, MRI
z-score over non-zero voxels, percentile scaling for microscopy). Training patches come from
``SpatialPadd`` (any input size) + ``RandCropByPosNegLabeld`` + flips, a small affine and intensity
augmentation. A 2D model on volumes trains on the volumes' slices along ``slice_axis``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import monai.transforms as mt
import numpy as np
import torch
from monai.data import MetaTensor, get_track_meta, set_track_meta
from torch.utils.data import Dataset

from downstream.seg.config import SegDataConfig
from engine.sampling import sample_seed
from twinview.config import ConfigError
from twinview.errors import DataError

KEYS = ("image", "label")
TWO_D_KINDS = ("dsb2018", "image_pairs")
LAYOUT_KINDS = {k: k for k in ("msd", "nnunet", "case_folders", "image_pairs", "dsb2018")}
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # axis-code meaning (MONAI's default, given explicitly)
PERCENTILES = (1.0, 99.0)  # microscopy: these percentiles map to [0, 1]


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path  # a NIfTI file, a 2D image, or a DICOM series folder (with ``series_uid``)
    label: Path | None  # a label volume, a 2D mask, or DSB2018's masks/ folder
    series_uid: str = ""
    # one NIfTI file per channel (nnU-Net raw, per-case folders); ``image`` is the first of them
    channels: tuple[Path, ...] = ()


@dataclass(frozen=True)
class SegTask:
    """Labelled cases of one data set with its label names and modality."""

    name: str
    kind: str  # msd | nnunet | case_folders | image_pairs | dsb2018
    labels: dict[int, str]  # 0 = background
    modality: str  # MRI, CT, microscopy, ...
    in_channels: int
    cases: list[Case]
    mask_values: dict[int, int] | None = None  # image/mask pairs: stored mask value -> class

    @property
    def image_dims(self) -> int:
        return 2 if self.kind in TWO_D_KINDS else 3

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(case_id)


def read_task(cfg: SegDataConfig) -> SegTask:
    """The labelled cases that a data config names (headers only; volumes are read later)."""
    root = Path(cfg.path)
    from twinview.data.inspect import resolve_layout

    purpose = ("segmentation, which needs labels (an MSD task, an nnU-Net raw set, per-case folders, "
               "image/mask pairs or DSB2018)")
    kind = resolve_layout(root, cfg.kind, LAYOUT_KINDS, purpose)
    if kind == "msd":
        from twinview.data.msd import read_msd

        msd = read_msd(root)
        cases = [Case(r.case_id, r.image, r.label) for r in msd.training]
        channels = max(len(msd.modality), 1)
        modality = next(iter(msd.modality.values()), "MRI")
        return SegTask(msd.name, kind, dict(msd.labels), modality, channels, cases)
    if kind == "nnunet":
        from twinview.data.nnunet import read_nnunet

        ds = read_nnunet(root)
        cases = [Case(c.case_id, c.channels[0], c.label, channels=c.channels) for c in ds.training]
        return SegTask(ds.name, kind, ds.labels, ds.channel_names[0], len(ds.channel_names), cases)
    if kind == "case_folders":
        from twinview.data.case_folders import CasePatterns, read_case_folders

        if not cfg.image or not cfg.label:
            raise ConfigError(None, f"{cfg.path}: per-case folders need data.image (a file-name pattern per "
                                    "channel) and data.label; `twinview data inspect` proposes them")
        patterns = CasePatterns(tuple(cfg.image), cfg.label)
        found = [c for c in read_case_folders(root, patterns) if c.label is not None]
        cases = [Case(c.case_id, c.channels[0], c.label, channels=c.channels) for c in found]
        modality = "+".join(patterns.modality_names())
        return SegTask(root.name, kind, _declared_labels(cfg), modality, len(cfg.image), cases)
    if kind == "image_pairs":
        from twinview.data.image_pairs import read_image_pairs
        from twinview.data.images import image_record

        pairs = [p for p in read_image_pairs(root, cfg.mask_suffix) if p.mask is not None]
        if not pairs:
            raise DataError(root, "no image has a mask")
        rgb = any(image_record(p.image).channels == 3 for p in pairs)
        cases = [Case(p.case_id, p.image, p.mask) for p in pairs]
        return SegTask(root.name, kind, _declared_labels(cfg), "image", 3 if rgb else 1, cases,
                       _mask_values(cfg) or None)
    from twinview.data.dsb2018 import read_dsb2018

    records = [r for r in read_dsb2018(root) if r.masks]
    cases = [Case(r.sample_id, r.image, r.image.parent.parent / "masks") for r in records]
    return SegTask("DSB2018 nuclei", kind, {0: "background", 1: "nucleus"}, "microscopy", 3, cases)


def _mask_values(cfg: SegDataConfig) -> dict[int, int]:
    try:
        return {int(k): int(v) for k, v in cfg.mask_values.items()}
    except (TypeError, ValueError):
        raise ConfigError(None, f"data.mask_values {cfg.mask_values!r}: integers, stored value to class, "
                                "e.g. {0: 0, 255: 1}") from None


def _declared_labels(cfg: SegDataConfig) -> dict[int, str]:
    """``data.labels`` of a layout without a dataset.json; ConfigError when absent or without 0."""
    try:
        labels = {int(k): str(v) for k, v in cfg.labels.items()}
    except ValueError:
        labels = {}
    if 0 not in labels or len(labels) < 2:
        raise ConfigError(None, f"{cfg.path}: set data.labels, the classes with 0 the background, e.g. "
                                "{0: background, 1: lesion}")
    return dict(sorted(labels.items()))


# --------------------------------------------------------------------------- splits


def make_split(case_ids: Sequence[str], cfg: SegDataConfig, seed: int) -> dict[str, Any]:
    """Fixed test and val cases (``split_seed``) and the labelled training subset (``seed``).

    The training subset is the first ``label_cases`` (when set) or ``max(1, round(label_fraction *
    n_pool))`` cases of a permutation seeded by ``seed``, so for one seed smaller subsets are nested in
    larger ones, whether given as counts or fractions.
    """
    ids = sorted(case_ids)
    if cfg.split_file:
        fixed = json.loads(Path(cfg.split_file).read_text())
        test, val = list(fixed["test"]), list(fixed["val"])
        unknown = sorted(set(test + val) - set(ids))
        if unknown:
            raise DataError(cfg.split_file, f"cases not in {cfg.path}: {unknown[:5]}")
    else:
        if cfg.test_cases + cfg.val_cases >= len(ids):
            raise ConfigError(None, f"data.test_cases + data.val_cases = {cfg.test_cases + cfg.val_cases} "
                                    f"leaves no training cases of the {len(ids)} in {cfg.path}")
        order = np.random.default_rng(cfg.split_seed).permutation(len(ids))
        test = sorted(ids[i] for i in order[:cfg.test_cases])
        val = sorted(ids[i] for i in order[cfg.test_cases:cfg.test_cases + cfg.val_cases])
    held = set(test) | set(val)
    pool = [i for i in ids if i not in held]
    if not 0 < cfg.label_fraction <= 1:
        raise ConfigError(None, f"data.label_fraction must be in (0, 1], got {cfg.label_fraction}")
    if cfg.label_cases > len(pool):
        raise ConfigError(None, f"data.label_cases {cfg.label_cases}: only {len(pool)} training cases are "
                                "left after the test and val cases")
    n_train = cfg.label_cases or max(1, round(cfg.label_fraction * len(pool)))
    order = np.random.default_rng(seed).permutation(len(pool))
    train = sorted(pool[i] for i in order[:n_train])
    return {"split_seed": cfg.split_seed, "seed": seed, "label_fraction": cfg.label_fraction,
            "label_cases": cfg.label_cases, "test": test, "val": val, "pool": pool, "train": train}


# --------------------------------------------------------------------------- loading and preprocessing


def load_case(case: Case, task: SegTask, with_label: bool = True) -> dict[str, MetaTensor]:
    """``{"image": (C, *spatial), "label": (1, *spatial)}`` as float32 MetaTensors with the affine.

    Raises ``DataError`` naming the file for unreadable files, image/label shape or affine mismatch and
    label values outside the task's labels.
    """
    label = None
    if task.kind == "dsb2018":
        from twinview.data.dsb2018 import load_nuclei, nuclei_record

        sample = load_nuclei(nuclei_record(case.image.parent.parent))
        image = np.moveaxis(sample.image, -1, 0).astype(np.float32)
        label = sample.semantic[None].astype(np.float32)
        affine = np.eye(4)
    elif task.kind == "image_pairs":
        image, label = _load_pair_2d(case, task, with_label)
        affine = np.eye(4)
    elif case.series_uid:
        from twinview.data.dicom import load_dicom_series, read_dicom_series

        record = next(r for r in read_dicom_series(case.image) if r.series_uid == case.series_uid)
        volume, affine = load_dicom_series(record)
        image = volume[None]
    elif case.channels:
        from twinview.data.nifti import load_channels, load_label

        image, affine = load_channels(case.channels)
        image = image.astype(np.float32)
        if image.shape[0] != task.in_channels:
            raise DataError(case.image, f"{image.shape[0]} channels; the task has {task.in_channels}")
        if with_label and case.label is not None:
            label = np.asarray(load_label(case.label, image.shape[1:], affine))[None].astype(np.float32)
    else:
        from twinview.data.nifti import load_nifti, load_pair

        if with_label and case.label is not None:
            raw, raw_label, affine = load_pair(case.image, case.label)
            label = np.asarray(raw_label)[None].astype(np.float32)
        else:
            raw, affine = load_nifti(case.image)
        raw = np.asarray(raw, dtype=np.float32)
        if raw.ndim == 2:
            raise DataError(case.image, f"2D image {raw.shape}; the task {task.name} has 3D volumes")
        image = np.moveaxis(raw, -1, 0) if raw.ndim == 4 else raw[None]
        if image.shape[0] != task.in_channels:
            raise DataError(case.image, f"{image.shape[0]} channels; the task {task.name} has "
                                        f"{task.in_channels} ({task.modality})")
    affine_t = torch.as_tensor(affine, dtype=torch.float64)
    out = {"image": MetaTensor(torch.from_numpy(np.ascontiguousarray(image)), affine=affine_t)}
    if label is not None:
        values = set(np.unique(label).astype(int).tolist())
        unknown = sorted(values - set(task.labels))
        if unknown or not np.array_equal(label, np.round(label)):
            bad = case.label if task.kind != "dsb2018" else case.image
            raise DataError(bad, f"label values {unknown or 'not integers'} are not among the task's labels "
                                 f"{sorted(task.labels)}")
        out["label"] = MetaTensor(torch.from_numpy(np.ascontiguousarray(label)), affine=affine_t.clone())
    return out


def load_image_2d(path: Path, in_channels: int) -> np.ndarray:
    """A 2D image as (C, H, W) float32 with the task's channels: grey repeated for an RGB task, and a
    DataError for an RGB image given to a grey task."""
    from twinview.data.images import load_image

    image = np.moveaxis(load_image(path), -1, 0).astype(np.float32)
    if image.shape[0] == 1 and in_channels == 3:
        image = np.repeat(image, 3, axis=0)
    elif image.shape[0] != in_channels:
        raise DataError(path, f"{image.shape[0]} channels; the model takes {in_channels}")
    return image


def _load_pair_2d(case: Case, task: SegTask, with_label: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """An image/mask pair: (C, H, W) image and (1, H, W) classes (:mod:`twinview.data.image_pairs`)."""
    from twinview.data.image_pairs import load_mask

    image = load_image_2d(case.image, task.in_channels)
    if not with_label or case.label is None:
        return image, None
    mask = load_mask(case.label, task.mask_values, task.labels)
    if mask.shape != image.shape[1:]:
        raise DataError(case.label, f"mask is {mask.shape[0]}x{mask.shape[1]}, its image "
                                    f"{image.shape[1]}x{image.shape[2]} (height x width)")
    return image, mask[None].astype(np.float32)


def normalize_mode(cfg: SegDataConfig, task: SegTask) -> str:
    if cfg.normalize != "auto":
        return cfg.normalize
    if task.kind in TWO_D_KINDS:
        return "percentile"
    return "ct_window" if task.modality.upper() == "CT" else "zscore"


def spatial_transform(cfg: SegDataConfig, task: SegTask, keys: Sequence[str] = KEYS) -> mt.Compose:
    """Orientation and spacing (volumes only); invertible, so predictions map back to the input grid."""
    steps: list[mt.MapTransform] = []
    if task.image_dims == 3 and cfg.orientation:
        steps.append(mt.Orientationd(keys=keys, axcodes=cfg.orientation, labels=RAS_LABELS))
    if task.image_dims == 3 and cfg.spacing:
        modes = ["bilinear" if k == "image" else "nearest" for k in keys]
        steps.append(mt.Spacingd(keys=keys, pixdim=cfg.spacing, mode=modes))
    return mt.Compose(steps)


def intensity_transform(cfg: SegDataConfig, task: SegTask) -> mt.MapTransform:
    mode = normalize_mode(cfg, task)
    if mode == "zscore":
        return mt.NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)
    if mode == "ct_window":
        low, high = cfg.ct_window
        return mt.ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    low, high = PERCENTILES
    return mt.ScaleIntensityRangePercentilesd(keys="image", lower=low, upper=high, b_min=0.0, b_max=1.0,
                                              clip=True, channel_wise=True)


def preprocess_metadata(cfg: SegDataConfig, task: SegTask) -> dict[str, Any]:
    """The preprocessing in the model card's vocabulary (:mod:`twinview.model_card`)."""
    mode = normalize_mode(cfg, task)
    intensity = {"zscore": {"kind": "zscore_nonzero"},
                 "ct_window": {"kind": "ct_window", "window": [float(v) for v in cfg.ct_window]},
                 "percentile": {"kind": "percentile", "percentiles": list(PERCENTILES)}}[mode]
    policy = {"dsb2018": "RGB: alpha dropped, grey repeated",
              "image_pairs": "RGB: alpha dropped, grey repeated" if task.in_channels == 3 else "grey",
              "nnunet": "one file per channel (CASE_XXXX), in dataset.json channel_names order",
              "case_folders": "one file per channel, in data.image pattern order"}.get(
        task.kind, "as stored: a 4D volume's last axis holds the in_channels channels")
    return {"intensity": intensity, "resize": "sliding_window",
            "orientation": cfg.orientation if task.image_dims == 3 else "", "spacing": cfg.spacing,
            "slice_axis": cfg.slice_axis if cfg.spatial_dims == 2 and task.image_dims == 3 else None,
            "channel_policy": policy}


def preprocess_case(case: Case, task: SegTask, cfg: SegDataConfig, with_label: bool = True) -> dict[str, Any]:
    """A loaded case after orientation, spacing and intensity normalisation."""
    data = load_case(case, task, with_label)
    keys = [k for k in KEYS if k in data]
    data = spatial_transform(cfg, task, keys)(data)
    data = intensity_transform(cfg, task)(data)
    data["case_id"] = case.case_id
    return data


def spacing_of(tensor: MetaTensor) -> tuple[float, ...]:
    """Voxel size in mm along each spatial axis, from the affine."""
    affine = tensor.affine.numpy() if isinstance(tensor.affine, torch.Tensor) else np.asarray(tensor.affine)
    dims = tensor.ndim - 1
    return tuple(float(np.linalg.norm(affine[:3, i])) for i in range(dims))


# --------------------------------------------------------------------------- training patches


def to_slices(volumes: Sequence[dict[str, Any]], axis: int) -> list[dict[str, torch.Tensor]]:
    """The 2D slices along ``axis`` (0-2, spatial) of preprocessed volumes; constant images dropped."""
    from twinview.array_store import varying_slices

    items = []
    for vol in volumes:
        image, label = vol["image"].as_tensor(), vol["label"].as_tensor()
        for i in varying_slices(image.numpy(), axis):
            items.append({"image": image.select(axis + 1, i).contiguous(),
                          "label": label.select(axis + 1, i).contiguous()})
    return items


def train_transform(roi: Sequence[int], pos_fraction: float,
                    flip_axes: Sequence[int] | None = None) -> mt.Compose:
    """Random patches of size ``roi`` (padded first, so small inputs work) with augmentation.

    ``flip_axes``: the patch axes mirrored with probability 0.5 each (None: every axis).
    """
    dims = len(roi)
    flip_axes = range(dims) if flip_axes is None else flip_axes
    rotate = (0.26,) if dims == 2 else (0.26, 0.26, 0.26)  # +-15 degrees
    return mt.Compose([
        mt.SpatialPadd(keys=KEYS, spatial_size=roi),
        mt.RandCropByPosNegLabeld(keys=KEYS, label_key="label", spatial_size=roi, pos=pos_fraction,
                                  neg=1.0 - pos_fraction, num_samples=1, image_key="image"),
        *[mt.RandFlipd(keys=KEYS, prob=0.5, spatial_axis=axis) for axis in flip_axes],
        mt.RandAffined(keys=KEYS, prob=0.3, rotate_range=rotate, scale_range=(0.1,) * dims,
                       mode=("bilinear", "nearest"), padding_mode="zeros"),
        mt.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        mt.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        mt.RandGaussianNoised(keys="image", prob=0.15, std=0.05),
    ])


class PatchDataset(Dataset):
    """Training patches; item ``i`` of epoch ``e`` is seeded from ``(seed, e, i)`` (exact resume).

    ``length`` may exceed the number of items (few labelled cases): item ``i`` uses ``items[i % n]``.
    """

    def __init__(self, items: Sequence[dict[str, torch.Tensor]], transform: mt.Compose, seed: int,
                 length: int) -> None:
        self.items, self.transform, self.seed, self.length = items, transform, seed, length
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.transform.set_random_state(seed=sample_seed(self.seed, self.epoch, index) % 2**32)
        item = self.items[index % len(self.items)]
        tracking = get_track_meta()
        set_track_meta(False)  # plain tensors: the patches need no affine, and it halves the time
        try:
            with warnings.catch_warnings():  # a background-only slice has no foreground to centre on
                warnings.filterwarnings("ignore", message="Num foregrounds 0")
                out = self.transform({"image": item["image"], "label": item["label"]})
        finally:
            set_track_meta(tracking)
        out = out[0] if isinstance(out, list) else out
        return torch.as_tensor(out["image"]).float(), torch.as_tensor(out["label"]).float()
