"""Native kernels, built on first use with the system's C compiler for this CPU's instruction set.

`linear.c` holds linear layers over the weights as they lie (dense, row-major: nothing packed or
copied), in one source compiled for the best instruction set the CPU has (see `selected_isa`):
- `avx512` (x86-64 with AVX-512 F/BW/VL/DQ and FMA): 16-float vectors; with AVX512-BF16 also the
  bfloat16 kernel in oneDNN's order on such CPUs, and with AMX the one in oneDNN's order there;
- `avx2` (x86-64 with AVX2 and FMA: most laptops and desktops, AMD EPYC before Zen 4): 8-float vectors;
- `neon` (ARM64 Linux: Graviton, Ampere, Raspberry Pi, Apple silicon under Linux): 4-float vectors.
All have a float32 kernel and bfloat16/float16 kernels in ATen's order (torch's own kernel where
oneDNN does not take the dtype), and the rotary embedding. Which kernel serves a weight, and whether its
half-precision results equal torch's bit for bit on this machine, is decided in
`stablelm.kernels.linear`.

The shared library is compiled once into `$STABLELM_CACHE/kernels` (default
`~/.cache/stablelm/kernels`), named by a hash of the source and flags, written atomically (the newest
`KEEP_BUILDS` per source and level kept). Where it cannot be had (another CPU or OS, no compiler,
`STABLELM_ISA=none`), `library()` returns None and callers keep torch's kernels. `STABLELM_ISA=avx2`
forces the lower level on an AVX-512 machine. The CPU's flags and vendor come from `cpu`.
`attention.c` and `quant.c` are x86-64 only (`X86_LEVELS`): on ARM64 torch's attention and no
quantized kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from .cpu import cpu_flags, cpu_vendor, parse_cpu_flags  # noqa: F401 - the package's names

SOURCE = Path(__file__).with_name("linear.c")
# -ffp-contract=off: a product and a sum written apart stay apart (FMAs are written out where wanted).
COMMON_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
# Flags per level, best first: a compiler too old for AMX (GCC < 11) or AVX512-BF16 (GCC < 10) builds the
# level without those kernels. They are compiled in and run only on CPUs that report them.
ISA_FLAGS = {
    "avx512": [
        [*_AVX512, "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mamx-int8"],
        [*_AVX512, "-mavx512bf16"],
        _AVX512,
    ],
    "avx2": [["-mavx2", "-mfma", "-mf16c"]],
    "neon": [[]],  # ARM64's baseline (armv8-a) has NEON and the fp16 conversions the kernels use
}
# The CPU flags (as /proc/cpuinfo names them) each level needs, best level first.
ISA_NEEDS = {
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"},
    "avx2": {"avx2", "fma", "f16c"},
    "neon": {"asimd"},  # as ARM64 Linux names NEON in /proc/cpuinfo's Features
}
X86_LEVELS = ("avx512", "avx2")  # the levels attention.c and quant.c are written for
ISA_ENV = "STABLELM_ISA"
KINDS = ("f32", "bf16_dot", "f16_dot", "bf16_dpbf16", "bf16_amx", "bf16_avx512")


def cache_dir() -> Path:
    """Where built kernels are kept: `$STABLELM_CACHE/kernels`, else `~/.cache/stablelm/kernels`."""
    root = (
        os.environ.get("STABLELM_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stablelm"
    )
    return Path(root) / "kernels"


def best_isa() -> str | None:
    """The best instruction-set level the kernels have for this CPU, or None (not Linux, or an x86-64
    CPU without AVX2 and FMA)."""
    return next((isa for isa, needs in ISA_NEEDS.items() if needs <= cpu_flags()), None)


def selected_isa() -> str | None:
    """The level the kernels are built for: `$STABLELM_ISA` when set (`avx512`, `avx2`, `none`;
    `auto` or unset: `best_isa()`).

    Raises:
        ValueError: `STABLELM_ISA` names an unknown level, or one this CPU lacks.
    """
    return _selected(os.environ.get(ISA_ENV, ""))


@cache
def _selected(wanted: str) -> str | None:
    wanted = wanted.strip().lower() or "auto"
    if wanted == "auto":
        return best_isa()
    if wanted == "none":
        return None
    if wanted not in ISA_NEEDS:
        raise ValueError(
            f"{ISA_ENV}={wanted!r} is not a level stablelm has kernels for: set it to one of "
            f"{', '.join(ISA_NEEDS)}, none or auto (or unset it)."
        )
    missing = ISA_NEEDS[wanted] - cpu_flags()
    if missing:
        raise ValueError(
            f"{ISA_ENV}={wanted} needs CPU features this machine lacks ({', '.join(sorted(missing))}): set "
            f"it to {best_isa() or 'none'} or unset it."
        )
    return wanted


def has_dpbf16() -> bool:
    """Whether the oneDNN-order bfloat16 kernels (AVX512-BF16, and AMX where the CPU has it) can run here."""
    return selected_isa() == "avx512" and "avx512_bf16" in cpu_flags() and library() is not None


def source_text(source: Path) -> bytes:
    """`source` and the local headers it includes (`#include "name.h"`, beside it: quant.c's parts), as a
    build's digest reads them, so that a changed header is a new build."""
    text = source.read_bytes()
    for name in re.findall(rb'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"', text, re.MULTILINE):
        header = source.parent / name.decode()
        if header.is_file():  # else the compiler says it is missing
            text += b"\n" + header.read_bytes()
    return text


def build(source: Path, *, isa: str = "avx2", compiler: str | None = None) -> Path:
    """Compile `source` for `isa` into the cache (once per source, level and flags); the library's path.
    The level's flags are tried best first (see `ISA_FLAGS`).

    Raises RuntimeError (with the compiler's message) when it cannot be built.
    """
    compiler = compiler or os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler found ({compiler!r}); set CC to one")
    text = source_text(source)
    stem = f"{source.stem}-{isa}"
    targets = []
    for variant in ISA_FLAGS[isa]:
        flags = [*COMMON_FLAGS, *variant]
        digest = hashlib.sha256(text + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
        targets.append((cache_dir() / f"{stem}-{digest}.so", flags))
    for target, _ in targets:
        if target.exists():
            return target
    error = ""
    for target, flags in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run(
                [compiler, *flags, str(source), "-o", str(built), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if result.returncode != 0:
                error = error or result.stderr.strip()[-500:]
                continue
            os.replace(built, target)  # atomic: a concurrent build or a reader never sees half a library
        _prune(target, stem)
        return target
    raise RuntimeError(f"{compiler} failed: {error}")


KEEP_BUILDS = 4  # builds kept per source and level: other versions of the package, other compilers


def _prune(target: Path, stem: str) -> None:
    """Remove all but the `KEEP_BUILDS` newest builds of `stem` (`target` always kept): builds of older
    sources go, while two checkouts or compilers sharing the cache do not delete each other's each time."""
    builds = []
    for path in target.parent.glob(f"{stem}-*.so"):
        try:
            builds.append((path.stat().st_mtime, path))
        except OSError:  # removed meanwhile by another process
            continue
    builds.sort(reverse=True)
    for _, path in [b for b in builds if b[1] != target][KEEP_BUILDS - 1 :]:
        path.unlink(missing_ok=True)


def load(source: Path, isa: str | None, levels: tuple[str, ...] = tuple(ISA_NEEDS)) -> ctypes.CDLL | None:
    """`source` built for `isa` (see `build`) and loaded, or None where it cannot be had (no level, a
    level the source is not written for (not in `levels`), no compiler, a failed build or load): then
    callers keep torch's kernels."""
    if isa is None or isa not in levels:
        return None
    try:
        return ctypes.CDLL(str(build(source, isa=isa)))
    except (RuntimeError, OSError, subprocess.SubprocessError):
        return None


@cache
def _library(isa: str | None) -> ctypes.CDLL | None:
    lib = load(SOURCE, isa)
    if lib is None:
        return None
    lib.stablelm_read.restype = ctypes.c_uint64
    lib.stablelm_read.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    for name in ("bf16", "f16", "f32"):
        fn = getattr(lib, f"stablelm_rotary_{name}")
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, *[ctypes.c_void_p] * 3, *[ctypes.c_int64] * 3]
        fn.argtypes += [ctypes.c_int] * 5
        fn = getattr(lib, f"stablelm_decode_qkv_{name}")
        fn.restype = ctypes.c_int
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int64,
            *[ctypes.c_void_p] * 5,
            ctypes.c_int64,
            ctypes.c_int64,
        ]
        fn.argtypes += [ctypes.c_int] * 5
    lib.stablelm_set_prefetch.restype = None
    lib.stablelm_set_prefetch.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.stablelm_prefetch.restype = ctypes.c_int
    lib.stablelm_prefetch.argtypes = [ctypes.c_int]
    lib.stablelm_linear_planned.restype = ctypes.c_int
    lib.stablelm_linear_planned.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return lib


class PlannedLinear(ctypes.Structure):
    """The arguments of a linear kernel call but its input (`stablelm_linear_planned` in `linear.c`)."""

    _fields_ = [
        ("fn", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        *[(name, ctypes.c_void_p) for name in ("w0", "b0", "w1", "b1", "w2", "b2")],
        *[
            (name, ctypes.c_int64)
            for name in ("M", "K", "ldx", "ldy", "G", "n0", "n1", "n2", "kb", "threads")
        ],
    ]


def planned_args(
    fn, out: torch.Tensor, weights: list, biases: list, block: int, threads: int
) -> PlannedLinear:  # noqa: ANN001
    """The struct for `stablelm_linear_planned`: kernel `fn` over one to three (N_i, K) `weights` (with
    `biases` or None each) into `out` (M, sum N_i), K block `block`, `threads` threads. It holds raw
    pointers: the caller keeps the tensors alive while it is used."""
    ns = [w.shape[0] for w in weights]
    k = weights[0].shape[1]
    ptrs = [t.data_ptr() if t is not None else None for t in (*weights, *biases)]
    ws, bs = ptrs[: len(weights)] + [None] * 3, ptrs[len(weights) :] + [None] * 3
    ns += [0, 0]
    return PlannedLinear(
        ctypes.cast(fn, ctypes.c_void_p).value, out.data_ptr(), ws[0], bs[0], ws[1], bs[1], ws[2], bs[2],
        out.shape[0], k, k, out.shape[1], len(weights), ns[0], ns[1], ns[2], block, threads,
    )  # fmt: skip


def planned_linear():  # noqa: ANN201 - a ctypes function, or None
    """`stablelm_linear_planned(PlannedLinear*, x)` of the library for `selected_isa()`, or None."""
    lib = library()
    return None if lib is None else lib.stablelm_linear_planned


@cache
def _kernels(isa: str | None) -> dict:
    """The linear kernels of the library for `isa`, by kind."""
    lib = _library(isa)
    found = {}
    for kind in KINDS if lib is not None else ():
        fn = getattr(lib, f"stablelm_linear_{kind}", None)
        if fn is not None:
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
            fn.argtypes += [ctypes.c_int, ctypes.c_int]
            fn.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int] * 3 + [ctypes.c_int] * 2
            found[kind] = fn
    return found


def library() -> ctypes.CDLL | None:
    """The kernels' library for `selected_isa()`, or None where it cannot be used (see the module
    docstring)."""
    return _library(selected_isa())


def kernel(kind: str):  # noqa: ANN201 - a ctypes function, or None
    """The C function for `kind` (one of `KINDS`) here, or None."""
    return _kernels(selected_isa()).get(kind)


def clear_caches() -> None:
    """Forget the chosen level, the loaded libraries and the kernel plans (after changing
    `STABLELM_ISA`, `CC` or `STABLELM_CACHE` in a running process)."""
    from . import attention, plan_cache
    from .linear import _PLANS
    from .prefetch import _PREFETCH, _QUANT_PREFETCH

    for cached in (_selected, _library, _kernels, _quant_library, attention._library):
        cached.cache_clear()
    _PLANS.clear()
    _PREFETCH.clear()
    _QUANT_PREFETCH.clear()
    attention._PLANS.clear()
    plan_cache.forget()


def read_memory(buffer: torch.Tensor) -> int:
    """Read all of `buffer` (contiguous CPU, 64-byte aligned) with vector loads on torch's threads; an
    XOR of what was read. For measuring read bandwidth: torch's own reductions stop at ~35 GB/s on a
    2-core Zen 4 where plain loads reach more."""
    lib = library()
    assert lib is not None and buffer.is_contiguous() and buffer.data_ptr() % 64 == 0
    nbytes = buffer.numel() * buffer.element_size() // 256 * 256
    return lib.stablelm_read(buffer.data_ptr(), nbytes, torch.get_num_threads())


_DTYPES = {
    "f32": torch.float32,
    "bf16_dot": torch.bfloat16,
    "f16_dot": torch.float16,
    "bf16_dpbf16": torch.bfloat16,
    "bf16_avx512": torch.bfloat16,
    "bf16_amx": torch.bfloat16,
}


def run_linear(
    kind: str,
    x: torch.Tensor,
    weights: list[torch.Tensor] | tuple[torch.Tensor, ...],
    biases: list[torch.Tensor | None] | tuple[torch.Tensor | None, ...],
    block: int = 0,
) -> torch.Tensor:
    """y = x @ cat(weights)^T (+ cat(biases)) with the `kind` kernel, for `x` (M, K) and one to three
    (N_i, K) weights of the kernel's dtype on the CPU; `block` is the K block (bf16_dpbf16) or call
    length (bf16_amx) of the oneDNN-order kernels.

    Raises:
        ValueError: The kernel is not here, or the tensors do not fit it (checked here: the C code
            trusts its arguments).
        MemoryError: The kernel could not allocate its work buffers.
    """
    fn = kernel(kind)
    dtype = _DTYPES.get(kind)
    if fn is None:
        raise ValueError(f"no stablelm kernel {kind!r} on this machine (instruction set {selected_isa()})")
    k = x.shape[1] if x.dim() == 2 else -1
    if not 1 <= len(weights) <= 3 or len(biases) != len(weights):
        raise ValueError(
            f"the kernels take one to three weights, each with a bias or None; got {len(weights)}"
        )
    fits = x.dim() == 2 and x.dtype == dtype and x.is_cpu and x.stride(-1) == 1 and k > 0
    for w, b in zip(weights, biases, strict=True):
        fits = fits and w.dim() == 2 and w.shape[1] == k and w.dtype == dtype and w.is_cpu
        fits = fits and w.is_contiguous() and w.shape[0] > 0
        fits = fits and (b is None or (b.shape == w.shape[:1] and b.dtype == dtype and b.is_contiguous()))
    if not fits:
        raise ValueError(
            f"the {kind} kernel takes {dtype} inputs (M, K) with unit stride and contiguous (N, K) weights "
            f"and (N,) biases of that dtype on the CPU; got inputs {tuple(x.shape)} {x.dtype} and weights "
            f"{[(tuple(w.shape), w.dtype) for w in weights]}"
        )
    return call(fn, kind, x, weights, biases, block)


def call(fn, kind: str, x: torch.Tensor, weights, biases, block: int) -> torch.Tensor:  # noqa: ANN001
    """`run_linear` without its checks, for callers that guarantee them (`stablelm.layers`)."""
    m, k = x.shape
    n0 = weights[0].shape[0]
    b0 = biases[0]
    if len(weights) == 1:
        n = n0
        rest = (None, None, 0, None, None, 0)
    else:
        n1, b1 = weights[1].shape[0], biases[1]
        w2 = weights[2] if len(weights) > 2 else None
        n2 = 0 if w2 is None else w2.shape[0]
        b2 = None if w2 is None or biases[2] is None else biases[2].data_ptr()
        n = n0 + n1 + n2
        rest = (weights[1].data_ptr(), None if b1 is None else b1.data_ptr(), n1)
        rest += (None if w2 is None else w2.data_ptr(), b2, n2)
    y = torch.empty(m, n, dtype=x.dtype)
    if m == 0:
        return y
    status = fn(
        x.data_ptr(), m, k, x.stride(0) if m > 1 else k, y.data_ptr(), n, len(weights),
        weights[0].data_ptr(), None if b0 is None else b0.data_ptr(), n0, *rest, block, torch.get_num_threads(),
    )  # fmt: skip
    if status:
        check_status(status, kind, m, k, block)
    return y


def check_status(status: int, kind: str, m: int, k: int, block: int) -> None:
    """Raise the error a linear kernel's nonzero `status` stands for (`m` rows of `k`)."""
    if status == 3:
        raise RuntimeError(f"stablelm's {kind} kernel cannot run here: the OS refused the AMX tiles' state")
    if status == 1:
        raise MemoryError(f"stablelm's {kind} kernel could not allocate its work buffers ({m} rows of {k})")
    raise ValueError(f"bad arguments to stablelm's {kind} kernel: {m}x{k}, block {block}")


# ---- weight-only quantized kernels (quant.c: int8 and int4, see stablelm.quantization) ----------------
QUANT_SOURCE = Path(__file__).with_name("quant.c")


@cache
def _quant_library(isa: str | None) -> ctypes.CDLL | None:
    lib = load(QUANT_SOURCE, isa, X86_LEVELS)
    if lib is None:
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.stablelm_q8_linear.argtypes = [p, i, i, i, i, p, i, p, p, p, i]
    lib.stablelm_q4_linear.argtypes = [p, i, i, i, i, p, i, p, p, p, i, p, i, i]
    lib.stablelm_q8_dequant.argtypes = [p, p, i, i, i, p, i, i]
    lib.stablelm_q4_dequant.argtypes = [p, p, p, i, i, i, i, p, i, i]
    lib.stablelm_quant_prefill.argtypes = [p, i, i, i, p, i, p, p, p, p, i, p, i]
    lib.stablelm_q8_screen_prepare.argtypes = [p, i, i, p, p, p, p, i]
    f = ctypes.c_float
    lib.stablelm_q8_screen.argtypes = [p, i, p, p, p, i, f, f, f, p, i, p, p, p, i, p, i]
    lib.stablelm_q8_screen_best.argtypes = [p, i, p, p]
    lib.stablelm_q8_screen_digest.argtypes = [p, ctypes.c_int64, i]
    lib.stablelm_q8_screen_digest.restype = ctypes.c_uint64
    for fn in (
        lib.stablelm_q8_linear,
        lib.stablelm_q4_linear,
        lib.stablelm_q8_dequant,
        lib.stablelm_q4_dequant,
        lib.stablelm_quant_prefill,
        lib.stablelm_quant_prefetch,
        lib.stablelm_q8_screen_prepare,
        lib.stablelm_q8_screen,
        lib.stablelm_q8_screen_best,
    ):
        fn.restype = ctypes.c_int
    lib.stablelm_quant_set_prefetch.restype = None
    lib.stablelm_quant_set_prefetch.argtypes = [i]
    return lib


def quant_library() -> ctypes.CDLL | None:
    """The quantized kernels' library (`quant.c`) for `selected_isa()`, or None where it cannot be used
    (as `library()`); `clear_caches()` forgets it too."""
    return _quant_library(selected_isa())
