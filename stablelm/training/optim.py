"""The optimiser and its schedule: AdamW with weight decay on the weight matrices, warmup then cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight matrices and embeddings decay; biases and LayerNorm weights do not.

    Decaying a norm's gain or a bias pulls it towards zero, which only hurts; matrices are what decay
    regularises. A tied LM head is the embedding's parameter and is counted once.
    """
    decay, no_decay = [], []
    for _, parameter in model.named_parameters():  # shared parameters come once
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW over `parameter_groups(model)`; the learning rate is set each step from `learning_rate_at`."""
    return torch.optim.AdamW(parameter_groups(model, weight_decay=weight_decay), lr=lr, betas=betas, eps=eps)


def learning_rate_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The learning rate of optimiser step `step` (0-based): linear warmup to `lr`, cosine decay to `min_lr`.

    A pure function of the step, so the schedule needs no state of its own to resume.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
