"""Synthetic hippocampus-like MRI crops in the Medical Segmentation Decathlon (MSD) layout.

Each case is a T1-like crop around a curved, tapering tube (thick "head", thin "tail", like the
hippocampus) labelled 1 (anterior, head side) and 2 (posterior), split across the long axis. The tube
has grey-matter intensity and lies in bright white matter with a dark CSF crescent hugging one side;
grey-matter folds and blobs of the same intensity elsewhere in the crop make a plain intensity
threshold fail, so a model has to use shape and context. Shape, position, orientation, hemisphere,
contrast, smooth multiplicative bias field, Rician noise and slice thickness (anisotropic spacing
along the third axis, written in the NIfTI affine) vary per case.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

_PREFIX = "synthhippo"
_CURVE_POINTS = 48


@dataclass(frozen=True)
class _Size:
    n_train: int
    n_test: int
    xz: tuple[int, int]  # voxels along axes 0 and 2 (inclusive range)
    y: tuple[int, int]  # voxels along axis 1, the structure's long axis (as in the real crops)


_SIZES = {"small": _Size(12, 2, (28, 34), (34, 40)), "medium": _Size(60, 10, (34, 42), (44, 52))}


def write_msd(out: Path, seed: int, size: str) -> dict[str, object]:
    """Write ``dataset.json``, ``imagesTr/``, ``labelsTr/`` and ``imagesTs/`` into ``out``."""
    cfg = _SIZES[size]
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out / sub).mkdir()
    names = [f"{_PREFIX}_{i:03d}.nii.gz" for i in range(1, cfg.n_train + cfg.n_test + 1)]
    z_spacings = []
    for i, name in enumerate(names):
        image, label, spacing = _make_case(rng, cfg)
        z_spacings.append(spacing[2])
        if i < cfg.n_train:
            (out / "imagesTr" / name).write_bytes(_nifti_gz(image, spacing))
            (out / "labelsTr" / name).write_bytes(_nifti_gz(label, spacing))
        else:
            (out / "imagesTs" / name).write_bytes(_nifti_gz(image, spacing))
    dataset = _dataset_json(names[: cfg.n_train], names[cfg.n_train :], seed, size)
    (out / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n", encoding="utf-8")
    return {
        "training": cfg.n_train,
        "test": cfg.n_test,
        "slice_spacing_mm": [round(min(z_spacings), 2), round(max(z_spacings), 2)],
    }


def _make_case(rng: np.random.Generator, cfg: _Size) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """One case: float32 image, uint8 label (0, 1, 2) and voxel spacing in mm."""
    shape = (_draw_int(rng, cfg.xz), _draw_int(rng, cfg.y), _draw_int(rng, cfg.xz))
    spacing = (1.0, 1.0, round(float(rng.uniform(1.2, 3.0)), 2))
    coords = _grid_mm(shape, spacing)
    rho, t, side = _tube(rng, coords, shape, spacing)
    inside = rho < 1.0
    label = np.where(inside, np.where(t < rng.uniform(0.35, 0.5), 1, 2), 0).astype(np.uint8)
    image = _tissue(rng, coords, shape, spacing, rho, t, side)
    return image, label, spacing


def _draw_int(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _grid_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> np.ndarray:
    """Voxel centres in mm, centred on the crop: array of shape (*shape, 3)."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A random rotation of up to about 25 degrees in-plane and 15 degrees out of plane."""
    ax, ay, az = (
        np.radians(rng.uniform(-15, 15)),
        np.radians(rng.uniform(-15, 15)),
        np.radians(rng.uniform(-25, 25)),
    )
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...], sigma_mm: float
) -> np.ndarray:
    """Gaussian random field with unit standard deviation and a correlation length of ``sigma_mm``."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), [sigma_mm / s for s in spacing], mode="wrap")
    return (field / (field.std() + 1e-8)).astype(np.float32)


def _tube(
    rng: np.random.Generator, coords: np.ndarray, shape: tuple[int, ...], spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The hippocampus-like tube.

    Returns, per voxel: ``rho`` (distance to the centre line over the local radius, with a smooth
    irregular boundary; the tube is ``rho < 1``), ``t`` (position along the tube, 0 = head end) and
    ``side`` (signed offset towards the CSF side, to place the ventricle crescent).
    """
    extent_y = shape[1] * spacing[1]
    rot = _rotation(rng)
    hemi = rng.choice([-1.0, 1.0])  # left or right hippocampus: the bend is mirrored
    u, v, w = rot[:, 1], hemi * rot[:, 0], rot[:, 2]
    length = rng.uniform(0.6, 0.8) * extent_y
    centre = rng.uniform(-0.1, 0.1, 3) * np.array(shape) * np.array(spacing)
    tc = np.linspace(0.0, 1.0, _CURVE_POINTS)
    bend, sway = rng.uniform(2.0, 6.0), rng.uniform(-2.0, 2.0)
    curve = (
        centre
        + np.outer(tc - 0.5, u) * length
        + np.outer(np.sin(np.pi * tc) * bend, v)
        + np.outer(np.sin(2 * np.pi * tc) * sway, w)
    ).astype(np.float32)
    flat = coords.reshape(-1, 3)
    nearest = (-2.0 * flat @ curve.T + (curve**2).sum(1)).argmin(1)  # |x - c|^2 without the |x|^2 term
    offset = flat - curve[nearest]
    t = tc[nearest]
    r_head, r_tail = rng.uniform(0.13, 0.18) * extent_y, rng.uniform(0.065, 0.09) * extent_y
    radius = r_tail + (r_head - r_tail) * (1.0 - t) ** 1.3
    flatten = rng.uniform(0.75, 0.95)  # cross-section is an ellipse, flatter along w
    du, dv, dw = offset @ u, offset @ v, offset @ w
    dist = np.sqrt(du**2 + dv**2 + (dw / flatten) ** 2)
    rho = dist / radius + 0.12 * _smooth_noise(rng, shape, spacing, 2.5).reshape(-1)
    angle = rng.uniform(-0.6, 0.6) + np.pi * rng.integers(0, 2)  # CSF mostly beside the tube, in-plane
    side = np.cos(angle) * dv + np.sin(angle) * dw
    return rho.reshape(shape), t.reshape(shape), side.reshape(shape)


def _tissue(
    rng: np.random.Generator,
    coords: np.ndarray,
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    rho: np.ndarray,
    t: np.ndarray,
    side: np.ndarray,
) -> np.ndarray:
    """T1-like intensities: bright white matter, grey-matter tube and distractors, dark CSF; then
    partial-volume blur, texture, smooth bias field and Rician noise."""
    white, grey = 1.0, rng.uniform(0.58, 0.68)
    csf = rng.uniform(0.15, 0.3)
    rel = np.full(shape, white, dtype=np.float32)
    margin = rho > 1.5
    folds = _smooth_noise(rng, shape, spacing, 3.0) > rng.uniform(0.5, 0.9)
    rel[folds & margin] = grey + rng.uniform(-0.03, 0.03)
    half = np.abs(coords.reshape(-1, 3)).max(0)
    for _ in range(int(rng.integers(3, 7))):
        blob = _ellipsoid(rng, coords, half) & margin
        rel[blob] = grey + rng.uniform(-0.05, 0.05)
    crescent = (rho >= 1.0) & (rho < rng.uniform(1.3, 1.5)) & (side > 0) & (t > 0.15)
    rel[crescent] = csf
    rel[_smooth_noise(rng, shape, spacing, 2.0) > 2.2] = csf  # sulci / vessels elsewhere
    rel[rho < 1.0] = grey + rng.uniform(-0.04, 0.04)
    rel *= 1.0 + 0.04 * _smooth_noise(rng, shape, spacing, 1.0)
    rel = ndimage.gaussian_filter(rel, [0.6, 0.6, 0.5])
    bias = np.exp(0.2 * _bias_field(rng, coords))
    scale = rng.uniform(600.0, 1200.0)
    signal = rel * bias * scale
    sigma = rng.uniform(0.03, 0.07) * scale
    noisy = np.hypot(signal + rng.normal(0.0, sigma, shape), rng.normal(0.0, sigma, shape))
    return noisy.astype(np.float32)


def _ellipsoid(rng: np.random.Generator, coords: np.ndarray, half: np.ndarray) -> np.ndarray:
    """A grey-matter blob of 3-6 mm semi-axes, randomly oriented, centred anywhere within ``half``."""
    centre = rng.uniform(-half, half)
    axes = rng.uniform(3.0, 6.0, 3)
    local = (coords - centre) @ _rotation(rng)
    return ((local / axes) ** 2).sum(-1) < 1.0


def _bias_field(rng: np.random.Generator, coords: np.ndarray) -> np.ndarray:
    """Smooth second-order polynomial field in [-1, 1] over normalised coordinates."""
    x = coords / np.abs(coords.reshape(-1, 3)).max(0)
    terms = [x[..., 0], x[..., 1], x[..., 2], x[..., 0] * x[..., 1], x[..., 1] * x[..., 2], x[..., 0] ** 2]
    field = sum(c * term for c, term in zip(rng.uniform(-1, 1, len(terms)), terms, strict=True))
    return field / (np.abs(field).max() + 1e-8)


def _nifti_gz(array: np.ndarray, spacing: tuple[float, ...]) -> bytes:
    """NIfTI-1 bytes, gzipped with a zero timestamp so that equal inputs give equal files."""
    affine = np.diag([*spacing, 1.0])
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _dataset_json(train: list[str], test: list[str], seed: int, size: str) -> dict[str, object]:
    """``dataset.json`` with the same keys and conventions as the MSD Task04 file."""
    return {
        "name": "SyntheticHippocampus",
        "description": "Synthetic hippocampus-like MRI crops: anterior and posterior parts of a curved tube",
        "reference": "twinview synthetic generator (twinview data synth msd)",
        "licence": "CC0-1.0 (generated data, no third-party content)",
        "release": f"twinview synth msd, seed {seed}, size {size}",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": len(train),
        "numTest": len(test),
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in train],
        "test": [f"./imagesTs/{n}" for n in test],
    }
