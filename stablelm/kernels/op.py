"""The linear kernels as a torch custom operator, so that `torch.compile` can call them.

Kept apart from `stablelm.kernels` (which has `from __future__ import annotations`): the operator's
schema is read from these annotations.
"""

from typing import List, Optional  # noqa: UP035 - torch reads the schema from these annotations

import torch

from . import run_linear
from .linear import plan


@torch.library.custom_op("stablelm::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    weights: List[torch.Tensor],  # noqa: UP006
    biases: List[Optional[torch.Tensor]],  # noqa: UP006, UP045
) -> torch.Tensor:
    """y = x @ cat(weights)^T (+ cat(biases)) for `x` (M, K): on the kernel `plan` picks for these
    weights on this machine, else torch's F.linear (weights of one dtype, with a bias each or none)."""
    found = plan(weights[0].dtype, x.shape[1], weights[0].shape[0], biases[0] is not None, x.shape[0])
    same = all(
        plan(w.dtype, x.shape[1], w.shape[0], biases[0] is not None, x.shape[0]) == found for w in weights[1:]
    )
    if found is not None and same:
        return run_linear(found[0], x.contiguous(), weights, biases, found[1])
    return torch.cat([torch.nn.functional.linear(x, w, b) for w, b in zip(weights, biases, strict=True)], -1)


@linear.register_fake
def _(x, weights, biases):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))
