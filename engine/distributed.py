"""Small torch.distributed helpers; every function is a no-op (or identity) in a single process.

Launch with ``torchrun --nproc_per_node=G ...``, call ``setup_from_env()`` first and ``cleanup()`` last.
Wrap the *method* (not only its encoder) in DDP so that one forward computes the whole loss::

    method = nn.SyncBatchNorm.convert_sync_batchnorm(method)  # optional SyncBN, CUDA/NCCL only
    ddp = DistributedDataParallel(method, device_ids=[local_rank], forward_sync_buffers=False)

SyncBN normalises with the statistics of the global batch (as SimCLR's large-batch training and
MoCo v3 do); without it each GPU normalises its own sub-batch, which also lets MoCo's queries and
keys "cheat" through per-GPU statistics (shuffle-BN is not implemented).
``forward_sync_buffers=False`` (formerly ``broadcast_buffers=False``) avoids re-sending MoCo's queue,
identical on all ranks by construction, from rank 0 at every forward; buffers are still synced when
DDP is constructed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def is_dist() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    """This process's GPU index on its node (torchrun's ``LOCAL_RANK``), 0 when not launched by torchrun."""
    return int(os.environ.get("LOCAL_RANK", 0))


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns each rank the summed gradient of its rows."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # type: ignore[override]
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        ctx.rows = t.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on every rank's rows
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` (same shape on every rank) from all ranks in rank order, differentiably.

    The gradient reaching the local rows is the sum over ranks of the gradients of their losses, so
    with DDP's gradient averaging the update equals the single-process one on the concatenated batch
    when the loss is the mean over ranks of the local losses.
    """
    return _GatherWithGrad.apply(t) if world_size() > 1 else t


@torch.no_grad()
def gather_no_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` from all ranks in rank order, without gradient."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def setup_from_env() -> None:
    """Join the process group described by torchrun's variables (``WORLD_SIZE`` > 1), if any.

    Backend NCCL with ``cuda:local_rank()`` made the current device when CUDA is available, else Gloo.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or is_dist():
        return
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")


def cleanup() -> None:
    """Leave the process group, if one was joined, once every rank has got here.

    Without the barrier a rank that finishes first (the others still writing files) tears its Gloo
    pairs down under its peers, which can abort a peer's process.
    """
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()
