"""Native kernels, built on first use with the system's C compiler and loaded with ctypes.

One kernel today: `linear_bf16.c`, a bfloat16 linear layer for x86-64 CPUs with AVX512-BF16 that
reads the weights about 1.4x faster than oneDNN's kernel at batch 1 and sums in oneDNN's order, so
its outputs equal torch's bit for bit (checked per weight shape before use, see
`stablelm.kernels.linear.KernelLinear`).

The shared library is compiled once into `$STABLELM_CACHE` (default `~/.cache/stablelm/kernels`),
named by a hash of the source and flags, written atomically. Where it cannot be had (another CPU or
OS, no compiler, `STABLELM_KERNELS=0`), `linear_bf16()` returns None and callers keep torch's kernels.
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

SOURCE = Path(__file__).with_name("linear_bf16.c")
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


def cpu_has_avx512_bf16() -> bool:
    """Whether this is Linux on an x86-64 CPU that reports AVX512-BF16."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_bf16" in line.split()
    except OSError:
        pass
    return False


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
def linear_bf16() -> ctypes.CDLL | None:
    """The bf16 linear kernel's library, or None where it cannot be used (see the module docstring)."""
    if os.environ.get("STABLELM_KERNELS", "1") == "0" or not cpu_has_avx512_bf16():
        return None
    try:
        lib = ctypes.CDLL(str(build(SOURCE)))
    except (RuntimeError, OSError, subprocess.SubprocessError):
        return None
    fn = lib.stablelm_linear_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5
    lib.stablelm_read.restype = ctypes.c_uint64
    lib.stablelm_read.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return lib


def read_memory(buffer: torch.Tensor) -> int:
    """Read all of `buffer` (contiguous CPU, 64-byte aligned) with AVX-512 loads on torch's threads; an
    XOR of what was read. For measuring read bandwidth: torch's own reductions stop at ~35 GB/s on a
    2-core Zen 4 where plain loads reach more."""
    lib = linear_bf16()
    assert lib is not None and buffer.is_contiguous() and buffer.data_ptr() % 64 == 0
    nbytes = buffer.numel() * buffer.element_size() // 256 * 256
    return lib.stablelm_read(buffer.data_ptr(), nbytes, torch.get_num_threads())


def run_linear_bf16(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int, kb: int
) -> torch.Tensor:
    """y = x @ W^T (+ bias) with the kernel; `x` (M, K) contiguous bf16, `packed` from `pack_bf16`."""
    lib = linear_bf16()
    assert lib is not None, "run_linear_bf16 called where the kernel is unavailable"
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=torch.bfloat16)
    status = lib.stablelm_linear_bf16(
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
    if status:
        raise MemoryError("stablelm's bf16 linear kernel could not allocate its work buffer")
    return y


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) bf16 weight -> the kernel's layout [ceil(N/64)][ceil(K/2)][64][2], zero padded."""
    n, k = weight.shape
    nb, kp = -(-n // 64), -(-k // 2)
    if (nb * 64, kp * 2) != (n, k):
        weight = torch.nn.functional.pad(weight, (0, kp * 2 - k, 0, nb * 64 - n))
    return weight.reshape(nb, 64, kp, 2).transpose(1, 2).contiguous()


def unpack_bf16(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The dense (N, K) weight back from `pack_bf16`'s layout (a new tensor)."""
    nb, kp = packed.shape[:2]
    return packed.transpose(1, 2).reshape(nb * 64, kp * 2)[:out_features, :in_features].contiguous()
