"""Whole-image inference by MONAI sliding windows; a 2D model runs on a volume's slices in batches."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, model_dims: int, roi: Sequence[int],
                   slice_axis: int, sw_batch_size: int = 32, overlap: float = 0.25,
                   amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Class logits (K, *spatial) for one preprocessed image (C, *spatial).

    A 2D model on a 3D volume sees the slices along ``slice_axis`` (0-2, spatial) as a batch; windows
    of size ``roi`` (the image is padded where smaller) are blended with Gaussian weights.
    """
    device = next(model.parameters()).device
    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    image = image.to(device).float()
    image_dims = image.ndim - 1
    if model_dims == 3 and image_dims != 3:
        raise ValueError(f"a 3D model needs a volume (C, D, H, W), got shape {tuple(image.shape)}")
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    try:
        with autocast:
            if model_dims == image_dims:
                logits = sliding_window_inference(image[None], tuple(roi), sw_batch_size, model, overlap,
                                                  mode="gaussian")[0]
            else:
                slices = image.movedim(slice_axis + 1, 0)  # (S, C, a, b)
                out = sliding_window_inference(slices, tuple(roi), sw_batch_size, model, overlap,
                                               mode="gaussian")
                logits = out.movedim(0, slice_axis + 1)
    finally:
        model.train(was_training)
    return logits.float().cpu()
