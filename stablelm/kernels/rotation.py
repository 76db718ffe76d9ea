"""Rotary embeddings in one native call (`stablelm_rotary_*` and `stablelm_decode_qkv_*` in linear.c):
the same bits as `stablelm.rope.apply_rotary`."""

from __future__ import annotations

import torch

from . import library

_ROTARY = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_dim: int) -> torch.Tensor | None:
    """`stablelm.rope.apply_rotary` in one native call (the same bits: each operation rounded as torch
    rounds it), or None where it cannot serve (no library, other dtypes or devices, autograd on)."""
    lib = library()
    name = _ROTARY.get(x.dtype)
    if lib is None or name is None or torch.is_grad_enabled() or not (x.is_cpu and cos.is_cpu):
        return None
    if x.dim() != 4 or x.stride(-1) != 1 or cos.dtype != x.dtype or sin.dtype != x.dtype:
        return None
    cos, sin = cos.contiguous(), sin.contiguous()
    b, t, rot = cos.shape
    if heads_dim == 2:  # (B, T, H, D)
        _, _, h, d = x.shape
        sb, st, sh = x.stride(0), x.stride(1), x.stride(2)
    else:  # (B, H, T, D)
        _, h, _, d = x.shape
        sb, sh, st = x.stride(0), x.stride(1), x.stride(2)
    if x.shape[0] != b or x.shape[3 - heads_dim] != t or sin.shape != cos.shape:
        return None
    y = torch.empty(x.shape, dtype=x.dtype)
    ysb, y1, y2 = y.stride(0), y.stride(1), y.stride(2)
    yst, ysh = (y1, y2) if heads_dim == 2 else (y2, y1)
    fn = getattr(lib, f"stablelm_rotary_{name}")
    if fn(
        x.data_ptr(), sb, st, sh, cos.data_ptr(), sin.data_ptr(), y.data_ptr(), ysb, yst, ysh, b, t, h, d, rot
    ):
        return None
    return y


def decode_qkv_kernel(dtype: torch.dtype):  # noqa: ANN201 - a ctypes function, or None
    """The C function that rotates one decoded token's q and k and writes k and v into a static cache's
    slot (`stablelm_decode_qkv_*` in `linear.c`; see `stablelm.lean_step`), for `dtype`; or None."""
    lib = library()
    name = _ROTARY.get(dtype)
    return None if lib is None or name is None else getattr(lib, f"stablelm_decode_qkv_{name}")
