"""The bf16 linear kernel as a torch custom operator, so that `torch.compile` can call it.

Kept apart from `stablelm.kernels` (which has `from __future__ import annotations`): the operator's
schema is read from these annotations.
"""

from typing import Optional

import torch

from . import run_linear_bf16


@torch.library.custom_op("stablelm::linear_bf16", mutates_args=())
def linear_bf16(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 - torch reads the schema from this annotation
    out_features: int,
    block: int,
) -> torch.Tensor:
    """y = x @ W^T (+ bias) for `x` (M, K) bf16 and `packed` = `pack_bf16(W)`."""
    return run_linear_bf16(x.contiguous(), packed, bias, out_features, block)


@linear_bf16.register_fake
def _(x, packed, bias, out_features, block):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape[0], out_features)
