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


def select_amp(preference: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: on a GPU bf16 (fp16 without bf16); on the CPU ``auto`` is fp32.

    bf16 autocast on the CPU is not safe with torch 2.14: on an AMX Xeon a ResNet-18 SimCLR run on
    64x32 crops gave non-finite activations within 10 steps (with channels_last inputs or without, one
    thread or two), ``conv3d`` backward gave non-finite gradients, and CPUs without native bf16 ran a
    step 2-3x slower. ``bf16`` still forces it, for CPUs where it is known to work.
    """
    if preference == "fp32":
        return None
    if preference == "fp16":
        return torch.float16
    if preference == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
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
