"""Kernels whose best way of asking for weights ahead differs between CPUs: each such mode is timed once
per process (and instruction-set level) on weights read from memory, and the fastest is set in the
library. Prefetches never change results: only speed depends on these timings.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from . import kernel, library, plan_cache, quant_library, run_linear, selected_isa

COLD_BYTES = 96 << 20  # weights timed: more than the last-level cache of common CPUs (as linear.COLD_BYTES)
SHAPE = (1024, 2560)  # ... as layers of this shape: rows 5 KB apart (not 4 KB: one L1 set for all)


def _fastest(
    modes: tuple[int, ...], pays: float, set_mode: Callable[[int], None], run: Callable, weights: list
) -> int:
    """The mode to use: each of `modes` times `run` over `weights`, the modes taking turns, on one thread
    (where the modes differ most: one core's misses in flight); the fastest, where it takes at most
    `pays` of the first mode's time, else the first."""
    best = dict.fromkeys(modes, float("inf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(4):  # the first of each warms up
            for trial in modes:
                set_mode(trial)
                start = time.perf_counter()
                for w in weights:
                    run(w)
                best[trial] = min(best[trial], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    fastest = min(modes, key=best.__getitem__)
    return fastest if best[fastest] <= pays * best[modes[0]] else modes[0]


# Kernels whose best weight prefetches differ between CPUs (`prefetch_modes` in linear.c), by the kind
# timed: (which of the library's modes, the modes, best known first; the share of the first mode's time
# another must take at most to replace it). bf16_dpbf16: 0 non-temporal, the next block and each row's
# lines ahead (best on a Zen 5 EPYC, in whole steps: the step's other data stays cached, a gain the
# kernel alone does not show, 1-6% there: hence a clear margin), 1 the next block into L2 (twice as fast
# on a Zen 4 EPYC, where the non-temporal ones read at a third of the memory's speed). bf16_dot (and
# f16_dot, the same loop): rows' lines ahead into L1 (0, from a Zen 1) or into L2 (1: 1.25-1.28x on the
# 160M and 3B layer sets, 1.02-1.44x by single shape, on a Zen 4 with the AVX2 build, one thread), or
# twice as far ahead into L2 (2: 1.13-1.24x mode 1's speed on those layer sets, another Zen 4 session),
# which keep the same data cached: the fastest.
PREFETCH = {"bf16_dpbf16": (0, (0, 1), 0.8), "bf16_dot": (1, (0, 1, 2), 0.97)}
_PREFETCH: dict[tuple[str | None, str], int] = {}  # by level and kind (cleared with the plans)


def prefetch_mode(kind: str) -> int:
    """The prefetch mode of `kind` (a key of `PREFETCH`) here, timed once per process and level and set
    in the library: each mode over the same `COLD_BYTES` of weights, in turns (`_fastest`). The bits never
    depend on it."""
    key = (selected_isa(), kind)
    if key in _PREFETCH:
        return _PREFETCH[key]
    _, modes, pays = PREFETCH[kind]
    mode = modes[0]
    if kernel(kind) is not None:

        def timed() -> int:
            n, k = SHAPE
            weights = [
                torch.full((n, k), 0.5, dtype=torch.bfloat16) for _ in range(COLD_BYTES // (n * k * 2))
            ]
            x = torch.ones(1, k, dtype=torch.bfloat16)
            return _fastest(
                modes,
                pays,
                lambda trial: set_prefetch(kind, trial),
                lambda w: run_linear(kind, x, [w], [None], 512),
                weights,
            )

        text = f"prefetch {kind} {modes} {pays} {SHAPE} {COLD_BYTES}"
        mode = plan_cache.remembered((library()._name,), text, _one_of(modes), timed)
    set_prefetch(kind, mode)
    _PREFETCH[key] = mode
    return mode


def set_prefetch(kind: str, mode: int) -> None:
    """Set the prefetch mode of `kind` (a key of `PREFETCH`; see `prefetch_mode`) in the loaded library."""
    if kind not in PREFETCH:
        raise ValueError(f"no prefetch modes for {kind!r}; kinds with modes: {sorted(PREFETCH)}")
    which, modes, _ = PREFETCH[kind]
    if mode not in modes:
        raise ValueError(f"the prefetch mode of {kind} is one of {modes}, not {mode!r}")
    lib = library()
    if lib is not None:
        lib.stablelm_set_prefetch(which, mode)


# The quantized kernels (quant.c, int8 and int4 alike): 0 into L1 (T0, from an AMX Xeon), 1 into L2 (T1:
# int8 1.26x and int4 1.37x on a Zen 4 EPYC, one row, one thread); the same data cached either way.
QUANT_MODES, QUANT_PAYS = (0, 1), 0.97
_QUANT_PREFETCH: dict[str | None, int] = {}  # by level (cleared with the plans)


def quant_prefetch_mode() -> int:
    """The quantized kernels' prefetch mode here (see `prefetch_mode`), timed on one row of int8 weights
    of `SHAPE` and set in their library; 0 where there is no such library."""
    isa = selected_isa()
    if isa in _QUANT_PREFETCH:
        return _QUANT_PREFETCH[isa]
    lib, mode = quant_library(), QUANT_MODES[0]
    if lib is not None:
        text = f"quant prefetch {QUANT_MODES} {QUANT_PAYS} {SHAPE} {COLD_BYTES}"
        mode = plan_cache.remembered((lib._name,), text, _one_of(QUANT_MODES), lambda: _time_quant(lib))
        lib.stablelm_quant_set_prefetch(mode)
    _QUANT_PREFETCH[isa] = mode
    return mode


def _one_of(modes: tuple[int, ...]) -> Callable[[object], bool]:
    """Whether a kept value is one of `modes` (for `plan_cache.remembered`)."""
    return lambda value: type(value) is int and value in modes


def _time_quant(lib) -> int:  # noqa: ANN001 - the quantized kernels' ctypes library
    """The quantized kernels' fastest prefetch mode (`_fastest`) on one row of int8 weights of `SHAPE`."""
    n, k = SHAPE
    weights = [torch.ones(n, k, dtype=torch.int8) for _ in range(COLD_BYTES // (n * k))]
    scales, x, y = (
        torch.ones(n),
        torch.ones(1, k, dtype=torch.bfloat16),
        torch.empty(1, n, dtype=torch.bfloat16),
    )

    def run(w: torch.Tensor) -> None:  # XBF16 (1): one bf16 row, on torch's thread count (one here)
        args = (1, 1, k, k, y.data_ptr(), n, w.data_ptr(), scales.data_ptr(), None, torch.get_num_threads())
        if lib.stablelm_q8_linear(x.data_ptr(), *args):
            raise RuntimeError("the int8 kernel failed while timing its prefetches")

    return _fastest(QUANT_MODES, QUANT_PAYS, lib.stablelm_quant_set_prefetch, run, weights)
