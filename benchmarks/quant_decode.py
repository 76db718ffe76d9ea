"""Batch-1 decoding of the 3B shape (random weights) with bf16, int8 and int4 weights, the quantized models
run with the worktree's `quant.c` ("new") and with another revision's ("old", default 72a3592, before the
one-row kernels), all in one process taking turns: prompt 128, 32 new tokens, greedy, 1 thread.

Decode tokens/s by wall time and by the process's CPU time (on a shared machine wall time also counts
other processes' turns); the ratios to bf16 use CPU time, best of the rounds. Prefill tokens/s (the
prompt to the first new token) by CPU time, best of the rounds, and its ratio to bf16's.

Run:  OMP_NUM_THREADS=1 python benchmarks/quant_decode.py [--old REV] [--rounds 3] [--shape 3b]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NEW = 32


class Clock:
    """A streamer noting wall and CPU time at the prompt and at each new token."""

    def __init__(self) -> None:
        self.t: list[tuple[float, float]] = []

    def put(self, value: torch.Tensor) -> None:
        self.t.append((time.perf_counter(), time.process_time()))

    def end(self) -> None:
        pass


def build(source: Path, out: Path) -> ctypes.CDLL:
    from stablelm.kernels import COMMON_FLAGS, ISA_FLAGS, selected_isa

    subprocess.run(
        ["cc", *COMMON_FLAGS, *ISA_FLAGS[selected_isa()][0], str(source), "-o", str(out)], check=True
    )
    lib = ctypes.CDLL(str(out))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.stablelm_q8_linear.argtypes = [p, i, i, i, i, p, i, p, p, p, i]
    lib.stablelm_q4_linear.argtypes = [p, i, i, i, i, p, i, p, p, p, i, p, i, i]
    lib.stablelm_q8_dequant.argtypes = [p, p, i, i, i, p, i, i]
    lib.stablelm_q4_dequant.argtypes = [p, p, p, i, i, i, i, p, i, i]
    return lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="72a3592")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shape", default="3b")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import stablelm.quantization.linear as qlinear
    import stablelm.quantization.modes as qmodes
    from stablelm.bench import prepare

    tmp = Path(tempfile.mkdtemp(prefix="quantdecode-"))
    from quant_kernels import revision_source

    old = revision_source(args.old, tmp, "old.c")
    libs = {"old": build(old, tmp / "old.so"), "new": qlinear.quant_library()}
    models = {}
    for q in (None, "int8", "int4"):
        models[q or "bf16"], ids, _ = prepare(
            shape=args.shape, batch=1, prompt=128, new_tokens=NEW, quantize=q
        )
    variants = [("bf16", "bf16", None)]
    variants += [(f"{q} {v}", q, v) for q in ("int8", "int4") for v in ("old", "new")]
    results = {name: [] for name, _, _ in variants}
    for rnd in range(args.rounds):
        for name, model, lib in variants:
            if lib:
                qlinear.quant_library = qmodes.quant_library = lambda chosen=libs[lib]: chosen
                # the old revision may predate the AMX kernels (type bit XAMX)
                qmodes.FORCE_AMX = None if lib == "new" else False
            clock = Clock()
            with torch.no_grad():
                models[model](ids, streamer=clock)
            end = (time.perf_counter(), time.process_time())
            first = clock.t[1]  # t[0]: the prompt handed over
            wall, cpu = (NEW - 1) / (end[0] - first[0]), (NEW - 1) / (end[1] - first[1])
            prefill = ids.shape[1] / (first[1] - clock.t[0][1])
            results[name].append((wall, cpu, prefill))
            print(
                f"round {rnd} {name}: decode {wall:.2f} tok/s wall, {cpu:.2f} CPU, prefill {prefill:.1f}"
                f" tok/s CPU, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    base = max(v[1] for v in results["bf16"])
    base_prefill = max(v[2] for v in results["bf16"])
    print("best of the rounds:")
    for name, values in results.items():
        cpu, wall, prefill = (max(v[i] for v in values) for i in (1, 0, 2))
        print(
            f"  {name:9s} decode {cpu:.2f} tok/s (CPU time), {wall:.2f} (wall)  {cpu / base:.2f}x bf16;"
            f" prefill {prefill:.1f} tok/s  {prefill / base_prefill:.2f}x bf16"
        )


if __name__ == "__main__":
    main()
