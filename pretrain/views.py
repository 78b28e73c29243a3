"""Domain-specific two-view augmentations for contrastive pretraining.

``build_views(preset, size, ...)`` returns a :class:`TwoViews`: one sample in, two differently augmented
``torch.float32`` channel-first tensors out. 2D pipelines use albumentations, 3D pipelines use MONAI
array transforms; intensity steps that albumentations lacks (HU window, MR bias field, non-zero z-score,
percentile scaling) come from MONAI in both cases. ``eval_transform`` is the matching deterministic
preprocessing (no augmentation) and ``preset_metadata`` describes it as plain JSON for export and the apps.

=========== ===== ========================================== ===============================================
preset      dims  what (per view)                            why
=========== ===== ========================================== ===============================================
ct          2, 3  HU window jittered around ``window``        HU are absolute: the window, not per-image
                  (centre +-30 HU, width +-25 %), clip and    statistics, fixes what tissue is visible; a
                  scale to [0, 1]; 2D: random resized crop    jittered window simulates reading with a
                  (area 0.35-1), left-right flip; 3D: native- slightly different window/scanner calibration.
                  resolution crop, flips on all axes, zoom    Small rotations/noise/blur mimic positioning and
                  +-10 %; rotation +-15 deg; blur; gamma;     dose/kernel differences. 3D crops keep the
                  Gaussian noise. No colour transform.        voxel spacing (often anisotropic). Single
                                                              channel: hue has no meaning.
mri         2, 3  crops/flips as ct (2D area 0.4-1);          MR intensities have arbitrary units, so each
                  rotation +-10 deg; MR bias field and gamma  view is z-scored (non-zero voxels = head, not
                  on raw intensities, then z-score over non-   background). Bias field and gamma model coil
                  zero voxels per channel, then Gaussian      inhomogeneity and contrast differences between
                  noise (in z units).                         scanners/sequences; they act on raw intensities.
microscopy  2     percentile scaling (1, 99.8) to [0, 1];     Microscopy has no canonical orientation, so the
                  random resized crop; all 8 square           whole dihedral group is a free invariance;
                  symmetries (flips if the output is not      exposure/stain intensity vary from slide to
                  square); brightness/contrast; blur.         slide; blur mimics focus. Percentiles cope with
                                                              uint8 and 12/16-bit images alike.
reid        2     random resized crop, scale 0.5-1, aspect    A person must stay recognisable: crops keep at
                  ratio within x0.8-1.25 of the output's      least half the box and its upright shape; no
                  (person shape); horizontal flip; mild       vertical flip/rotation. Clothing colour is the
                  colour jitter (no hue); grey 10 %; random   main identity cue, so colour jitter is mild;
                  erasing (filled with the ImageNet mean).    erasing simulates occlusion (Zhong et al.).
natural     2     SimCLR: random resized crop 0.08-1, flip,   The standard SimCLR/MoCo v2 recipe (colour
                  colour jitter (0.4, 0.4, 0.4, 0.1) p 0.8,   strength s = 0.5) for generic RGB photographs;
                  grey p 0.2, Gaussian blur sigma 0.1-2 p 0.5 the reference for the domain presets.
=========== ===== ========================================== ===============================================

Inputs: 2D ``HxW`` or ``HxWxC`` (C = 1, 3 or 4; a 4th alpha channel is dropped unless ``channels=4``;
for ct, mri and microscopy any C equal to ``channels``: co-registered modalities, moved together),
uint8/uint16/int16/float; ``reid`` and ``natural`` need uint8 RGB (grey is repeated). 3D ``DxHxW`` or
``CxDxHxW``. ``ct`` expects Hounsfield units (DICOM rescale slope/intercept already applied). 3D volumes
smaller than ``size`` are zero-padded (MR background; below the window for CT).

Outputs (``channels`` defaults to 1 for ct/mri, 3 otherwise; a single-channel result is repeated, RGB is
turned grey for ``channels=1``):

* ct, microscopy: [0, 1] (clipped); ct channels are identical copies.
* mri: z-scores over non-zero voxels, unbounded (mostly within +-5), background 0 plus noise.
* reid, natural: ImageNet-normalised, ``(x / 255 - mean) / std``, within about [-2.2, 2.7].

Seeding: each :class:`TwoViews` call draws one seed from torch's global generator (or from the generator
given to :meth:`TwoViews.set_seed`) and reseeds its albumentations and MONAI random states from it. So
``torch.manual_seed(s)`` makes views reproducible, and DataLoader workers (which torch seeds as
``base_seed + worker_id``) draw different views without a ``worker_init_fn``. Seeding only
``random``/``numpy`` has no effect (albumentations 2.x and MONAI keep their own generators). Views pickle,
so spawn/forkserver workers work too.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import monai.transforms as mt
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torchvision.transforms.functional import rgb_to_grayscale

PRESETS: dict[str, str] = {
    "ct": "CT in HU: jittered HU window, crop, flip, small rotation, blur, gamma, noise (2D/3D)",
    "mri": "MRI: crop, flip, small rotation, bias field, gamma, z-score on non-zero voxels, noise (2D/3D)",
    "microscopy": "Microscopy: percentile scaling, crop, rot90 + flips, brightness/contrast, blur",
    "reid": "Person re-ID: person-shaped crop (scale 0.5-1), flip, mild colour jitter, grey, random erasing",
    "natural": "SimCLR recipe: crop 0.08-1, flip, colour jitter 0.8, grey 0.2, Gaussian blur 0.5",
}

_PARAMS: dict[str, dict[str, Any]] = {
    "ct": {
        "window": (40.0, 400.0),  # (centre, width) HU: soft tissue; (-600, 1500) lung, (400, 1800) bone
        "center_jitter": 30.0,  # HU
        "width_jitter": 0.25,  # relative
        "scale": (0.35, 1.0),  # 2D crop area fraction
        "zoom": 0.1,  # 3D affine scale +-
        "rotate": 15.0,  # degrees
        "noise_std": (0.01, 0.04),  # on the [0, 1] window
        "blur_sigma": (0.1, 1.0),
        "gamma": (0.8, 1.25),
    },
    "mri": {
        "scale": (0.4, 1.0),
        "zoom": 0.1,
        "rotate": 10.0,
        "bias_coeff": (-0.1, 0.1),  # Legendre coefficients of the log field: about +-20 % inside a patch
        "gamma": (0.7, 1.5),
        "noise_std": 0.1,  # z-score units, the upper bound of a uniform draw
    },
    "microscopy": {
        "percentiles": (1.0, 99.8),
        "scale": (0.25, 1.0),
        "brightness": 0.2,
        "contrast": 0.2,
        "blur_sigma": (0.1, 1.5),
    },
    "reid": {
        "scale": (0.5, 1.0),
        "ratio_jitter": 1.25,  # crop w/h within [r / j, r * j] of the output's w/h r
        "color_jitter": (0.2, 0.15, 0.1, 0.0),  # brightness, contrast, saturation, hue
        "gray_p": 0.1,
        "erase_p": 0.5,
        "erase_scale": (0.02, 0.33),
    },
    "natural": {
        "scale": (0.08, 1.0),
        "color_jitter": (0.4, 0.4, 0.4, 0.1),
        "color_p": 0.8,
        "gray_p": 0.2,
        "blur_p": 0.5,
        "blur_sigma": (0.1, 2.0),
    },
}

_DEFAULT_CHANNELS = {"ct": 1, "mri": 1, "microscopy": 3, "reid": 3, "natural": 3}
_COLOUR_PRESETS = frozenset({"reid", "natural"})
ALIGNABLE = frozenset({"mri"})  # first stage geometric only (crop, flip, rotation), intensity after it
_UNIT_RANGE_PRESETS = frozenset({"ct", "microscopy"})  # outputs clipped to [0, 1]
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_EVAL_CROP_FRACTION = 0.875  # natural eval: resize the shorter side to size / 0.875, centre crop

Stage = A.Compose | mt.Compose


class RandHUWindow(mt.RandomizableTransform):
    """Map Hounsfield units to [0, 1] through a window whose centre and width are jittered per call."""

    def __init__(self, window: tuple[float, float], center_jitter: float, width_jitter: float) -> None:
        super().__init__(prob=1.0)
        self.window = window
        self.center_jitter = center_jitter
        self.width_jitter = width_jitter
        self._window = window

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        center, width = self.window
        self._window = (
            center + self.R.uniform(-self.center_jitter, self.center_jitter),
            width * self.R.uniform(1.0 - self.width_jitter, 1.0 + self.width_jitter),
        )

    def __call__(self, img: Any) -> Any:
        self.randomize()
        return hu_window(*self._window)(img)


def hu_window(center: float, width: float) -> mt.ScaleIntensityRange:
    """The deterministic HU window: clip to ``[center - width/2, center + width/2]``, scale to [0, 1]."""
    return mt.ScaleIntensityRange(center - width / 2, center + width / 2, 0.0, 1.0, clip=True)


class ViewPipeline:
    """One pipeline: a numpy sample to a float32 channel-first tensor (a view, or the eval transform)."""

    def __init__(self, preset: str, spatial_dims: int, channels: int, stages: Sequence[Stage],
                 geometric: frozenset[int] = frozenset()) -> None:
        self.preset = preset
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.stages = list(stages)
        self.geometric = geometric  # indices of the stages that only move pixels

    def reseed(self, seed: int, geometry_seed: int | None = None) -> None:
        """Reseed every stage's random state (albumentations and MONAI keep their own) from ``seed``; the
        stages in ``geometric`` from ``geometry_seed`` when given (the same crop, flip and rotation as
        another view reseeded with that seed, with other intensities)."""
        own = self._stage_seeds(seed)
        geometry = own if geometry_seed is None else self._stage_seeds(geometry_seed)
        for i, stage in enumerate(self.stages):
            a, b = geometry[i] if i in self.geometric else own[i]
            if isinstance(stage, A.Compose):
                stage.set_random_state(np.random.default_rng(a), random.Random(b))
            else:
                stage.set_random_state(seed=a)

    def _stage_seeds(self, seed: int) -> list[tuple[int, int]]:
        rng = np.random.default_rng(seed)
        return [(int(rng.integers(2**63)), int(rng.integers(2**63))) if isinstance(stage, A.Compose)
                else (int(rng.integers(2**32)), 0) for stage in self.stages]

    def __call__(self, sample: np.ndarray) -> torch.Tensor:
        x: Any = self._prepare(np.asarray(sample))
        for stage in self.stages:
            x = stage(image=x)["image"] if isinstance(stage, A.Compose) else stage(x)
        out = _match_channels(torch.as_tensor(x, dtype=torch.float32), self.channels)
        return out.clamp_(0.0, 1.0) if self.preset in _UNIT_RANGE_PRESETS else out

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        if self.spatial_dims == 3:
            if x.ndim not in (3, 4):
                raise ValueError(f"3D views expect DxHxW or CxDxHxW, got shape {x.shape}")
            return (x[None] if x.ndim == 3 else x).astype(np.float32, copy=False)
        if x.ndim == 2:
            x = x[..., None]
        modalities = self.preset not in _COLOUR_PRESETS and x.ndim == 3 and x.shape[-1] == self.channels
        if x.ndim != 3 or (x.shape[-1] not in (1, 3, 4) and not modalities):
            raise ValueError(f"2D views expect HxW or HxWxC with C in (1, 3, 4) or C = channels for the "
                             f"medical presets, got shape {x.shape}")
        if x.shape[-1] == 4 and self.channels != 4:
            x = x[..., :3]  # alpha
        if self.preset not in _COLOUR_PRESETS:
            return x.astype(np.float32, copy=False)
        if x.dtype != np.uint8:
            raise ValueError(f"preset {self.preset!r} expects uint8 RGB, got {x.dtype}")
        return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


class TwoViews:
    """Callable: one sample to two independently augmented views (see the module docstring); with
    ``aligned``, two views with the same geometry and independent intensity changes (pixel (i, j) of
    one view shows what pixel (i, j) of the other shows)."""

    def __init__(self, pipeline: ViewPipeline, aligned: bool = False) -> None:
        if aligned and not pipeline.geometric:
            raise ValueError(f"preset {pipeline.preset!r} has no separate geometric stage for aligned views; "
                             f"aligned presets: {sorted(ALIGNABLE)}")
        self.pipeline = pipeline
        self.aligned = aligned
        self._rng: np.random.Generator | None = None

    def set_seed(self, seed: int | None) -> None:
        """Draw per-call seeds from a private generator seeded with ``seed``; ``None``: torch's global one."""
        self._rng = None if seed is None else np.random.default_rng(seed)

    def _draw(self) -> int:
        if self._rng is None:
            return int(torch.randint(0, 2**62, (1,)).item())
        return int(self._rng.integers(2**62))

    def __call__(self, sample: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        seed = self._draw()
        self.pipeline.reseed(seed)
        first = self.pipeline(sample)
        if self.aligned:
            self.pipeline.reseed(self._draw(), geometry_seed=seed)
        return first, self.pipeline(sample)


def build_views(
    preset: str, size: Sequence[int], spatial_dims: int = 2, channels: int | None = None,
    aligned: bool = False, **overrides: Any
) -> TwoViews:
    """Two-view augmentation for ``preset`` with output spatial ``size`` (H, W) or (D, H, W); with
    ``aligned`` (mri only) both views share one geometry (see :class:`TwoViews`).

    ``overrides`` replace the preset's parameters (``window=(-600, 1500)``, ``scale=(0.6, 1.0)``, ...);
    unknown names raise ``ValueError``.
    """
    size, channels, params = _resolve(preset, size, spatial_dims, channels, overrides)
    if spatial_dims == 2:
        stages = _train_stages_2d(preset, size, params)
    else:
        stages = _train_stages_3d(preset, size, params)
    geometric = frozenset({0}) if preset in ALIGNABLE else frozenset()
    return TwoViews(ViewPipeline(preset, spatial_dims, channels, stages, geometric), aligned=aligned)


def eval_transform(
    preset: str, size: Sequence[int], spatial_dims: int = 2, channels: int | None = None, **overrides: Any
) -> ViewPipeline:
    """Deterministic preprocessing (intensity mapping, resize or centre pad/crop), no augmentation.

    Used for the kNN monitor, linear probes and retrieval; ``preset_metadata`` describes the same steps.
    """
    size, channels, params = _resolve(preset, size, spatial_dims, channels, overrides)
    stages: list[Stage] = []
    if spatial_dims == 3:  # centre crop, then pad with 0 (background / below the window)
        window = [hu_window(*params["window"])] if preset == "ct" else []
        zscore = [_zscore()] if preset == "mri" else []
        stages.append(
            mt.Compose([mt.CenterSpatialCrop(size), *window, mt.SpatialPad(size), *zscore, _to_tensor()])
        )
    else:
        h, w = size
        if preset == "ct":
            stages.append(mt.Compose([hu_window(*params["window"]), _to_numpy()]))
        elif preset == "microscopy":
            stages.append(mt.Compose([_percentile_scale(params["percentiles"]), _to_numpy()]))
        if preset == "natural":
            resize = [
                A.SmallestMaxSize(max_size=round(max(size) / _EVAL_CROP_FRACTION)),
                A.CenterCrop(height=h, width=w),
            ]
        else:
            resize = [A.Resize(height=h, width=w)]
        tail = [A.Normalize(mean=_IMAGENET_MEAN, std=_IMAGENET_STD)] if preset in _COLOUR_PRESETS else []
        stages.append(A.Compose([*resize, *tail, ToTensorV2()]))
        if preset == "mri":
            stages.append(mt.Compose([_zscore(), _to_tensor()]))
    return ViewPipeline(preset, spatial_dims, channels, stages)


def preset_metadata(
    preset: str, size: Sequence[int], spatial_dims: int = 2, channels: int | None = None, **overrides: Any
) -> dict[str, Any]:
    """:func:`eval_transform` in the model card's preprocessing vocabulary (:mod:`twinview.model_card`):
    ``intensity`` (``ct_window``, ``zscore_nonzero``, ``percentile`` or ``mean_std``), then ``resize``
    to the input size (3D: centre crop, then zero-pad), channel-first layout."""
    size, channels, params = _resolve(preset, size, spatial_dims, channels, overrides)
    if preset == "ct":
        center, width = (float(v) for v in params["window"])
        intensity: dict[str, Any] = {"kind": "ct_window", "window": [center - width / 2, center + width / 2]}
    elif preset == "mri":
        intensity = {"kind": "zscore_nonzero"}
    elif preset == "microscopy":
        intensity = {"kind": "percentile", "percentiles": [float(v) for v in params["percentiles"]]}
    else:
        intensity = {"kind": "mean_std", "mean": list(_IMAGENET_MEAN), "std": list(_IMAGENET_STD),
                     "max_value": 255.0}
    meta: dict[str, Any] = {
        "intensity": intensity,
        "resize": "center_crop_then_pad" if spatial_dims == 3 else "resize_bilinear",
        "orientation": "",
        "spacing": None,
        "slice_axis": None,
        "channel_policy": "drop alpha; repeat a single channel; RGB to grey (ITU-R 601) if channels == 1",
    }
    if preset == "natural":
        meta.update(resize="shorter_side_then_center_crop",
                    shorter_side=round(max(size) / _EVAL_CROP_FRACTION))
    return meta


def _resolve(
    preset: str, size: Sequence[int], spatial_dims: int, channels: int | None, overrides: dict[str, Any]
) -> tuple[tuple[int, ...], int, dict[str, Any]]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if spatial_dims == 3 and preset not in ("ct", "mri"):
        raise ValueError(f"preset {preset!r} is 2D only; 3D presets: ct, mri")
    size = tuple(int(s) for s in size)
    if len(size) != spatial_dims or min(size) < 1:
        raise ValueError(f"size must be {spatial_dims} positive ints, got {size}")
    channels = channels or _DEFAULT_CHANNELS[preset]
    if preset in _COLOUR_PRESETS and channels != 3:
        raise ValueError(f"preset {preset!r} is RGB: channels must be 3, got {channels}")
    unknown = set(overrides) - set(_PARAMS[preset])
    if unknown:
        known = sorted(_PARAMS[preset])
        raise ValueError(f"unknown parameters for {preset!r}: {sorted(unknown)}; known: {known}")
    return size, channels, {**_PARAMS[preset], **overrides}


def _train_stages_2d(preset: str, size: tuple[int, ...], p: dict[str, Any]) -> list[Stage]:
    h, w = size
    if preset == "ct":
        return [
            mt.Compose([RandHUWindow(p["window"], p["center_jitter"], p["width_jitter"]), _to_numpy()]),
            A.Compose(
                [
                    A.RandomResizedCrop(size=(h, w), scale=p["scale"]),
                    A.HorizontalFlip(p=0.5),
                    _rotate(p["rotate"]),
                    A.GaussianBlur(sigma_limit=p["blur_sigma"], p=0.2),
                    A.RandomGamma(gamma_limit=(100 * p["gamma"][0], 100 * p["gamma"][1]), p=0.5),
                    A.GaussNoise(std_range=p["noise_std"], per_channel=False, p=0.5),
                    ToTensorV2(),
                ]
            ),
        ]
    if preset == "mri":
        return [
            A.Compose(
                [
                    A.RandomResizedCrop(size=(h, w), scale=p["scale"]),
                    A.HorizontalFlip(p=0.5),
                    _rotate(p["rotate"]),
                    ToTensorV2(),
                ]
            ),
            _mri_intensity(p),
        ]
    if preset == "microscopy":
        flips = [A.SquareSymmetry(p=1.0)] if h == w else [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
        return [
            mt.Compose([_percentile_scale(p["percentiles"]), _to_numpy()]),
            A.Compose(
                [
                    A.RandomResizedCrop(size=(h, w), scale=p["scale"]),
                    *flips,
                    A.RandomBrightnessContrast(
                        brightness_limit=p["brightness"], contrast_limit=p["contrast"], p=0.8
                    ),
                    A.GaussianBlur(sigma_limit=p["blur_sigma"], p=0.3),
                    ToTensorV2(),
                ]
            ),
        ]
    normalize = A.Normalize(mean=_IMAGENET_MEAN, std=_IMAGENET_STD)
    if preset == "reid":
        aspect = w / h
        ratio = (aspect / p["ratio_jitter"], aspect * p["ratio_jitter"])
        return [
            A.Compose(
                [
                    A.RandomResizedCrop(size=(h, w), scale=p["scale"], ratio=ratio),
                    A.HorizontalFlip(p=0.5),
                    _color_jitter(p["color_jitter"], p=0.8),
                    A.ToGray(num_output_channels=3, p=p["gray_p"]),
                    normalize,
                    A.Erasing(scale=p["erase_scale"], fill=0.0, p=p["erase_p"]),  # 0 = the ImageNet mean
                    ToTensorV2(),
                ]
            )
        ]
    return [  # natural
        A.Compose(
            [
                A.RandomResizedCrop(size=(h, w), scale=p["scale"]),
                A.HorizontalFlip(p=0.5),
                _color_jitter(p["color_jitter"], p=p["color_p"]),
                A.ToGray(num_output_channels=3, p=p["gray_p"]),
                A.GaussianBlur(sigma_limit=p["blur_sigma"], p=p["blur_p"]),
                normalize,
                ToTensorV2(),
            ]
        )
    ]


def _train_stages_3d(preset: str, size: tuple[int, ...], p: dict[str, Any]) -> list[Stage]:
    # Crop first (cheap on large volumes), at native resolution: voxels are often anisotropic. Volumes
    # smaller than ``size`` are padded with 0: MR background, or below the window for CT (after it).
    crop = mt.RandSpatialCrop(size, random_size=False)
    window = [RandHUWindow(p["window"], p["center_jitter"], p["width_jitter"])] if preset == "ct" else []
    angle = np.deg2rad(p["rotate"])
    spatial = [
        crop,
        *window,
        mt.SpatialPad(size),
        *(mt.RandFlip(prob=0.5, spatial_axis=axis) for axis in range(3)),
        mt.RandAffine(
            prob=0.5, rotate_range=(angle,) * 3, scale_range=(p["zoom"],) * 3, padding_mode="zeros"
        ),
    ]
    if preset == "mri":
        return [mt.Compose(spatial), _mri_intensity(p)]
    return [
        mt.Compose(
            [
                *spatial,
                mt.RandGaussianSmooth(
                    sigma_x=p["blur_sigma"], sigma_y=p["blur_sigma"], sigma_z=p["blur_sigma"], prob=0.2
                ),
                mt.RandAdjustContrast(prob=0.5, gamma=p["gamma"]),
                mt.RandGaussianNoise(prob=0.5, std=p["noise_std"][1]),
                _to_tensor(),
            ]
        )
    ]


def _mri_intensity(p: dict[str, Any]) -> mt.Compose:
    """Bias field and gamma on raw intensities, then the per-view z-score, then noise in z units."""
    return mt.Compose(
        [
            mt.RandBiasField(degree=3, coeff_range=p["bias_coeff"], prob=0.5),
            mt.RandAdjustContrast(prob=0.5, gamma=p["gamma"]),
            _zscore(),
            mt.RandGaussianNoise(prob=0.5, std=p["noise_std"]),
            _to_tensor(),
        ]
    )


def _rotate(degrees: float) -> A.Affine:
    """Small rotation, filling with 0 (air below the CT window, MR background)."""
    return A.Affine(rotate=(-degrees, degrees), border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.5)


def _color_jitter(strength: Sequence[float], p: float) -> A.ColorJitter:
    brightness, contrast, saturation, hue = strength
    return A.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, p=p)


def _zscore() -> mt.NormalizeIntensity:
    return mt.NormalizeIntensity(nonzero=True, channel_wise=True)


def _percentile_scale(percentiles: Sequence[float]) -> mt.ScaleIntensityRangePercentiles:
    return mt.ScaleIntensityRangePercentiles(*percentiles, b_min=0.0, b_max=1.0, clip=True)


def _to_numpy() -> mt.EnsureType:
    return mt.EnsureType(data_type="numpy", dtype=np.float32)


def _to_tensor() -> mt.EnsureType:
    return mt.EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False)


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Repeat a single channel, or turn RGB grey, to get ``channels`` channels."""
    if x.shape[0] == channels:
        return x
    if x.shape[0] == 1:
        return x.repeat(channels, *([1] * (x.ndim - 1)))
    if x.shape[0] == 3 and channels == 1 and x.ndim == 3:
        return rgb_to_grayscale(x)
    raise ValueError(f"cannot map {x.shape[0]} input channels to {channels}")
