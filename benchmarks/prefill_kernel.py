"""The bf16 product (`stablelm_linear_bf16_dot`) of one or more `linear.c` sources, taking turns in one
process: the layers of a shape at --rows rows (prefill's 128 by default; 1 for decoding's), GFLOP/s of the
whole set per turn (median and best). Every source must give the first source's bits (checked first), so
a variant is a faster or slower way to the same sums, never a different result. `--copies N` times N
sets of the layers (distinct weights), so that decoding's rows read them from memory as a model's steps
do (one set of the 160M shape's layers, 14 MB, stays in a 32 MB L3; the 3B shape's, 158 MB, does not).

Run:  [STABLELM_ISA=avx2] python benchmarks/prefill_kernel.py [--shape 160m|3b] [--threads 1] [--rows 128]
          [--turns 15] [--copies 1] [SOURCE.c ...]
(no source: the checkout's `stablelm/kernels/linear.c` alone; `git show REV:stablelm/kernels/linear.c >
old.c` then `old.c stablelm/kernels/linear.c` compares a revision with the checkout. Sources are built as
the package builds its own, for the level it selects: `STABLELM_ISA=avx2` forces the AVX2 build on an
AVX-512 CPU.)
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stablelm import StableLmConfig, kernels  # noqa: E402
from stablelm.bench import SHAPES  # noqa: E402


def layer_shapes(shape: str) -> list[tuple[int, int]]:
    """(K, N) of one decoder layer's products as the model calls them (q/k/v and gate/up fused)."""
    c = StableLmConfig(**SHAPES[shape])
    h, i = c.hidden_size, c.intermediate_size
    qkv = h + 2 * c.num_key_value_heads * (h // c.num_attention_heads)
    return [(h, qkv), (h, h), (h, 2 * i), (i, h)]


def build(source: Path, index: int, isa: str, folder: Path) -> ctypes.CDLL:
    """`source` built by `kernels.build` for `isa`, under a name of its own (a build never replaces
    another's)."""
    copy = folder / f"prefill_variant{index}.c"
    shutil.copy(source, copy)
    try:
        return ctypes.CDLL(str(kernels.build(copy, isa=isa)))
    except RuntimeError as error:
        raise SystemExit(f"{source} does not build for {isa}: {error}") from None
    except OSError as error:
        raise SystemExit(f"{source} built but does not load: {error}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", type=Path)
    parser.add_argument("--shape", default="160m", choices=sorted(SHAPES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--turns", type=int, default=15)
    parser.add_argument("--copies", type=int, default=1, help="sets of the layers, each its own weights")
    args = parser.parse_args()
    if args.threads < 1 or args.rows < 1 or args.turns < 1 or args.copies < 1:
        parser.error("--threads, --rows, --turns and --copies must be at least 1")
    try:
        isa = kernels.selected_isa()
    except ValueError as error:  # STABLELM_ISA names an unknown level, or one this CPU lacks
        raise SystemExit(str(error)) from None
    if isa is None:
        raise SystemExit("no native kernels here (STABLELM_ISA=none, or no level for this CPU)")
    sources = args.sources or [ROOT / "stablelm" / "kernels" / "linear.c"]
    for source in sources:
        if not source.is_file():
            parser.error(f"no such source: {source}")
    torch.manual_seed(0)
    layers = []
    for _ in range(args.copies):
        for k, n in layer_shapes(args.shape):
            layers.append(
                (torch.randn(args.rows, k).bfloat16(), (torch.randn(n, k) / k**0.5).bfloat16(), k, n)
            )

    with tempfile.TemporaryDirectory() as folder:
        fns = []
        for index, source in enumerate(sources):
            fn = getattr(build(source, index, isa, Path(folder)), "stablelm_linear_bf16_dot", None)
            if fn is None:
                raise SystemExit(f"{source} has no stablelm_linear_bf16_dot")
            fn.restype = ctypes.c_int
            fns.append(fn)

        def run(fn, x, w, k, n):  # noqa: ANN001, ANN202
            y = torch.empty(args.rows, n, dtype=torch.bfloat16)
            status = fn(
                ctypes.c_void_p(x.data_ptr()), args.rows, k, k, ctypes.c_void_p(y.data_ptr()), n, 1,
                ctypes.c_void_p(w.data_ptr()), None, n, None, None, 0, None, None, 0, 0, args.threads,
            )  # fmt: skip
            if status:
                raise SystemExit(f"the kernel returned {status}")
            return y

        first = [run(fns[0], *layer) for layer in layers]
        for source, fn in zip(sources[1:], fns[1:], strict=True):
            for layer, expected in zip(layers, first, strict=True):
                if not torch.equal(run(fn, *layer), expected):
                    raise SystemExit(f"{source} gives other bits than {sources[0]} at (K, N) {layer[2:]}")
        flops = sum(2 * args.rows * k * n for _, _, k, n in layers)
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(args.turns):
            for i, fn in enumerate(fns):
                start = time.perf_counter()
                for layer in layers:
                    run(fn, *layer)
                times[i].append(time.perf_counter() - start)
    print(
        f"{args.shape} layers ({args.copies} set(s), {sum(w.numel() for _, w, _, _ in layers) * 2 / 1e6:.0f} MB)"
        f" at {args.rows} rows, {args.threads} thread(s), {isa} build, {args.turns} turns"
    )
    base = statistics.median(times[0])
    for source, ts in zip(sources, times, strict=True):
        med = statistics.median(ts)
        print(
            f"{source}: median {flops / med / 1e9:.1f} GFLOP/s, best {flops / min(ts) / 1e9:.1f}"
            f" ({base / med:.2f}x the first)"
        )


if __name__ == "__main__":
    main()
