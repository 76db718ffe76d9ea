"""The machine's memory read bandwidth as PyTorch sees it: the ceiling for batch-1 decoding.

Batch-1 decoding reads every weight once per token, so tokens/s <= bandwidth / weight bytes.
Run: python benchmarks/bandwidth.py [--gb 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch


def read_bandwidth(*, gigabytes: float = 2.0, device: str = "cpu", repeats: int = 5) -> float:
    """Best GB/s over `repeats` full reads (a sum) of an fp32 buffer of `gigabytes`."""
    n = int(gigabytes * 1e9 / 4)
    x = torch.ones(n, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up page tables and caches
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x.sum()
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
