"""Two Gloo processes with DDP reproduce one process on the concatenated batch (SimCLR and MoCo).

The encoder has no BatchNorm, so per-rank batch statistics cannot make the runs differ (on GPUs,
SyncBN gives the same guarantee; it has no CPU kernel). Everything runs in float64.

Why the gradients are equal without rescaling: the global loss is the mean over ranks of the local
losses, L = (1/W) sum_r L_r. SimCLR's gather sums, in backward, the gradients that every L_r sends
to a rank's embeddings, so each rank holds d(sum_r L_r)/d(theta) through its own samples; DDP
averages over ranks, giving (1/W) d(sum_r L_r)/d(theta) = dL/d(theta). MoCo's keys are detached
and its queue is identical on all ranks, so each L_r depends only on local samples and DDP's
average is again dL/d(theta).
"""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engine.distributed import gather_no_grad, gather_with_grad, is_dist, rank, world_size
from pretrain.heads import MLPHead
from pretrain.methods import MoCoV2, SimCLR

WORLD = 2
BATCH = 8  # global; 4 per rank


class NoBNEncoder(nn.Module):
    feat_dim = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


def _method(name: str) -> nn.Module:
    torch.manual_seed(0)
    encoder = NoBNEncoder()
    projection = MLPHead([(4, 8, None, nn.ReLU()), (8, 6, None, None)])
    if name == "simclr":
        return SimCLR(encoder, projection, temperature=0.2).double()
    return MoCoV2(encoder, projection, queue_size=32, temperature=0.2).double()


def _batch() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 3, 6, 6, generator=g, dtype=torch.float64) for _ in range(2)]


def _worker(rank_: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank_,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        results = {}
        n = BATCH // WORLD
        for name in ("simclr", "moco"):
            method = _method(name)
            ddp = DistributedDataParallel(method, forward_sync_buffers=False)  # as the trainer should
            loss = ddp([v[rank_ * n : (rank_ + 1) * n] for v in _batch()])
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results[name] = {
                "local_loss": loss.detach(),
                "loss": mean_loss / WORLD,
                "grads": {k: p.grad for k, p in method.named_parameters() if p.requires_grad},
                "buffers": dict(method.named_buffers()),
            }
        torch.save(results, Path(out_dir) / f"rank{rank_}.pt")
        dist.barrier()  # no rank tears the group down while its peer still uses it
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in ("simclr", "moco"):
        method = _method(name)
        loss = method(_batch())
        loss.backward()
        assert not torch.allclose(ranks[0][name]["local_loss"], ranks[1][name]["local_loss"])
        for result in ranks:
            torch.testing.assert_close(result[name]["loss"], loss.detach(), rtol=0, atol=1e-5)
            for key, p in method.named_parameters():
                if p.requires_grad:
                    torch.testing.assert_close(result[name]["grads"][key], p.grad, rtol=0, atol=1e-5)
                else:
                    assert key not in result[name]["grads"]
            # MoCo: queue and pointer after one step, keys of both ranks in the single-process order
            for key, buffer in method.named_buffers():
                torch.testing.assert_close(result[name]["buffers"][key], buffer, rtol=0, atol=1e-5)
    assert ranks[0]["moco"]["buffers"]["queue_ptr"].item() == 2 * BATCH


def test_helpers_in_a_single_process():
    assert not is_dist() and rank() == 0 and world_size() == 1
    t = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(t) is t and gather_no_grad(t) is t
