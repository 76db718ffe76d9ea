"""The model's linear layer: `nn.Linear`, whose inference runs on stablelm's kernels where they serve.

Nothing is transformed or copied: the weights stay the checkpoint's dense Parameters (what
`state_dict`, optimizers, peft and `.to()` see), and each call picks its kernel. A call runs on a
native kernel (`stablelm.kernels`) in inference (autograd off: `torch.no_grad()`,
`torch.inference_mode()`, as `generate` and evaluation tools run), when the input is on the CPU in the
weight's dtype and a kernel serves that dtype here (half precision only where it gives torch's bits,
see `stablelm.kernels.linear`); otherwise it is `F.linear`, exactly as in `nn.Linear`. So training
(frozen weights under LoRA included), autograd and every other device or dtype go through torch as
before, with the reference's numbers.

`fused_linear` computes several projections of one input (q/k/v, gate/up) in one kernel call, the
outputs side by side, without a concatenated copy of their weights.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from .kernels import call, kernel
from .kernels import op as _op  # noqa: F401 - registers torch.ops.stablelm.linear
from .kernels.linear import plan

OPTIMIZE_ENV = "STABLELM_OPTIMIZE"
_ONE_ROW = contextvars.ContextVar("stablelm_one_row_bits", default=False)


@contextmanager
def one_row_bits() -> Iterator[None]:
    """Within it, each row of a `Linear`'s input (autograd off) gets the bits a call on that row alone
    gets: the kernel planned for one row over all the rows (its sums per row do not depend on the row
    count), else torch's `F.linear` row by row. torch's own half-precision product over several rows can
    round otherwise (oneDNN on an AVX512-BF16 Zen 4, K = 2560, from 4 rows on). Speculative decoding's
    check runs the modules so, to give each draft position the one-token step's logits."""
    token = _ONE_ROW.set(True)
    try:
        yield
    finally:
        _ONE_ROW.reset(token)


def one_row_active() -> bool:
    """Whether the caller is inside `one_row_bits` (other layer types follow it too: quantized ones)."""
    return _ONE_ROW.get()


def linear_by_row(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """torch's `F.linear` over `rows` (M, K) one row at a time: each row's product as a call on that row
    alone gives it (see `one_row_bits`)."""
    return torch.cat([F.linear(rows[r : r + 1], weight, bias) for r in range(rows.shape[0])])


def linear_in_check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """Inside `one_row_bits` (autograd off, not compiling) with several rows in x (..., K): torch's
    `F.linear` row by row, shaped as x (..., N); else None (the caller's own product)."""
    if (
        torch.compiler.is_compiling()  # (a ContextVar is not traced: and checked first)
        or not _ONE_ROW.get()
        or torch.is_grad_enabled()
        or x.dim() < 2
        or x.numel() <= x.shape[-1]
    ):
        return None
    y = linear_by_row(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], y.shape[-1])


def optimize_by_default() -> bool:
    """Whether new layers use the kernels: yes, unless `STABLELM_OPTIMIZE=0`."""
    return os.environ.get(OPTIMIZE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, state dict and gradients) with inference on stablelm's kernels.

    Attributes:
        use_kernels: False keeps torch's kernels for every call (`from_pretrained(optimize=False)`,
            `STABLELM_OPTIMIZE=0`).
    """

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - nn.Linear's signature
        super().__init__(*args, **kwargs)
        self.use_kernels = optimize_by_default()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fused_linear(x, (self,))
        if y is not None:
            return y
        y = linear_in_check(x, self.weight, self.bias)  # see `one_row_bits`
        return F.linear(x, self.weight, self.bias) if y is None else y


def _plain(module: nn.Module) -> bool:
    """A stablelm Linear that nothing wraps or hooks: its call may be folded into a fused one."""
    return type(module) is Linear and not (module._forward_hooks or module._forward_pre_hooks)


def fused_linear(x: torch.Tensor, linears: tuple[nn.Module, ...]) -> torch.Tensor | None:
    """`cat([layer(x) for layer in linears], -1)` in one native kernel call, or None where torch must
    serve (see the module docstring): then call the layers themselves.

    Several layers are fused only when each is a plain `Linear` of the same dtype and bias presence,
    without hooks (a peft adapter or a forward hook on one of them keeps its own call).
    """
    if len(linears) > 1 and not (
        all(_plain(m) for m in linears)
        and not (_module._global_forward_hooks or _module._global_forward_pre_hooks)
    ):
        return None
    if torch.is_grad_enabled():  # autograd's calls (training, LoRA on frozen weights): torch's
        return None
    first = linears[0]
    # the hot path of decoding (~50-130 calls a token): the module's tensors straight from its dict
    params = first._parameters
    weight, bias = params["weight"], params["bias"]
    if not (first.use_kernels and x.is_cpu and weight.is_cpu and x.dtype == weight.dtype):
        return None
    if bias is not None and bias.dtype != weight.dtype:
        return None
    k = weight.shape[1]
    if x.shape[-1] != k:
        return None  # F.linear says what does not fit
    if len(linears) == 1:
        weights, biases = [weight], [bias]
    else:
        weights = [m._parameters["weight"] for m in linears]
        biases = [m._parameters["bias"] for m in linears]
        for m, w, b in zip(linears, weights, biases, strict=True):
            if (
                not m.use_kernels
                or w.dtype != weight.dtype
                or w.shape[1] != k
                or (b is None) != (bias is None)
            ):
                return None
    rows = x.reshape(-1, k)
    if torch.compiler.is_compiling():  # an operator the graph can call; it picks the kernel itself
        y = torch.ops.stablelm.linear(rows, weights, biases)
    else:
        planned = 1 if _ONE_ROW.get() else rows.shape[0]  # the plan for one row over all of them
        found = plan(weight.dtype, k, weight.shape[0], bias is not None, planned)
        if found is None:
            return None
        for w in weights[1:]:  # fused: only where every member sums alike (oneDNN's order can depend on N)
            if (
                w.shape[0] != weight.shape[0]
                and plan(weight.dtype, k, w.shape[0], bias is not None, planned) != found
            ):
                return None
        for w in weights:
            if not w.is_contiguous():
                return None
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        y = call(kernel(found[0]), found[0], rows, weights, biases, found[1])
    return y.view(*x.shape[:-1], y.shape[-1])
