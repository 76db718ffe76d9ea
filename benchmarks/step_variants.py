"""Whole planned decode steps (`stablelm.lean_step`) on the checkout's kernels against the same steps on
a variant of a kernel source, taking turns in one process.

A kernel's speed alone can mislead: how it reads the weights also decides what of the rest of the step
(its small tensors, torch's code and data, the KV cache) is still in the caches afterwards. Here two
plans of one model over one cache are made, plan A on the checkout's libraries and plan B with the
variant's `linear.c` (and/or `attention.c`) functions; the two then alternate, five steps at a time, at
the same position of the cache, and the script prints the median and best step of each and B/A. An
A/A run (the checkout's own source as the variant) reads 1.00 +- 0.01 on a quiet machine. The variant
must give the same logits (checked first).

Run:  python benchmarks/step_variants.py --folder DIR [--threads 1] [--linear VARIANT.c]
          [--attention VARIANT.c] [--turns 30]
(`DIR`: a bf16 checkpoint, e.g. written by `benchmarks/documented_path.py --folder DIR`.)
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

import stablelm  # noqa: E402
from stablelm import kernels, lean_step  # noqa: E402
from stablelm.cache import StaticCache  # noqa: E402


def variant_library(source: Path, stem: str, folder: Path) -> ctypes.CDLL:
    """`source` built for the selected level under its own name (a build never replaces another's)."""
    copy = folder / f"{stem}.c"
    shutil.copy(source, copy)
    isa = kernels.selected_isa()
    if isa is None:
        raise SystemExit("no native kernels here (STABLELM_ISA=none or no compiler)")
    try:
        return ctypes.CDLL(str(kernels.build(copy, isa=isa)))
    except (RuntimeError, OSError) as err:
        raise SystemExit(f"{source}: the variant does not build or load for {isa}: {err}") from None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folder", type=Path, required=True, help="a bf16 checkpoint folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--linear", type=Path, help="a variant of stablelm/kernels/linear.c")
    parser.add_argument("--attention", type=Path, help="a variant of stablelm/kernels/attention.c")
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--prompt", type=int, default=128)
    args = parser.parse_args()
    if args.linear is None and args.attention is None:
        parser.error("give --linear and/or --attention")
    torch.set_num_threads(args.threads)
    model = stablelm.AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16)
    ids = torch.randint(
        0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1)
    )
    cache = StaticCache.for_model(
        model.config, batch_size=1, max_cache_len=args.prompt + 48, dtype=torch.bfloat16, device="cpu"
    )
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    plan_a = lean_step.LeanStep.build(model, cache, 1)
    if plan_a is None:
        raise SystemExit("the planned step does not apply to this model here")
    with tempfile.TemporaryDirectory() as tmp:
        kernel, planned = lean_step.kernel, lean_step.planned_linear
        if args.linear is not None:
            lib = variant_library(args.linear, "linear_variant", Path(tmp))
            # the prefetch modes this process timed for the checkout's library (stablelm.kernels.prefetch),
            # set in the variant too where it has them: else it would run the first modes
            if hasattr(lib, "stablelm_set_prefetch") and kernels.library() is not None:
                for which in range(2):
                    lib.stablelm_set_prefetch(which, kernels.library().stablelm_prefetch(which))
            lib.stablelm_linear_planned.restype = ctypes.c_int
            lib.stablelm_linear_planned.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            lean_step.kernel = lambda kind: getattr(lib, f"stablelm_linear_{kind}", None)
            lean_step.planned_linear = lambda: lib.stablelm_linear_planned
        try:
            plan_b = lean_step.LeanStep.build(model, cache, 1)
        finally:
            lean_step.kernel, lean_step.planned_linear = kernel, planned
        if args.attention is not None and plan_a.attn is not None:
            alib = variant_library(args.attention, "attention_variant", Path(tmp))
            fn = alib.stablelm_decode_attention_bf16
            fn.argtypes, fn.restype = plan_a.attn.argtypes, plan_a.attn.restype
            plan_b.attn = fn
        position = args.prompt + 20
        tokens, positions = torch.tensor([[5]]), torch.tensor([[position]])
        cache._length = position  # every step writes the same slot: the cache stays as it is
        with torch.no_grad():
            if not torch.equal(
                plan_a(cache, tokens, positions, None), plan_b(cache, tokens, positions, None)
            ):
                raise SystemExit("the variant's logits differ from the checkout's")
            times: dict[str, list[float]] = {"A": [], "B": []}
            for _ in range(args.turns):
                for name, plan in (("A", plan_a), ("B", plan_b)):
                    for _ in range(5):
                        start = time.perf_counter()
                        plan(cache, tokens, positions, None)
                        times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts) * 1e3:.3f} ms  best {min(ts) * 1e3:.3f} ms")
    print(f"B/A median {statistics.median(times['B']) / statistics.median(times['A']):.3f}")


if __name__ == "__main__":
    main()
