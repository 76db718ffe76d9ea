"""Batch-1 speed of the int8 / int4 kernels (`stablelm/kernels/quant.c`) with cold weights, against
stablelm's bf16 linear layer and against another version of `quant.c` (e.g. the committed one), in
turns in one process.

Each variant gets its own set of layers of one shape, ~`--set-mb` MB of its weights in all (more than
the 480 MB L3 of the machine it was written on, so every pass reads the weights from memory); one pass
calls every layer of the set once with a 1-row input. The variants take turns pass by pass; the
figures are G weights/s (median and best of `--rounds` passes) and the ratio to bf16 (medians), timed
by the process's CPU time (on a shared machine wall time counts other processes' turns; `--wall` for
it), so use one thread (at two, CPU time counts OpenMP's spinning). `--read` adds a plain 1 GB read
(GB/s) in the same turns.

Run:  python benchmarks/quant_kernels.py [--old REV] [--shape 2560x6912] [--threads 1] [--rounds 9]
      [--define NAME=-DFLAG ...]   (extra builds of the worktree's quant.c with compiler flags)
Builds whose prefetch hint is chosen at run time get the one stablelm times for this CPU
(`stablelm.kernels.prefetch.quant_prefetch_mode`); `--define x=-DPFH=_MM_HINT_T0` fixes it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def revision_source(rev: str, folder: Path, name: str) -> Path:
    """stablelm/kernels/quant.c as of git revision `rev`, with the local headers it includes, written into
    `folder` under `name` (the headers beside it under their own names); its path."""
    import re

    def show(path: str) -> str:
        return subprocess.check_output(
            ["git", "-C", str(ROOT), "show", f"{rev}:stablelm/kernels/{path}"], text=True
        )

    text = show("quant.c")
    for header in re.findall(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"', text, re.MULTILINE):
        (folder / header).write_text(show(header))
    (folder / name).write_text(text)
    return folder / name


def compile_source(source: Path, out: Path, extra: list[str]) -> ctypes.CDLL:
    from stablelm.kernels import COMMON_FLAGS, ISA_FLAGS, selected_isa

    isa = selected_isa() or "avx2"
    for flags in ISA_FLAGS[isa]:
        result = subprocess.run(
            ["cc", *COMMON_FLAGS, *flags, *extra, str(source), "-o", str(out)], capture_output=True, text=True
        )
        if result.returncode == 0:
            break
    else:
        raise RuntimeError(result.stderr[-2000:])
    lib = ctypes.CDLL(str(out))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.stablelm_q8_linear.argtypes = [p, i, i, i, i, p, i, p, p, p, i]
    lib.stablelm_q4_linear.argtypes = [p, i, i, i, i, p, i, p, p, p, i, p, i, i]
    if hasattr(lib, "stablelm_quant_set_prefetch"):  # the hint the package times for this CPU, as it runs
        from stablelm.kernels.prefetch import quant_prefetch_mode

        lib.stablelm_quant_set_prefetch(quant_prefetch_mode())
    return lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--old",
        action="append",
        help="git revision of quant.c to compare with (repeatable; default HEAD, '' for none)",
    )
    parser.add_argument("--shape", default="2560x6912", help="K x N of the layer")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--set-mb", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--kinds", default="int8,int4", help="int8, int4 or both")
    parser.add_argument("--define", action="append", default=[], help="NAME=-DFLAG[,-DFLAG]: another build")
    parser.add_argument(
        "--modes",
        help="int4 kernel modes to time, comma-separated (bits: 1 AVX512-BF16, 2 VNNI); default: the CPU's",
    )
    parser.add_argument("--group", type=int, default=128, help="int4 group size")
    parser.add_argument(
        "--amx",
        choices=["off", "on", "both"],
        default="off",
        help="the worktree's builds with XAMX (AMX tiles for 2-16 rows), without, or both in turns",
    )
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--read", action="store_true", help="also the plain read speed (GB/s)")
    parser.add_argument("--wall", action="store_true", help="wall time instead of the process's CPU time")
    args = parser.parse_args()
    try:
        modes_given = [int(v) for v in args.modes.split(",")] if args.modes else []
    except ValueError:
        modes_given = [-1]
    if any(not 0 <= mode <= 3 for mode in modes_given):
        parser.error(f"--modes takes int4 kernel modes 0-3, comma-separated; got {args.modes!r}")
    if args.group not in (64, 128, 256) or int(args.shape.split("x")[0]) % args.group:
        parser.error(f"--group must be 64, 128 or 256 and divide the layer's inputs; got {args.group}")
    torch.set_num_threads(args.threads)
    k, n = (int(v) for v in args.shape.split("x"))
    m = args.rows
    import stablelm.layers
    from stablelm.quantization import QuantizedLinear
    from stablelm.quantization.linear import int4_mode

    tmp = Path(tempfile.mkdtemp(prefix="quantbench-"))
    builds = {"new": compile_source(ROOT / "stablelm/kernels/quant.c", tmp / "new.so", [])}
    for rev in args.old or ["HEAD"]:
        if rev:
            folder = tmp / f"rev_{len(builds)}"  # a revision's headers must not meet another's
            folder.mkdir()
            old = revision_source(rev, folder, "quant.c")
            builds[rev] = compile_source(old, tmp / f"quant_{len(builds)}.so", [])
    for spec in args.define:
        name, flags = spec.split("=", 1)
        builds[name] = compile_source(ROOT / "stablelm/kernels/quant.c", tmp / f"{name}.so", flags.split(","))

    torch.manual_seed(0)
    budget = args.set_mb << 20
    x = torch.randn(m, k).bfloat16()
    modes = modes_given or [int4_mode(torch.bfloat16)]
    passes = {}  # name -> callable doing one pass
    if not args.no_bf16:
        dense = []
        for _ in range(max(2, budget // (n * k * 2))):
            layer = stablelm.layers.Linear(k, n, bias=False).bfloat16()
            layer.weight.data.normal_(0, 0.02)
            dense.append(layer)
        passes["bf16"] = lambda: [layer(x) for layer in dense]
    if args.read:  # the memory's read speed at this moment, as bytes: reported as G "int8 weights"/s
        from stablelm.kernels import read_memory

        buffer = torch.empty(budget, dtype=torch.uint8).fill_(1)
        passes["read GB/s"] = lambda: read_memory(buffer)
    one = torch.randn(n, k).bfloat16() * 0.02
    template = {
        q: QuantizedLinear.from_dense(one, None, quant_type=q, group_size=args.group)
        for q in ("int8", "int4")
    }
    y = torch.empty(m, n, dtype=torch.bfloat16)
    for q in args.kinds.split(","):
        t = template[q]
        per = t.weight.numel() + t.weight_scale.numel() * t.weight_scale.element_size()
        count = max(2, budget // per)
        layers = []
        for _ in range(count):  # copies of one quantized layer: the same work, distinct memory
            layers.append(tuple(v.clone() for v in (t.weight, t.weight_scale, t.weight_min) if v is not None))
        for name, lib in builds.items():
            amx = (
                [False]
                if name in (args.old or ["HEAD"])
                else {"off": [False], "on": [True], "both": [False, True]}[args.amx]
            )
            if q == "int8":
                for tiles in amx:

                    def run(lib=lib, layers=layers, xt=1 | (8 if tiles else 0)) -> None:
                        for w, s in layers:
                            lib.stablelm_q8_linear(
                                x.data_ptr(),
                                xt,
                                m,
                                k,
                                k,
                                y.data_ptr(),
                                n,
                                w.data_ptr(),
                                s.data_ptr(),
                                None,
                                args.threads,
                            )

                    passes[f"{q} {name}" + (" amx" if tiles else "")] = run
                continue
            else:
                for mode, tiles in [(mo, t) for mo in modes for t in amx]:

                    def run(lib=lib, layers=layers, mode=mode, xt=1 | (8 if tiles else 0)) -> None:
                        for w, s, mn in layers:
                            lib.stablelm_q4_linear(
                                x.data_ptr(),
                                xt,
                                m,
                                k,
                                k,
                                y.data_ptr(),
                                n,
                                w.data_ptr(),
                                s.data_ptr(),
                                mn.data_ptr(),
                                args.group,
                                None,
                                mode,
                                args.threads,
                            )

                    passes[
                        f"{q} {name}"
                        + (f" mode {mode}" if len(modes) > 1 else "")
                        + (" amx" if tiles else "")
                    ] = run
                continue
            passes[f"{q} {name}"] = run
        # the builds agree with the layer's dequantized weights
        ref = x.float() @ t.dequantized().t()
        for name, lib in builds.items():
            w = template[q]
            if q == "int8":
                lib.stablelm_q8_linear(
                    x.data_ptr(),
                    1,
                    m,
                    k,
                    k,
                    y.data_ptr(),
                    n,
                    w.weight.data_ptr(),
                    w.weight_scale.data_ptr(),
                    None,
                    args.threads,
                )
            else:
                for mode in modes:
                    status = lib.stablelm_q4_linear(
                        x.data_ptr(),
                        1,
                        m,
                        k,
                        k,
                        y.data_ptr(),
                        n,
                        w.weight.data_ptr(),
                        w.weight_scale.data_ptr(),
                        w.weight_min.data_ptr(),
                        args.group,
                        None,
                        mode,
                        args.threads,
                    )
                    err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
                    assert status == 0 and err < 1e-2, (q, name, mode, status, err)
                continue
            err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
            assert err < 1e-2, (q, name, err)
    counts = {"bf16": len(dense) if not args.no_bf16 else 0, "read": budget / (n * k)}
    for q in args.kinds.split(","):
        t = template[q]
        per = t.weight.numel() + t.weight_scale.numel() * t.weight_scale.element_size()
        counts[q] = max(2, budget // per)
    # CPU time by default: on a shared machine the process is often descheduled, which wall time counts
    clock = time.perf_counter if args.wall else time.process_time
    rates = {name: [] for name in passes}
    with torch.no_grad():
        for run in passes.values():  # warm-up: build plans, touch pages
            run()
        for _ in range(args.rounds):
            for name, run in passes.items():
                start = clock()
                run()
                seconds = clock() - start
                layers = counts[name.split()[0]]
                rates[name].append(layers * n * k / seconds / 1e9)
    load = os.getloadavg()[0]
    print(
        f"{k}x{n} ({k} inputs, {n} outputs), {m} row(s), {args.threads} thread(s), load {load:.1f}, "
        f"{args.rounds} rounds, int4 group {args.group} mode(s) {modes}, {'wall' if args.wall else 'CPU'} time"
    )
    base = statistics.median(rates["bf16"]) if "bf16" in rates else None
    for name, values in rates.items():
        med = statistics.median(values)
        ratio = f"  {med / base:.2f}x bf16" if base else ""
        print(f"  {name:12s} median {med:6.2f}  best {max(values):6.2f} G weights/s{ratio}")


if __name__ == "__main__":
    main()
