"""Synthetic microscopy images of cell nuclei in the 2018 Data Science Bowl (DSB2018) layout.

Each sample is ``<id>/images/<id>.png`` with one binary (0/255, single-channel) PNG per nucleus in
``<id>/masks/<id>_<k>.png``, named as in the shared stage-1 test copy. Nuclei are ellipses with
irregular, wavy outlines, varied size, brightness and inner texture; many lie alone, many touch a
neighbour (separate masks with a shared border) and a few overlap one: their masks share pixels, which
the real annotations never do, so that overlap handling gets exercised. Three styles mimic the main DSB
modalities: fluorescence (bright grey on dark, RGBA with a constant alpha as many real files),
brightfield (dark blue-violet on light) and H&E-like histology (purple on textured pink), both RGB.
Images get optical blur, uneven illumination and noise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

STYLES = ("fluorescence", "brightfield", "fluorescence", "histology")  # cycled: fluorescence is most common
_MAX_OVERLAPS = 3  # overlapping pairs per image
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29])  # optical density per RGB channel (Ruifrok & Johnston)
_EOSIN = np.array([0.07, 0.99, 0.11])


@dataclass(frozen=True)
class _Size:
    n_images: int
    side: int


_SIZES = {"small": _Size(6, 128), "medium": _Size(40, 256)}
Window = tuple[slice, slice]


def write_nuclei(out: Path, seed: int, size: str) -> dict[str, object]:
    """Write ``<id>/images/<id>.png`` and ``<id>/masks/<id>_<k>.png`` for each sample into ``out``."""
    cfg = _SIZES[size]
    rng = np.random.default_rng(seed)
    n_nuclei = n_overlapping = 0
    for i in range(cfg.n_images):
        sample_id = hashlib.sha256(f"twinview-synth-nuclei-{seed}-{i}".encode()).hexdigest()
        masks, overlaps = _place_nuclei(rng, cfg.side)
        image = _render(rng, masks, STYLES[i % len(STYLES)], cfg.side)
        (out / sample_id / "images").mkdir(parents=True)
        (out / sample_id / "masks").mkdir()
        Image.fromarray(image).save(out / sample_id / "images" / f"{sample_id}.png")
        for k, mask in enumerate(masks):
            mask_png = Image.fromarray(mask.astype(np.uint8) * 255)
            mask_png.save(out / sample_id / "masks" / f"{sample_id}_{k}.png")
        n_nuclei += len(masks)
        n_overlapping += overlaps
    return {
        "images": cfg.n_images,
        "image_size": cfg.side,
        "nuclei": n_nuclei,
        "overlapping_pairs": n_overlapping,
    }


def _place_nuclei(rng: np.random.Generator, side: int) -> tuple[list[np.ndarray], int]:
    """Boolean masks of the nuclei in one image and the number of overlapping pairs.

    A candidate is either free (kept only if it touches nothing), touching (placed against a
    neighbour and clipped to it, so the two share a border but no pixels) or, for a few, overlapping
    one neighbour. Shapes are drawn in small windows; ``owner`` maps each pixel to its first nucleus.
    """
    radius = rng.uniform(4.0, 8.0) * (side / 128) ** 0.5
    target = int(rng.uniform(0.12, 0.3) * side * side / (np.pi * radius**2))
    owner = np.zeros((side, side), np.int32)
    shapes: list[tuple[Window, np.ndarray]] = []
    centres: list[tuple[float, float, float]] = []
    overlaps = 0
    for _ in range(4 * target):
        if len(shapes) >= target:
            break
        r = radius * rng.uniform(0.7, 1.3)
        mode = "free" if not shapes else str(rng.choice(["free", "touch", "overlap"], p=[0.55, 0.38, 0.07]))
        if mode == "overlap" and overlaps >= _MAX_OVERLAPS:
            mode = "touch"
        if mode == "free":
            cy, cx = rng.uniform(0, side, 2)
        else:
            ny, nx, nr = centres[int(rng.integers(len(centres)))]
            gap = (nr + r) * (rng.uniform(0.85, 1.0) if mode == "touch" else rng.uniform(0.45, 0.7))
            angle = rng.uniform(0, 2 * np.pi)
            cy, cx = ny + gap * np.sin(angle), nx + gap * np.cos(angle)
        window, mask = _nucleus(rng, side, cy, cx, r)
        taken = owner[window] > 0
        if mode == "free" and (ndimage.binary_dilation(mask) & taken).any():
            continue
        if mode == "touch":
            mask &= ~taken
        elif mode == "overlap" and len(np.unique(owner[window][mask & taken])) != 1:
            continue
        if mask.sum() < 15 or not _connected(mask):
            continue
        overlaps += mode == "overlap"
        shapes.append((window, mask))
        centres.append((cy, cx, r))
        owner[window][mask & ~taken] = len(shapes)
    return [_full(side, window, mask) for window, mask in shapes], overlaps


def _nucleus(
    rng: np.random.Generator, side: int, cy: float, cx: float, r: float
) -> tuple[Window, np.ndarray]:
    """An ellipse (axis ratio up to 2) whose outline is modulated by a few low harmonics.

    Returns the image window that holds it (with a one-pixel margin, clipped to the image) and the
    mask inside that window.
    """
    a, b = r * rng.uniform(1.0, 1.4), r * rng.uniform(0.7, 1.0)
    theta = rng.uniform(0, np.pi)
    reach = 1.2 * a + 2
    window = (_span(cy, reach, side), _span(cx, reach, side))
    yy, xx = np.mgrid[window]
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    phi = np.arctan2(v, u)
    edge = a * b / np.sqrt((b * np.cos(phi)) ** 2 + (a * np.sin(phi)) ** 2)
    for k in range(2, 6):
        edge = edge * (1 + rng.uniform(0, 0.08) / np.sqrt(k) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)))
    return window, np.hypot(u, v) < edge


def _span(centre: float, reach: float, side: int) -> slice:
    """Pixels within ``reach`` of ``centre`` along one axis, clipped to the image (may be empty)."""
    start = min(max(int(centre - reach), 0), side)
    return slice(start, max(min(int(centre + reach) + 2, side), start))


def _full(side: int, window: Window, mask: np.ndarray) -> np.ndarray:
    full = np.zeros((side, side), bool)
    full[window] = mask
    return full


def _connected(mask: np.ndarray) -> bool:
    """True when the mask is one 4-connected piece (clipping a touching nucleus can split it)."""
    return ndimage.label(mask)[1] == 1


def _render(rng: np.random.Generator, masks: list[np.ndarray], style: str, side: int) -> np.ndarray:
    """Image of the nuclei in ``style``: RGBA uint8 for fluorescence, RGB uint8 for the others."""
    texture = 1 + 0.2 * _smooth(rng, side, 1.5)
    stain = np.zeros((side, side), np.float32)
    for mask in masks:
        stain += mask * rng.uniform(0.5, 1.0)  # overlapping nuclei add up
    stain = ndimage.gaussian_filter(stain * texture, rng.uniform(0.6, 1.5))
    light = 1 + 0.15 * _smooth(rng, side, side / 4)
    if style == "fluorescence":
        grey = (rng.uniform(2, 20) + stain * rng.uniform(80, 220)) * light
        grey = grey + rng.normal(0, 1, grey.shape) * np.sqrt(grey) * 0.6
        rgb = np.repeat(grey[..., None], 3, axis=-1)
    elif style == "brightfield":
        background = np.array([rng.uniform(205, 235), rng.uniform(205, 235), rng.uniform(190, 220)])
        rgb = background * light[..., None] * np.exp(-_HEMATOXYLIN * stain[..., None] * rng.uniform(1.2, 2.0))
    else:
        tissue = np.clip(0.4 + 0.25 * _smooth(rng, side, 3.0), 0, 1)
        density = _HEMATOXYLIN * stain[..., None] * rng.uniform(1.0, 1.6) + _EOSIN * tissue[..., None] * 0.5
        rgb = rng.uniform(225, 250) * light[..., None] * np.exp(-density)
    rgb = np.clip(rgb + rng.normal(0, 2.0, rgb.shape), 0, 255).astype(np.uint8)
    if style == "fluorescence":
        return np.dstack([rgb, np.full((side, side), 255, np.uint8)])
    return rgb


def _smooth(rng: np.random.Generator, side: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``sigma`` pixels."""
    field = ndimage.gaussian_filter(rng.standard_normal((side, side)), sigma)
    return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)
