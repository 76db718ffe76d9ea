"""TrainingArguments: the settings of a training run, checked once when they are made."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

PRECISIONS = ("auto", "fp32", "bf16")
MAX_SEED = 2**32 - 1  # what NumPy's and Python's seeding (see stablelm.seeding) accept
# The `stablelm train` flag of each field whose name differs from the field's, for messages.
FLAGS = {
    "learning_rate": "--lr",
    "min_learning_rate": "--min-lr",
    "gradient_accumulation_steps": "--grad-accum",
}


@dataclass
class TrainingArguments:
    """Settings of a training run; the `stablelm train` flags of the same names (see `FLAGS` for the others).

    A warmup longer than the run is allowed, as in Hugging Face's Trainer, with a warning: the learning rate
    then never reaches its peak and never decays.

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
        _check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        _check_number("learning_rate", self.learning_rate)
        if not self.learning_rate > 0:
            raise ValueError(
                f"learning_rate must be positive, got {self.learning_rate:g} ({_flag('learning_rate')})."
            )
        if self.min_learning_rate is not None:
            _check_number("min_learning_rate", self.min_learning_rate)
            if not 0 <= self.min_learning_rate <= self.learning_rate:
                raise ValueError(
                    f"min_learning_rate must be in [0, learning_rate] = [0, {self.learning_rate:g}], got "
                    f"{self.min_learning_rate:g} ({_flag('min_learning_rate')}, {_flag('learning_rate')})."
                )
        _check_number("weight_decay", self.weight_decay)
        if self.weight_decay < 0:
            raise ValueError(
                f"weight_decay must be >= 0, got {self.weight_decay:g} ({_flag('weight_decay')})."
            )
        if self.max_grad_norm is not None:
            _check_number("max_grad_norm", self.max_grad_norm, infinite=True)
            if self.max_grad_norm <= 0:
                raise ValueError(
                    f"max_grad_norm must be positive (or None for no clipping), got {self.max_grad_norm:g} "
                    f"({_flag('max_grad_norm')})."
                )
        if len(self.adam_betas) != 2 or not all(
            isinstance(b, (int, float)) and 0 <= b < 1 for b in self.adam_betas
        ):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if self.warmup_steps > self.max_steps:
            warnings.warn(
                f"warmup_steps ({_flag('warmup_steps')}) is {self.warmup_steps}, longer than the run: max_steps "
                f"({_flag('max_steps')}) is {self.max_steps}. The learning rate only climbs to "
                f"{self.max_steps / self.warmup_steps:.0%} of its peak and never decays; lower --warmup-steps (a "
                "few percent of --max-steps is usual) or raise --max-steps.",
                UserWarning,
                stacklevel=3,
            )


def _flag(field: str) -> str:
    """The `stablelm train` flag that sets `field`: "--lr" for learning_rate."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def _check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r} ({_flag(name)}).")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an integer <= {maximum}, got {value!r} ({_flag(name)}).")


def _check_number(name: str, value: Any, *, infinite: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r} ({_flag(name)}).")
    if math.isnan(value) or (math.isinf(value) and not infinite):
        raise ValueError(f"{name} must be a finite number, got {value} ({_flag(name)}).")
