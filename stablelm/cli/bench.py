"""Time generation: on random weights of a real model's shape (--shape), or on a checkpoint (-m).

Prints prefill and decode tokens/s (the best of 3 greedy generations after a warm-up), the weight
bandwidth decoding reaches, the warm-up time and the peak memory. Unlike the other commands, bench
without -m does not use the demo model: it builds seeded random weights of --shape in place, so that any
shape runs without a download. The same benchmark is `python -m stablelm.bench`.

examples:
  stablelm bench
  stablelm bench --shape 3b --threads 2 --new-tokens 128
  stablelm bench -m ./my-model --dtype float32 --json
"""

from __future__ import annotations

import argparse

from .errors import UsageError
from .options import add_adapter_option, add_quantize_option, compile_notice

# The shapes and dtypes of stablelm.bench (SHAPES, DTYPES), named here so that --help needs no torch.
SHAPE_NAMES = ("1.6b", "160m", "3b", "tiny")
DTYPE_NAMES = ("bfloat16", "float16", "float32")
DEFAULT_SHAPE = "160m"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("what to time (one of)")
    source.add_argument(
        "-m",
        "--model",
        metavar="NAME_OR_PATH",
        help="time this checkpoint (a folder or a hub id) instead of random weights",
    )
    source.add_argument(
        "--shape",
        choices=SHAPE_NAMES,
        help=f"random weights of this model's shape (default: {DEFAULT_SHAPE}; 3b is stablelm-3b-4e1t, "
        "1.6b stablelm-2-1_6b)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        help="the weights' dtype (default: bfloat16 for --shape, the checkpoint's own for -m)",
    )
    parser.add_argument("--batch", type=_positive, default=1, metavar="N", help="rows per batch (default: 1)")
    parser.add_argument(
        "--prompt", type=_positive, default=128, metavar="N", help="prompt tokens per row (default: 128)"
    )
    parser.add_argument(
        "--new-tokens", type=_positive, default=64, metavar="N", help="tokens to generate (default: 64)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step with torch.compile (the warm-up then takes about a minute)",
    )
    parser.add_argument(
        "--no-optimize",
        action="store_true",
        help="torch's kernels instead of stablelm's (from_pretrained(optimize=False))",
    )
    parser.add_argument(
        "--fp32-cache",
        action="store_true",
        help="a float32 KV cache for a bfloat16/float16 model (CPU, optimized)",
    )
    parser.add_argument("--device", default="cpu", help="where to run: cpu (default), cuda, cuda:1, ...")
    add_quantize_option(parser)
    add_adapter_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def check(args: argparse.Namespace) -> str | None:
    """What is wrong with the combination of options, or None."""
    if args.model and args.shape:
        return "--shape and -m/--model both say what to time: give one"
    if args.adapter and not args.model:
        return "--adapter applies to a checkpoint: give the model it was trained on with -m"
    dtype = args.dtype or ("bfloat16" if not args.model else None)
    if args.fp32_cache and (dtype == "float32" or args.no_optimize or args.device != "cpu"):
        return (
            "--fp32-cache is for a bfloat16/float16 model optimized on the CPU: drop it, or use "
            "--dtype bfloat16 without --no-optimize on --device cpu."
        )
    return None


def run(args: argparse.Namespace) -> int:
    from .. import bench

    problem = check(args)
    if problem:
        raise UsageError(problem)
    if args.device != "auto":
        from ..checkpoint.options import resolve_device

        try:
            resolve_device(args.device)
        except ValueError as err:
            raise UsageError(f"--device: {err}") from None
    if args.compile:
        compile_notice()
    bench.report(bench.run_args(args), as_json=args.json)
    return 0
