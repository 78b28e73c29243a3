"""Parameter groups and the learning-rate schedule that every task shares."""

from __future__ import annotations

import math

import torch
from torch import nn


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(model: nn.Module, lr: float, weight_decay: float, backbone: nn.Module | None = None,
                 backbone_lr_mult: float = 1.0) -> list[dict]:
    """The trainable parameters in up to four groups: head or ``backbone`` (learning rate times
    ``backbone_lr_mult``), and with or without weight decay (biases and normalisation weights, the
    1-D tensors, get none)."""
    in_backbone = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in in_backbone, p.ndim <= 1), []).append(p)
    return [{"params": ps, "lr": lr * (backbone_lr_mult if is_backbone else 1.0),
             "weight_decay": 0.0 if no_decay else weight_decay}
            for (is_backbone, no_decay), ps in sorted(groups.items())]
