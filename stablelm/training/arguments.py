"""TrainingArguments: the settings of a training run, checked once when they are made."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainingArguments:
    """Settings of a training run; the `stablelm train` flags of the same names.

    Attributes:
        output_dir: Where checkpoints (`checkpoint-{step}`) and the final model go.
        max_steps: Optimiser steps to train for.
        batch_size: Blocks per micro-batch.
        gradient_accumulation_steps: Micro-batches per optimiser step (the effective batch is their product).
        learning_rate: Peak learning rate, reached at the end of warmup.
        min_learning_rate: Where the cosine decay ends (default: a tenth of the peak).
        warmup_steps: Steps of linear warmup from zero.
        weight_decay: AdamW weight decay of the weight matrices (not of biases and norms).
        adam_betas: AdamW's (beta1, beta2).
        max_grad_norm: Clip the gradient to this global norm (None: no clipping).
        eval_interval: Measure the held-out loss every this many steps (and at the end).
        eval_batches: Use at most this many held-out batches per evaluation (None: all).
        save_interval: Write a checkpoint every this many steps (and at the end).
        save_total_limit: Keep this many newest checkpoints (0 keeps all).
        seed: Seed of the data order (and, through the caller, of the initial weights).
        precision: "fp32", "bf16" (autocast; weights and optimiser stay fp32) or "auto" (bf16 on a GPU that
            supports it, else fp32).
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
    """

    output_dir: str | os.PathLike
    max_steps: int = 1000
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    min_learning_rate: float | None = None
    warmup_steps: int = 100
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = 1.0
    eval_interval: int = 100
    eval_batches: int | None = None
    save_interval: int = 500
    save_total_limit: int = 2
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in (
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "eval_interval",
            "save_interval",
        ):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "save_total_limit"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.eval_batches is not None:
            _check_int("eval_batches", self.eval_batches, minimum=1)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        if self.min_learning_rate is not None and not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError(
                f"min_learning_rate must be in [0, learning_rate], got {self.min_learning_rate}."
            )
        if self.weight_decay < 0 or (self.max_grad_norm is not None and self.max_grad_norm <= 0):
            raise ValueError(
                "weight_decay must be >= 0 and max_grad_norm positive (or None for no clipping)."
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
