"""Which native kernel serves a linear layer here, checked against torch once per shape.

float32: the `f32` kernel for up to 8 rows (decoding; within float32 rounding of torch's result, whose
MKL order no one can reproduce) on CPUs other than Intel's, where MKL's matrix-vector product does not
reach the memory's speed; more rows, and Intel CPUs, run MKL's. bfloat16 and float16: a kernel only where it gives torch's bits.
Torch's bf16 kernel is oneDNN's on CPUs with AVX-512 (its AVX512-BF16 order, or on CPUs with AMX its
AMX order) and ATen's dot products elsewhere (fp16: oneDNN's with AVX512-FP16, else ATen's), and its
order can depend on the CPU, the shape and the number of rows and threads (oneDNN sizes its blocks of
K to the caches), so `plan` tries each candidate on probes built so that any other summation order
shows (`_cancelling_weight`) and keeps the first that matches bit for bit; none matching, torch's
F.linear serves. On ARM64 torch's bf16/fp16 kernel is ATen's dot products where the CPU has no BF16 (for
bf16) or FP16 arithmetic (for fp16), else oneDNN's; the NEON build of the dot kernels is tried where it
is ATen's (`onednn_half`). A half-precision kernel that reproduces torch is then timed against it on the
layer's shape, and used only where it is faster (on tiny layers, calling it costs more than it saves).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from . import (
    _DTYPES,
    X86_LEVELS,
    cpu_flags,
    cpu_vendor,
    has_dpbf16,
    kernel,
    library,
    plan_cache,
    planned_args,
    planned_linear,
    run_linear,
    selected_isa,
)
from .prefetch import PREFETCH, prefetch_mode

# Block sizes for the oneDNN-order kernel, most likely first: oneDNN (avx512_core_bf16) sums K in
# blocks of 512 for one row and 1024 for several.
_BLOCKS = (512, 1024, 256, 2048, 128, 4096, 64)
DPBF16_MAX_ROWS = 8  # beyond this, oneDNN's own kernel (which it matches) is as fast
PROBE_MAX_OUTPUTS = 8192  # probes of wider layers use this many outputs (oneDNN's blocking looks at N)
_PLANS: dict[tuple, tuple[str, int] | None] = {}
# Rows probed for each class of row counts: one row (decoding), a few (batched decoding), many (prefill).
_PROBE_ROWS = {1: (1,), 8: (2, 3, 5, 8), 0: (9, 17, 40)}
_TIMED_ROWS = {1: 1, 8: 4, 0: 64}  # rows the speed of each class is compared on


def row_class(rows: int) -> int:
    """1 for one row, 8 for 2-8 rows, 0 for more: the classes of row counts a plan is made for."""
    return 1 if rows == 1 else 8 if rows <= DPBF16_MAX_ROWS else 0


def plan(
    dtype: torch.dtype, in_features: int, out_features: int, bias: bool, rows: int
) -> tuple[str, int] | None:
    """The kernel (kind, K block) for `rows` rows of a weight of this dtype and shape, or None where
    torch's F.linear must serve. Made once per dtype, shape, bias, class of row counts and thread count
    (the thread count can change torch's order)."""
    key = (dtype, in_features, out_features, bias, row_class(rows), torch.get_num_threads())
    try:
        return _PLANS[key]
    except KeyError:
        pass
    n = min(out_features, PROBE_MAX_OUTPUTS)
    if dtype == torch.float32:
        # Not where torch's MKL kernel reads at the memory's speed itself (Intel CPUs), nor for many
        # rows (MKL's sgemm beats dot products), nor on ARM64 (torch's OpenBLAS/oneDNN there: not
        # measured against ours): a fixed rule, so that float32 bits do not depend on a timing (the
        # kernel is within rounding of torch's, not equal to it).
        fast_mkl = cpu_vendor() == "GenuineIntel"
        measured = selected_isa() in X86_LEVELS
        found = ("f32", 0) if kernel("f32") is not None and key[4] and measured and not fast_mkl else None
    elif dtype in (torch.bfloat16, torch.float16):
        # what an earlier process decided on this machine (`plan_cache`), else decided here
        found = _remembered(key, lambda: _timed_plan(dtype, in_features, n, bias, key[4]))
        if found is not None and SPEED_CHECK:
            _prefetch_for(found)  # a kept plan's kernel prefetches as this machine's timing says
    else:
        found = None
    _PLANS[key] = found
    return found


def _timed_plan(dtype: torch.dtype, k: int, n: int, bias: bool, rows: int) -> tuple[str, int] | None:
    """The kernel that gives torch's bits (`_half_plan`), where it is also faster than torch's (`_pays`)."""
    found = _half_plan(dtype, k, n, bias, rows)
    if found is not None and SPEED_CHECK:
        _prefetch_for(found)  # how it prefetches weights here: decided before it is timed vs torch
        if not _pays(found, dtype, k, n, _TIMED_ROWS[rows]):
            found = None  # torch's kernel is as fast here (bits are the same either way): keep it
    return found


def _prefetch_for(found: tuple[str, int]) -> None:
    timed = "bf16_dot" if found[0] == "f16_dot" else found[0]  # one loop, one mode for both
    if timed in PREFETCH:
        prefetch_mode(timed)


def _remembered(key: tuple, make: Callable[[], tuple[str, int] | None]) -> tuple[str, int] | None:
    """`make()`'s plan for `key`, or the one an earlier process kept (`plan_cache`) where it is one this
    library can run for the dtype. The settings a plan depends on are part of the kept key."""
    lib = library()
    if lib is None:
        return make()
    settings = (SPEED_CHECK, PAYS, PAYS_ONE_ROW, COLD_BYTES, MAX_COPIES, PROBE_MAX_OUTPUTS, DPBF16_MAX_ROWS)

    def possible(value: object) -> bool:
        amx = (
            tuple(range(32, key[1] + 32, 32)) if isinstance(value, list) and value[:1] == ["bf16_amx"] else ()
        )
        return value is None or (
            isinstance(value, list)
            and len(value) == 2
            and value[0] in _DTYPES
            and _DTYPES[value[0]] == key[0]
            and kernel(value[0]) is not None
            and type(value[1]) is int
            and value[1] in (0, *_BLOCKS, *amx)
        )

    text = "linear " + " ".join(map(str, (*key, *settings)))
    value = plan_cache.remembered(
        (lib._name,), text, possible, lambda: None if (f := make()) is None else list(f)
    )
    return None if value is None else (value[0], value[1])


SPEED_CHECK = True  # half precision: use a kernel only where it beats torch's (see `_pays`)
PAYS = 0.95  # ... that is, where it takes at most this share of torch's time
# ... for one row (decoding), at most this share: the planned step also calls one kernel for q/k/v and one
# for gate/up (torch: a call and a copy each) and screens the LM head for greedy steps on it
# (`stablelm.greedy_head`), none of which a layer timed alone shows. On a 2-core Zen 4 with the AVX2
# build forced (two threads, 160M shape), the layers timed alone came out 0.81-0.94x torch's time
# (ATen's AVX2 kernel is fast there), so 0.95 kept torch's for one layer shape or another in each
# process by chance; whole greedy decodes ran at 110-168 tokens/s so (113 when the head was torch's)
# against 146-152 with the kernel for every layer. Where torch's kernel is clearly faster, it serves.
PAYS_ONE_ROW = 1.10
# Rounds of the timing (each kernel once per round, in turns; the first warms up), and how soon it may
# stop: after CLEAR_AFTER rounds, where the best times so far are further than a factor CLEAR from the
# limit either way. The timings were most of a first `generate`'s 2 s on the demo model (a 2-core Zen 3
# EPYC; the 7 plans' timings 1.5 s), and most layers' answers are clear after the first timed rounds.
ROUNDS = 6
CLEAR_AFTER = 3
CLEAR = 0.7
# Bytes of weights each timing round reads: copies of the probe weight up to this size, so that they come
# from memory, not from the caches (more than the last-level cache of common CPUs).
COLD_BYTES = 96 << 20
# ... but at most this many copies: a layer of a few KB would otherwise take ~12,000 copies, and the plan
# seconds of calls (a tiny model's first `generate` took 20 s, minutes on a busy CPU); a model of layers
# that small lies in the caches anyway, as such a timing then does.
MAX_COPIES = 256


def _pays(candidate: tuple[str, int], dtype: torch.dtype, k: int, n: int, rows: int) -> bool:
    """Whether the kernel is faster than torch's F.linear on weights of this shape here (the best of up
    to `ROUNDS` alternating rounds each, fewer where the answer is clear): where it is not, it is not
    used (CPUs whose torch kernel is already fast, such as MKL's float32 on Intel).

    For decoding's few rows each round reads copies of the weight worth `COLD_BYTES`, one after another,
    as decoding reads a model's layers: a model's weights do not stay in the caches from one token to the
    next. Timing one small weight over and over would time the caches instead, where the two kernels
    compare otherwise (on a 2-core AVX512-BF16 EPYC, torch's oneDNN kernel was as fast as ours on a cached
    768 x 8192 weight and half as fast on weights read from memory)."""
    kind, block = candidate
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    # many rows (prefill) are bound by the arithmetic, not by reading the weight: one copy is enough there
    copies = (
        min(-(-COLD_BYTES // (w.numel() * w.element_size())), MAX_COPIES) if rows <= DPBF16_MAX_ROWS else 1
    )
    weights = [w] + [w.clone() for _ in range(copies - 1)]
    calls = _planned_calls(kind, block, x, weights)
    ours, theirs = float("inf"), float("inf")
    limit = PAYS_ONE_ROW if rows == 1 else PAYS
    for round_ in range(ROUNDS):  # the first of each warms up
        start = time.perf_counter()
        if calls is None:
            for weight in weights:
                run_linear(kind, x, [weight], [None], block)
        else:
            fn, refs, ptr, _ = calls
            if any([fn(ref, ptr) for ref in refs]):
                return False  # the kernel could not run (no buffers): torch's serves
        middle = time.perf_counter()
        for weight in weights:
            nn.functional.linear(x, weight)
        end = time.perf_counter()
        ours, theirs = min(ours, middle - start), min(theirs, end - middle)
        if round_ + 1 >= CLEAR_AFTER and not CLEAR * limit * theirs < ours < limit * theirs / CLEAR:
            break  # the answer is clear already
    return ours <= limit * theirs


def _planned_calls(kind: str, block: int, x: torch.Tensor, weights: list[torch.Tensor]) -> tuple | None:
    """The kernel's calls over `weights` as the planned decode step makes them (`stablelm.lean_step`: the
    arguments in a struct made once, two pointers per call), or None without `stablelm_linear_planned`.
    Timed so, not through `run_linear`'s checks and 18 ctypes arguments: those cost 5-10 us a call, a
    quarter of a 768 x 768 layer's time, which the step does not pay (forced AVX2 build on a 2-core Zen 4,
    two threads: the kernel took 1.03-1.15x torch's time through `run_linear` and 0.81-0.94x through the
    planned call, so the timing kept torch's kernel for most layers, and whole greedy decodes of the 160M
    shape ran at 98-122 tokens/s against 136-187 with the kernels)."""
    fn = planned_linear()
    if fn is None:
        return None
    out = torch.empty(x.shape[0], weights[0].shape[0], dtype=x.dtype)
    structs = [planned_args(kernel(kind), out, [w], [None], block, torch.get_num_threads()) for w in weights]
    return fn, [ctypes.addressof(a) for a in structs], x.data_ptr(), (structs, out)  # the last: kept alive


def _half_plan(dtype: torch.dtype, k: int, n: int, bias: bool, rows: int) -> tuple[str, int] | None:
    candidates: list[tuple[str, int]] = []
    if dtype == torch.bfloat16 and rows and has_dpbf16():
        if {"amx_bf16", "amx_tile"} <= cpu_flags():
            # oneDNN on AMX: calls over equal runs of K, each a multiple of 32 (one call, or several
            # when they would not fit the caches)
            runs = dict.fromkeys(-(-k // (32 * c)) * 32 for c in range(1, 9))
            candidates += [("bf16_amx", block) for block in runs]
        # oneDNN on AVX512-BF16 alone: blocks of K (also AMX CPUs' oneDNN for K < 64)
        candidates += [("bf16_dpbf16", block) for block in _BLOCKS]
    if dtype == torch.bfloat16 and rows == 1 and selected_isa() == "avx512":
        # oneDNN's one-row order on AVX-512 CPUs without AVX512-BF16 (its vdpbf16ps emulated: Intel's
        # Skylake to Ice Lake and Tiger Lake); elsewhere its probes fail
        candidates.append(("bf16_avx512", 0))
    dot = "bf16_dot" if dtype == torch.bfloat16 else "f16_dot"
    if kernel(dot) is not None and not onednn_half(dtype):
        candidates.append((dot, 0))
    candidates = [c for c in candidates if kernel(c[0]) is not None]
    if not candidates:
        return None
    probes = _probes(dtype, k, n, bias, _PROBE_ROWS[rows])
    return next((c for c in candidates if _reproduces_torch(c, probes)), None)


def onednn_half(dtype: torch.dtype) -> bool:
    """Whether torch's products of `dtype` (bfloat16 or float16) run oneDNN code on this CPU whose order
    the dot kernels do not reproduce, as torch decides it from the CPU's flags:
    - x86-64, float16: AVX512-FP16 or AMX-FP16 (unless `ONEDNN_MAX_CPU_ISA` caps oneDNN below them);
    - ARM64: bfloat16 with the BF16 extension (`bf16` in /proc/cpuinfo's Features), float16 with FP16
      arithmetic (`fphp` / `asimdhp`); without them torch runs ATen's dot products, which the NEON
      kernels reproduce.
    There the dot kernel is not tried, by rule rather than by probes: such an order can differ from ATen's
    rarely enough to pass them. Measured: on an Intel Xeon with AMX and AVX512-FP16 the float16 kernel
    passed the probes of a (3 x 128) @ (128 x 32) layer, yet 10 of 18 of a model's such products on real
    activations came out one ulp away; under qemu's `max` ARM64 CPU (BF16) the bfloat16 kernel passed the
    probes of a (768 -> 64) layer and differed in 12 of 30,720 outputs (2026-12-05)."""
    flags = cpu_flags()
    if dtype == torch.float16:
        if {"avx512_fp16", "amx_fp16"} & flags:
            return os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() not in _BELOW_FP16
        return bool({"fphp", "asimdhp"} & flags)
    return dtype == torch.bfloat16 and "bf16" in flags  # x86-64 names its own avx512_bf16 / amx_bf16


# oneDNN's levels below AVX512-FP16, as ONEDNN_MAX_CPU_ISA names them (a cap there, as the tests set to
# emulate an AVX2 CPU, puts torch's float16 back on code the dot kernel reproduces, probes permitting)
_BELOW_FP16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
               "AVX512_CORE_BF16"}  # fmt: skip


_CHUNK_ROWS = 256  # probe weights are drawn this many rows at a time: no large float32 temporaries


def _cancelling_weight(rows: int, cols: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Rows whose halves cancel exactly (v, then -v shuffled): summed against ones, what is left is
    the rounding of the partial sums, which differs with almost any change of order or blocking."""
    half = cols // 2
    weight = torch.zeros(rows, cols, dtype=dtype)
    perm = torch.randperm(half, generator=generator)
    for r in range(0, rows, _CHUNK_ROWS):
        v = torch.randn(min(_CHUNK_ROWS, rows - r), half, generator=generator).to(dtype)
        weight[r : r + len(v), :half] = v
        weight[r : r + len(v), half : 2 * half] = -v[:, perm]
    return weight


def _wide(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Random values spread over 2^-8 .. 2^8 (fp16: 2^-4 .. 2^4): products and partial sums of every
    size, so that sums round at almost every step and any other order or blocking shows."""
    spread = 4 if dtype == torch.float16 else 8
    out = torch.empty(shape, dtype=dtype)
    rows = out.view(-1, shape[-1])
    for r in range(0, rows.shape[0], _CHUNK_ROWS):
        part = (min(_CHUNK_ROWS, rows.shape[0] - r), shape[-1])
        exponents = torch.randint(-spread, spread + 1, part, generator=generator).float()
        rows[r : r + part[0]] = (torch.randn(part, generator=generator) * torch.exp2(exponents)).to(dtype)
    return out


def _probes(dtype: torch.dtype, k: int, n: int, bias: bool, row_counts: tuple[int, ...]) -> list[tuple]:
    """(x, weight, bias, F.linear's result) to check candidates on, for these row counts and (n, k)
    weights: cancelling ones against inputs of ones scaled by a power of two per row (exact products:
    only the order shows), and values of widely spread magnitudes (with a bias where the layer has
    one), which round at almost every step (short rows of ordinary values often sum exactly, in any
    order)."""
    gen = torch.Generator().manual_seed(0)
    cancelling, wide = _cancelling_weight(n, k, gen, dtype), _wide((n, k), gen, dtype)
    probes = []
    for m in row_counts:
        ones = torch.exp2(torch.arange(m) % 5 - 2.0)[:, None].expand(m, k).to(dtype)
        b = _wide((n,), gen, dtype) if bias else None
        for x, w, bs in [(ones, cancelling, None), (_wide((m, k), gen, dtype), wide, b)]:
            probes.append((x, w, bs, nn.functional.linear(x, w, bs)))
    return probes


def _reproduces_torch(candidate: tuple[str, int], probes: list[tuple]) -> bool:
    """Whether the kernel gives F.linear's bits on every probe."""
    kind, block = candidate
    for x, w, b, expected in probes:
        try:
            got = run_linear(kind, x, [w], [b], block)
        except RuntimeError:  # e.g. AMX tiles refused by the OS: this kernel cannot serve here
            return False
        if not torch.equal(got, expected):
            return False
    return True
