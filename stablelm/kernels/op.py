"""The linear kernels as a torch custom operator, so that `torch.compile` can call them.

Kept apart from `stablelm.kernels` (which has `from __future__ import annotations`): the operator's
schema is read from these annotations.
"""

from typing import Optional

import torch

from . import run_linear


@torch.library.custom_op("stablelm::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 - torch reads the schema from this annotation
    out_features: int,
    block: int,
) -> torch.Tensor:
    """y = x @ W^T (+ bias) for `x` (M, K) and `packed` = `pack(W)`, of the same dtype."""
    return run_linear(x.contiguous(), packed, bias, out_features, block)


@linear.register_fake
def _(x, packed, bias, out_features, block):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape[0], out_features)
