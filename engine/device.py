"""Where and in what precision a run computes, and how its random streams are seeded."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from engine import distributed as dist_utils
from twinview.errors import TwinviewError


class DeviceError(TwinviewError):
    """The requested device is not available on this machine."""


def select_device(preference: str) -> torch.device:
    """``auto``: this process's GPU under torchrun (or the first) when CUDA is there, else the CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceError("device=cuda but no CUDA device is available here; use device=auto or cpu")
        return torch.device("cuda", dist_utils.local_rank())
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); without it bf16 is emulated."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def select_amp(preference: str, device: torch.device, spatial_dims: int = 2) -> torch.dtype | None:
    """The autocast dtype: bf16 where it is fast and safe, fp16 on GPUs without bf16, else fp32.

    ``auto`` on the CPU takes bf16 only for 2D models on CPUs with native bf16: on a Xeon without
    AVX512-BF16, a ResNet-18 SimCLR step ran 2-3x slower in bf16 than in fp32, and torch 2.14's bf16
    ``conv3d`` backward on the CPU gave non-finite gradients (ResNet-18 on 16^3 patches).
    """
    if preference == "fp32":
        return None
    if preference == "fp16":
        return torch.float16
    if preference == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if spatial_dims == 3 or not cpu_has_native_bf16():
            return None
    return torch.bfloat16


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; ``deterministic`` also forbids non-deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def describe_devices() -> dict[str, object]:
    """What a run's provenance records of the compute: torch threads and the GPUs, if any."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"torch_threads": torch.get_num_threads(), "gpus": gpus,
            "cuda": torch.version.cuda if gpus else None}
