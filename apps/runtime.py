"""Run an exported twinview model with onnxruntime and numpy only, as its embedded model card says.

:class:`OnnxModel` opens a file written by ``twinview export`` and reads its card;
:func:`embed` turns person crops into L2-normalised embeddings (re-ID models and pretrained encoders);
:func:`segment` turns a preprocessed image or volume into class logits by Gaussian-weighted sliding
windows (a 2D model on a volume runs slice by slice); :func:`detect` turns an image as read into boxes,
category ids and scores. The sliding windows are our own numpy code
because MONAI's inferer needs torch; they follow MONAI's ``sliding_window_inference`` (same window
starts, padding, Gaussian weights with sigma = 0.125 x window), and a test holds them to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from twinview.errors import DataError
from twinview.model_card import read_onnx_card

Predictor = Callable[[np.ndarray], np.ndarray]


class OnnxModel:
    """An exported model: its onnxruntime session (CPU) and its model card."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.card: dict[str, Any] = read_onnx_card(self.path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.card["export"]["input"]["name"]

    @property
    def task(self) -> str:
        return self.card["task"]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """The network on a preprocessed float32 batch (B, C, *spatial)."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def normalise_intensity(image: np.ndarray, intensity: dict[str, Any]) -> np.ndarray:
    """The card's intensity step on a channel-first float image (C, *spatial)."""
    x = np.asarray(image, dtype=np.float32)
    kind = intensity["kind"]
    if kind == "ct_window":
        low, high = intensity["window"]
        return np.clip((x - low) / (high - low), 0.0, 1.0)
    if kind == "percentile":
        low_p, high_p = intensity["percentiles"]
        out = np.empty_like(x)
        for c in range(len(x)):
            low, high = np.percentile(x[c], [low_p, high_p])
            out[c] = np.clip((x[c] - low) / (high - low), 0.0, 1.0) if high > low else x[c] - low
        return out
    if kind == "zscore_nonzero":
        out = x.copy()
        for c in range(len(x)):
            mask = x[c] != 0
            if mask.any():
                values = x[c][mask]
                std = values.std()
                out[c][mask] = (values - values.mean()) / (std if std > 0 else 1.0)
        return out
    mean = np.asarray(intensity["mean"], dtype=np.float32).reshape(-1, *[1] * (x.ndim - 1))
    std = np.asarray(intensity["std"], dtype=np.float32).reshape(-1, *[1] * (x.ndim - 1))
    return (x / np.float32(intensity["max_value"]) - mean) / std


def embed(model: OnnxModel, images: Sequence[np.ndarray], flip: bool = False) -> np.ndarray:
    """(N, D) L2-normalised embeddings of RGB images (H, W, 3), uint8 or float in [0, 255]; with ``flip``
    the features of each image and of its horizontal mirror image are averaged before normalising, as
    :func:`downstream.reid.model.embed` does (an index records which was used: queries must match it)."""
    import cv2

    if model.task not in ("reid", "pretraining") or model.card["spatial_dims"] != 2:
        raise DataError(model.path, f"a {model.task} model does not embed images; export a re-ID model "
                                    "or a 2D pretrained encoder")
    h, w = model.card["input_size"]
    intensity = model.card["preprocessing"]["intensity"]
    batch = []
    for image in images:
        rgb = np.asarray(image)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise DataError(None, f"an RGB image (H, W, 3) is needed, got shape {rgb.shape}")
        resized = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        batch.append(normalise_intensity(np.moveaxis(resized.astype(np.float32), -1, 0), intensity))
    x = np.stack(batch)
    feats = model(np.concatenate([x, x[..., ::-1]])).reshape(2, len(x), -1).mean(0) if flip else model(x)
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


def gaussian_weights(window: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """MONAI's Gaussian importance map: a product of 1-D Gaussians (sigma = scale x size), clamped
    below at its minimum or 1e-3, whichever is larger."""
    weights = np.ones((), dtype=np.float32)
    for size in window:
        x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
        weights = np.multiply.outer(weights, np.exp(x**2 / np.float32(-2 * (sigma_scale * size) ** 2)))
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def _starts(size: int, window: int, overlap: float) -> list[int]:
    step = window if window == size else max(int(window * (1 - overlap)), 1)
    starts, start = [], 0
    while True:
        starts.append(min(start, size - window))
        if start + window >= size:
            return starts
        start += step


def sliding_window(batch: np.ndarray, window: Sequence[int], predictor: Predictor, overlap: float = 0.25,
                   sw_batch_size: int = 32) -> np.ndarray:
    """Logits (B, K, *spatial) of ``predictor`` over Gaussian-blended windows of a batch (B, C, *spatial);
    images smaller than the window are zero-padded symmetrically, as MONAI does."""
    batch = np.asarray(batch, dtype=np.float32)
    spatial = batch.shape[2:]
    short = [max(w - s, 0) for w, s in zip(window, spatial, strict=True)]
    pad = [(d // 2, d - d // 2) for d in short]
    padded = np.pad(batch, [(0, 0), (0, 0), *pad])
    size = padded.shape[2:]
    corners = list(product(*[_starts(s, w, overlap) for s, w in zip(size, window, strict=True)]))
    boxes = [tuple(slice(c, c + w) for c, w in zip(corner, window, strict=True)) for corner in corners]
    weights = gaussian_weights(window)
    jobs = [(b, box) for b in range(len(batch)) for box in boxes]
    out: np.ndarray | None = None
    count = np.zeros(size, dtype=np.float32)
    for i in range(0, len(jobs), sw_batch_size):
        chunk = jobs[i:i + sw_batch_size]
        logits = predictor(np.stack([padded[(b, slice(None), *box)] for b, box in chunk]))
        if out is None:
            out = np.zeros((len(batch), logits.shape[1], *size), dtype=np.float32)
        for (b, box), value in zip(chunk, logits, strict=True):
            out[(b, slice(None), *box)] += value * weights
    for box in boxes:
        count[box] += weights
    crop = tuple(slice(before, before + s) for (before, _), s in zip(pad, spatial, strict=True))
    return (out / count)[(slice(None), slice(None), *crop)]


def segment(model: OnnxModel, image: np.ndarray, overlap: float = 0.25,
            sw_batch_size: int = 32) -> np.ndarray:
    """Class logits (K, *spatial) of a preprocessed channel-first image or volume (C, *spatial)."""
    if model.task != "segmentation":
        raise DataError(model.path, f"a {model.task} model does not segment; export a segmentation run")
    card = model.card
    image = np.asarray(image, dtype=np.float32)
    if image.shape[0] != card["in_channels"]:
        raise DataError(None, f"the model takes {card['in_channels']} channel(s), the image has "
                              f"{image.shape[0]}")
    window = card["patch_size"]
    if image.ndim - 1 == card["spatial_dims"]:
        return sliding_window(image[None], window, model, overlap, sw_batch_size)[0]
    axis = card["preprocessing"]["slice_axis"]
    if card["spatial_dims"] != 2 or image.ndim != 4 or axis is None:
        raise DataError(None, f"a {card['spatial_dims']}D model cannot segment an image of shape "
                              f"{image.shape}")
    slices = np.moveaxis(image, axis + 1, 0)  # (S, C, a, b)
    return np.moveaxis(sliding_window(slices, window, model, overlap, sw_batch_size), 0, axis + 1)


def detection_pixels(model: OnnxModel, image: np.ndarray) -> np.ndarray:
    """An image as read, (H, W) or (H, W, C) with C = 1 or 3 (2 or 4: alpha, dropped), as the detector's
    input (in_channels, H, W) float32 in [0, 1], as training read it: grey repeated to RGB or RGB averaged
    to grey, then divided by the card's ``max_value`` and clipped."""
    channels = model.card["in_channels"]
    x = np.asarray(image)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[2] not in (1, 2, 3, 4) or min(x.shape[:2]) < 1:
        raise DataError(None, f"a 2D image (H, W) or (H, W, C) with 1 or 3 channels is needed, got shape "
                              f"{x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise DataError(None, f"pixel type {x.dtype} is not a real number")
    x = x[..., : 1 if x.shape[2] < 3 else 3].astype(np.float32)  # alpha dropped
    if x.shape[2] != channels:
        x = np.repeat(x, 3, axis=2) if channels == 3 else x.mean(axis=2, keepdims=True)
    max_value = np.float32(model.card["preprocessing"]["intensity"]["max_value"])
    return np.ascontiguousarray(np.moveaxis(np.clip(x / max_value, 0.0, 1.0), -1, 0))


def detect(model: OnnxModel, image: np.ndarray, score_threshold: float = 0.0
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (N, 4) float32 xyxy in the image's pixels, labels (N,) int64 as the card's category ids and
    scores (N,) float32, highest first, of the detections scoring at least ``score_threshold``; ``image``
    as read, (H, W) or (H, W, C) (see :func:`detection_pixels`)."""
    if model.task != "detection":
        raise DataError(model.path, f"a {model.task} model does not detect; export a detection run")
    pixels = detection_pixels(model, image)
    names = [o.name for o in model.session.get_outputs()]
    found = dict(zip(names, model.session.run(None, {model.input_name: pixels}), strict=True))
    boxes = np.asarray(found["boxes"], np.float32).reshape(-1, 4)
    scores = np.asarray(found["scores"], np.float32).reshape(-1)
    ids = np.asarray(model.card["architecture"]["category_ids"], np.int64)
    labels = np.asarray(found["labels"], np.int64).reshape(-1)
    # RetinaNet scores the background (label 0) like a category; a trained one scores it near 0
    keep = (scores >= score_threshold) & (labels >= 1) & (labels <= len(ids))
    return boxes[keep], ids[labels[keep] - 1], scores[keep]
