"""Native kernels, built on first use with the system's C compiler and loaded with ctypes.

`linear.c` holds linear layers for x86-64 CPUs with AVX-512, which read the weights at batch 1 about as
fast as plain loads read memory (1.4-1.7x oneDNN's packed kernels on a 2-core Zen 4):
- bfloat16 (CPUs with AVX512-BF16): sums in oneDNN's order, so its outputs equal torch's bit for bit
  (checked per weight shape before use, see `stablelm.kernels.linear.KernelLinear`);
- float32 (AVX512F): sums each block of K in order with FMAs; within float32 rounding of torch's result
  (torch's own kernels differ among themselves the same way), and the same for any thread count.

The shared library is compiled once into `$STABLELM_CACHE` (default `~/.cache/stablelm/kernels`),
named by a hash of the source and flags, written atomically. Where it cannot be had (another CPU or
OS, no compiler, `STABLELM_KERNELS=0`), `library()` returns None and callers keep torch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("linear.c")
FLAGS = [
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-mfma",
    "-fopenmp",
    "-shared",
    "-fPIC",
]


def cache_dir() -> Path:
    """Where built kernels are kept: `$STABLELM_CACHE/kernels`, else `~/.cache/stablelm/kernels`."""
    root = (
        os.environ.get("STABLELM_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stablelm"
    )
    return Path(root) / "kernels"


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags on x86-64 Linux (from /proc/cpuinfo); empty elsewhere."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_avx512() -> bool:
    """Whether this is Linux on an x86-64 CPU with the AVX-512 the float32 kernel needs (F, BW, VL)."""
    return {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags()


def cpu_has_avx512_bf16() -> bool:
    """Whether the CPU also reports AVX512-BF16, which the bfloat16 kernel needs."""
    return cpu_has_avx512() and "avx512_bf16" in cpu_flags()


def build(source: Path, *, compiler: str | None = None) -> Path:
    """Compile `source` into the cache (once per source and flags); the library's path.

    Raises RuntimeError (with the compiler's message) when it cannot be built.
    """
    compiler = compiler or os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler found ({compiler!r}); set CC to one")
    text = source.read_bytes()
    digest = hashlib.sha256(text + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)  # atomic: a concurrent build or a reader never sees half a library
    for stale in target.parent.glob(f"{source.stem}-*.so"):  # builds of older sources
        if stale != target:
            stale.unlink(missing_ok=True)
    return target


@cache
def library() -> ctypes.CDLL | None:
    """The kernels' library, or None where it cannot be used (see the module docstring)."""
    if os.environ.get("STABLELM_KERNELS", "1") == "0" or not cpu_has_avx512():
        return None
    try:
        lib = ctypes.CDLL(str(build(SOURCE)))
    except (RuntimeError, OSError, subprocess.SubprocessError):
        return None
    for fn in (lib.stablelm_linear_bf16, lib.stablelm_linear_f32):
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5
    lib.stablelm_read.restype = ctypes.c_uint64
    lib.stablelm_read.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return lib


def supports(dtype: torch.dtype) -> bool:
    """Whether a linear kernel for `dtype` runs here: float32 with AVX-512, bfloat16 with AVX512-BF16."""
    if dtype == torch.bfloat16:
        return cpu_has_avx512_bf16() and library() is not None
    return dtype == torch.float32 and library() is not None


def read_memory(buffer: torch.Tensor) -> int:
    """Read all of `buffer` (contiguous CPU, 64-byte aligned) with AVX-512 loads on torch's threads; an
    XOR of what was read. For measuring read bandwidth: torch's own reductions stop at ~35 GB/s on a
    2-core Zen 4 where plain loads reach more."""
    lib = library()
    assert lib is not None and buffer.is_contiguous() and buffer.data_ptr() % 64 == 0
    nbytes = buffer.numel() * buffer.element_size() // 256 * 256
    return lib.stablelm_read(buffer.data_ptr(), nbytes, torch.get_num_threads())


def run_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int, kb: int
) -> torch.Tensor:
    """y = x @ W^T (+ bias) with the kernel for `packed`'s dtype; `x` (M, K) of the same dtype,
    `packed` from `pack`; K summed in blocks of `kb`."""
    # Checked here, not left to the C code, which trusts its arguments: a mismatch would read out of bounds.
    if not supports(packed.dtype) or x.dtype != packed.dtype or x.dim() != 2 or not x.is_cpu:
        raise ValueError(
            f"no stablelm kernel for {x.dtype} inputs of {x.dim()} dims on {x.device.type} with "
            f"{packed.dtype} weights here"
        )
    m, k = x.shape
    if (
        not layout_matches(packed)
        or packed.shape[:3] != (-(-out_features // 64), -(-k // _pair(packed.dtype)), 64)
        or (bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype))
    ):
        raise ValueError(
            f"the packed weight {tuple(packed.shape)} ({packed.dtype}) and bias do not fit {m}x{k} "
            f"inputs and {out_features} outputs: pack the (N, K) weight with stablelm.kernels.pack"
        )
    lib = library()
    fn = lib.stablelm_linear_bf16 if packed.dtype == torch.bfloat16 else lib.stablelm_linear_f32
    x = x.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(m, out_features, dtype=x.dtype)
    status = fn(
        x.data_ptr(),
        packed.data_ptr(),
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        m,
        out_features,
        k,
        kb,
        torch.get_num_threads(),
    )
    if status == 2:
        raise ValueError(f"bad arguments to stablelm's linear kernel: {m}x{k} @ {out_features}, block {kb}")
    if status:
        raise MemoryError(
            f"stablelm's linear kernel could not allocate its work buffer ({m} rows x 64 floats per thread)"
        )
    return y


def _pair(dtype: torch.dtype) -> int:
    return 2 if dtype == torch.bfloat16 else 1


def layout_matches(packed: torch.Tensor) -> bool:
    """Whether `packed` is in `pack`'s layout for its own dtype (a dtype change keeps the old one)."""
    return packed.dim() == 4 and packed.shape[-1] == _pair(packed.dtype)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) weight -> the kernels' layout [ceil(N/64)][ceil(K/P)][64][P], zero padded (P = 2 for
    bfloat16, whose kernel takes pairs of k; 1 for float32)."""
    n, k = weight.shape
    p = _pair(weight.dtype)
    nb, kp = -(-n // 64), -(-k // p)
    if (nb * 64, kp * p) != (n, k):
        weight = torch.nn.functional.pad(weight, (0, kp * p - k, 0, nb * 64 - n))
    return weight.reshape(nb, 64, kp, p).transpose(1, 2).contiguous()


def unpack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The dense (N, K) weight back from `pack`'s layout (a new tensor)."""
    nb, kp, _, p = packed.shape
    return packed.transpose(1, 2).reshape(nb * 64, kp * p)[:out_features, :in_features].contiguous()
