"""Decoding's attention (one new query per row over a static cache) in torch's bits, where the native
kernel (`attention.c`) reproduces them on this machine.

torch's `scaled_dot_product_attention` for one bfloat16 query hands two tiny matrix products per head to
MKL, ~8-25 us each however small: on a 2-core EPYC ~400 us a layer for a 176-key context on a 12-head
model with AVX2, ~200 us with AVX-512, and ~1.4 ms on a 32-head one, more than the rest of the layer's
small operations together. `attention.c` computes the same numbers in MKL's and ATen's orders: MKL's
products are summed alike on the AVX2 and AVX-512 EPYCs measured (MKL runs its AVX2 code on AMD CPUs),
and ATen's softmax sums its exponentials in vectors of 8 floats (AVX2) or 16 (AVX-512), which the kernel
is told (`softmax_lanes`). Whether it gives torch's bits on this machine (its torch, MKL and CPU) is
checked once per head layout, scale and thread count against `F.scaled_dot_product_attention` itself, on
probes of several lengths (within and across torch's blocks of 512 keys), with and without a mask, whose
scores spread wide enough that any other order shows; a layout the kernel does not reproduce keeps
torch's kernel. MKL sums the values otherwise on Intel's CPUs than on AMD's, and otherwise again in its
AVX-512 code; the kernel is told which (`mkl_order`). Where MKL runs its AVX512-BF16 or AMX code on
Intel's CPUs, the kernel does not reproduce it: no native attention there.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from . import X86_LEVELS, cpu_flags, cpu_vendor, load, plan_cache, selected_isa

SOURCE = Path(__file__).with_name("attention.c")
# Key counts the probes cover: vector and leftover paths, groups of four, and torch's blocks of 512.
PROBE_LENGTHS = (1, 3, 9, 16, 24, 37, 100, 177, 512, 513, 530, 1100)
_PLANS: dict[tuple, object] = {}


@cache
def _library(isa: str | None) -> ctypes.CDLL | None:
    lib = load(SOURCE, isa, X86_LEVELS)
    if lib is None:
        return None
    p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn = lib.stablelm_decode_attention_bf16
    fn.argtypes = [p, i64, i64, p, p, i64, i64, p, i64, p, i64, i, i, i, i, ctypes.c_float, i, i, i]
    fn.restype = ctypes.c_int
    return lib


def kernel():  # noqa: ANN201 - a ctypes function, or None
    """`stablelm_decode_attention_bf16` of the library for `selected_isa()`, or None (no native kernels)."""
    lib = _library(selected_isa())
    return None if lib is None else lib.stablelm_decode_attention_bf16


@cache
def mkl_order() -> int | None:
    """How MKL sums the attention's products here, as the kernel's `order`: 0 for its AVX2 code as it runs
    on AMD's CPUs (measured on EPYCs with AVX2 only and with AVX-512); on Intel's, 1 for its AVX2 code
    (CPUs without AVX-512, or MKL_ENABLE_INSTRUCTIONS=AVX2) and 2 for its AVX-512 code without
    AVX512-BF16 (Skylake to Tiger Lake and Ice Lake, or MKL_ENABLE_INSTRUCTIONS=AVX512, _E1 or _E2),
    found by calling MKL's cblas_gemm_bf16bf16f32 on a Xeon with its instructions capped so; None where
    it runs other code (Intel's AVX512-BF16 and AMX code: on a Xeon with AMX 1-5% of random one-query
    cases came out one ulp away from these orders, and a layout whose probes all matched by chance was
    wrong at other lengths), so no native attention there."""
    vendor, flags = cpu_vendor(), cpu_flags()
    if vendor == "AuthenticAMD":
        return 0
    if vendor != "GenuineIntel" or not {"avx2", "fma"} <= flags:
        return None
    capped = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").strip().upper()
    if capped == "AVX2" or "avx512f" not in flags:
        return 1
    if capped in ("AVX512", "AVX512_E1", "AVX512_E2") or not {"avx512_bf16", "amx_bf16"} & flags:
        return 2
    return None


@cache
def softmax_lanes() -> int | None:
    """The width of ATen's float vectors in torch's kernels on this CPU (its softmax sums that many lanes
    apart): 8 where they are AVX2 code, 16 where AVX-512; None elsewhere (no native kernel then)."""
    return {"AVX2": 8, "AVX512": 16}.get(torch.backends.cpu.get_cpu_capability())


def plan(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, scale: float):  # noqa: ANN201
    """The native kernel where it gives torch's bits for this layout on this machine, else None (see the
    module docstring). Made once per dtype, layout, scale and thread count."""
    key = (dtype, heads, kv_heads, head_dim, float(scale), torch.get_num_threads())
    if key not in _PLANS:
        fn = (
            kernel()
            if softmax_lanes() is not None and dtype == torch.bfloat16 and mkl_order() is not None
            else None
        )
        usable = (
            fn is not None
            and dtype == torch.bfloat16
            and head_dim % 8 == 0
            and 8 <= head_dim <= 512
            and heads % kv_heads == 0
        )
        _PLANS[key] = fn if usable and _reproduces(fn, key) else None
    return _PLANS[key]


def run(
    fn, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, mask: torch.Tensor | None,
    out: torch.Tensor, scale: float, slots: int | None = None,
) -> int:  # fmt: skip  # noqa: ANN001
    """Attention of `q` (B, H, 1, D; any strides with D contiguous) over the first `length` slots of the
    cache tensors `keys`/`values` (B, Hkv, slots, D, contiguous; or leading slices of such with `slots`
    given), `mask` (B, length) bool, rows contiguous (or one row, stride 0), or None; written into `out` (B, H * D, rows contiguous). The kernel's status: 0, or 4
    when a score is not finite (then nothing is promised about `out`: run torch's kernel)."""
    B, H, _, D = q.shape
    Hkv, slots = keys.shape[1], keys.shape[2] if slots is None else slots
    return fn(
        q.data_ptr(), q.stride(0), q.stride(1), keys.data_ptr(), values.data_ptr(), slots, length,
        None if mask is None else mask.data_ptr(), 0 if mask is None else mask.stride(0),
        out.data_ptr(), out.stride(0), B, H, Hkv, D, scale, softmax_lanes() or 8, mkl_order() or 0,
        torch.get_num_threads(),
    )  # fmt: skip


def _reproduces(fn, key: tuple) -> bool:  # noqa: ANN001
    """`_reproduces_torch` for the plan's `key`, as an earlier process found it on this machine where one
    did (`plan_cache`), else found and kept."""
    return plan_cache.remembered(
        (_library(selected_isa())._name,),
        "attention " + " ".join(map(str, key)),
        lambda value: type(value) is bool,
        lambda: _reproduces_torch(fn, *key[1:5]),
    )


def _reproduces_torch(fn, heads: int, kv_heads: int, head_dim: int, scale: float) -> bool:  # noqa: ANN001
    gen = torch.Generator().manual_seed(0)
    B, slots = 2, max(PROBE_LENGTHS) + 3
    for spread in (3.0, 1.0):
        q = (torch.randn(B, heads, 1, head_dim, generator=gen) * spread).to(torch.bfloat16)
        keys = (torch.randn(B, kv_heads, slots, head_dim, generator=gen) * spread).to(torch.bfloat16)
        values = torch.randn(B, kv_heads, slots, head_dim, generator=gen).to(torch.bfloat16)
        for length in PROBE_LENGTHS:
            mask = torch.rand(B, length, generator=gen) > 0.3
            mask[:, -1] = True  # every row sees its own new key, as in decoding
            for m in (None, mask):
                try:
                    expected = _sdpa(q, keys[:, :, :length], values[:, :, :length], m, scale)
                except (TypeError, RuntimeError):  # e.g. a torch without enable_gqa
                    return False
                got = torch.empty(B, heads * head_dim, dtype=torch.bfloat16)
                status = run(fn, q, keys, values, length, m, got, scale)
                if status != 0 or not torch.equal(got, expected):
                    return False
    return True


def _sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """torch's result as the decode step asks for it, laid out as the kernel writes it (B, H * D)."""
    B, H, _, D = q.shape
    gqa = {"enable_gqa": True} if keys.shape[1] != H else {}
    allowed = None if mask is None else mask[:, None, None]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scale, **gqa)
    return out.transpose(1, 2).reshape(B, H * D)
