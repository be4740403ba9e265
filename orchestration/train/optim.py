"""AdamW, linear warmup + cosine decay, and gradient clipping that works on FSDP2 (DTensor) grads."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from orchestration.config import OptimSection


def build_optimizer(params: list[nn.Parameter], optim: OptimSection) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm scales, biases and 1-d embeddings are not decayed)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # foreach works on DTensors; fused AdamW does not support every CPU/DTensor combination.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=tuple(optim.betas), foreach=True)


def lr_factor(step: int, total_steps: int, warmup_fraction: float, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR before optimizer step ``step`` (0-based): linear warmup, then cosine
    down to ``min_lr_ratio`` at the last step."""
    warmup = int(round(warmup_fraction * total_steps))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    decay_steps = max(total_steps - warmup, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSection, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, optim.warmup_fraction, optim.min_lr_ratio)
    )


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Total L2 norm of the gradients (over every rank's shards), clipped to ``max_norm`` in place.

    Returns the norm before clipping as a plain scalar tensor (inf/nan pass through, so the caller can
    skip the step).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):
        # FSDP2 grads are sharded DTensors: the local norm is a partial sum; full_tensor() reduces it.
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total
