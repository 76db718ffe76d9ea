"""The machine's memory read bandwidth: the ceiling for batch-1 decoding.

Batch-1 decoding reads every weight once per token, so tokens/s <= bandwidth / weight bytes. On the CPU
the figure is the best of torch's own reduction (a sum) and, where stablelm's native kernels build
(x86-64 with AVX-512), plain AVX-512 loads on the same threads: torch's reductions stop near
35 GB/s on a 2-core Zen 4, below what the loads (and the decoding kernel) reach.
Run: python benchmarks/bandwidth.py [--gb 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stablelm import kernels  # noqa: E402


def read_bandwidth(*, gigabytes: float = 2.0, device: str = "cpu", repeats: int = 5) -> float:
    """Best GB/s over `repeats` full reads of a buffer of `gigabytes` (a torch sum; on CPU also plain
    loads where the native kernels build)."""
    n = int(gigabytes * 1e9 / 4)
    x = torch.ones(n, dtype=torch.float32, device=device)
    readers = [x.sum]
    if device == "cpu" and kernels.library() is not None and x.data_ptr() % 64 == 0:
        readers.append(lambda: kernels.read_memory(x))
    best = float("inf")
    for read in readers:
        for _ in range(repeats + 1):  # the first pass warms up page tables and caches
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            read()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return n * 4 / best / 1e9


def copy_bandwidth(*, gigabytes: float = 2.0, device: str = "cuda", repeats: int = 5) -> float:
    """Best GB/s of a device-to-device copy (bytes read + bytes written), the usual GPU figure."""
    n = int(gigabytes * 1e9 / 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n * 4 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="buffer size in GB")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(
        f"read bandwidth ({args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads): "
        f"{read_bandwidth(gigabytes=args.gb, device=args.device):.1f} GB/s"
    )
    if args.device == "cuda":
        print(f"copy bandwidth: {copy_bandwidth(gigabytes=args.gb):.1f} GB/s")


if __name__ == "__main__":
    main()
