"""This package's `generate` against the reference's (transformers), on the same random weights.

Each implementation runs in its own process (so peak RSS is its own), builds the same seeded weights
(`stablelm.bench.random_model`; the reference receives them with `load_state_dict(assign=True)`, no
copy) and warms up once. Then the reference and one of ours at a time take turns, one timed generation
each, for `--rounds` rounds: this machine's speed drifts from minute to minute (its measured read
bandwidth moved between 30 and 66 GB/s within one matrix run), and taking turns exposes both to the same
drift. Each figure is the best of its rounds; "x ref" compares ours with the reference's best over the
same rounds. Prints prefill tokens/s (time to the first new token), decode tokens/s (the rest), the
ratios, decoding's effective bandwidth (weight bytes read per token times tokens/s) as a fraction of the
read bandwidth each process measured right after its timings, warm-up time and peak RSS.

With --quantize, int8 and int4 weight-only models (`stablelm.quantize`) join the turns, and their ratios
to our bfloat16 ("optimized") in the same rounds are printed too.

Run:  python benchmarks/generate.py --shape 160m --dtype bfloat16 --batch 1 [--compile] [--rounds 3]
      python benchmarks/generate.py --shape 3b --batch 1 --quantize --kinds optimized   # bf16, int8, int4
      python benchmarks/generate.py --matrix       # the shapes/dtypes/batches of the issues
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ["ref", "plain", "optimized", "fp32-cache", "compiled", "int8", "int4"]
QUANTIZED = ("int8", "int4")


def prepare_reference(args: argparse.Namespace):  # noqa: ANN201 - (generate, ids, info)
    import torch
    import transformers

    from stablelm.bench import DTYPES, random_model, weight_bytes

    transformers.logging.set_verbosity_error()
    ours = random_model(args.shape, DTYPES[args.dtype], device=args.device)
    config = transformers.StableLmConfig.from_dict(ours.config.to_dict())
    with torch.device("meta"):
        ref = transformers.StableLmForCausalLM(config)
    ref.load_state_dict(ours.state_dict(), assign=True)
    ref.model.rotary_emb.inv_freq = ours.model.rotary_emb.inv_freq.clone()
    ref.model.rotary_emb.original_inv_freq = ours.model.rotary_emb.inv_freq.clone()
    nbytes = weight_bytes(ours)
    del ours
    ref.eval()
    ids = torch.randint(
        0, config.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1)
    )
    ids = ids.to(args.device)

    def generate(input_ids, streamer=None, new=args.new_tokens):  # noqa: ANN001, ANN202
        return ref.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            streamer=streamer,
            pad_token_id=0,
        )

    start = time.perf_counter()
    generate(ids, new=4)
    info = {
        "impl": f"transformers {transformers.__version__}",
        "warmup_s": time.perf_counter() - start,
        "weights_gb": nbytes / 1e9,
    }
    return generate, ids, info


def fp32_cache_applies(args: argparse.Namespace) -> bool:
    """Whether the fp32-cache variant exists for this setting (half-precision weights on the CPU)."""
    return args.dtype in ("bfloat16", "float16") and args.device == "cpu"


def serve(args: argparse.Namespace) -> None:
    """A child: build and warm up, then time one generation per line `time` on stdin; on `done`, report."""
    from bandwidth import read_bandwidth

    from stablelm.bench import peak_rss_gb, prepare, time_generate

    if args.child == "ref":
        generate, ids, info = prepare_reference(args)
    else:
        generate, ids, info = prepare(
            shape=args.shape,
            dtype=args.dtype,
            batch=args.batch,
            prompt=args.prompt,
            new_tokens=args.new_tokens,
            compile=args.child == "compiled",
            optimize=args.child != "plain",
            # Compiled bf16 attention runs over every slot of the cache: give it the fp32 one on CPU.
            fp32_cache=args.child == "fp32-cache" or (args.child == "compiled" and fp32_cache_applies(args)),
            device=args.device,
            quantize=args.child if args.child in QUANTIZED else None,
        )
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "time":
            print(
                "TIMING " + json.dumps(time_generate(generate, ids, args.new_tokens, repeats=1)), flush=True
            )
        elif line.strip() == "done":
            break
    info["peak_rss_gb"] = peak_rss_gb()
    # Measured after the timings and after peak RSS was read (its buffer is not the model's memory).
    info["bandwidth_gb_s"] = read_bandwidth(gigabytes=1.0, device=args.device)
    print("RESULT " + json.dumps(info), flush=True)


class Child:
    """One implementation's process, timed on demand."""

    def __init__(self, kind: str, args: argparse.Namespace) -> None:
        self.kind = kind
        cmd = [sys.executable, __file__, "--child", kind, "--shape", args.shape, "--dtype", args.dtype]
        cmd += ["--batch", str(args.batch), "--prompt", str(args.prompt)]
        cmd += ["--new-tokens", str(args.new_tokens), "--device", args.device]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.timings: list[dict] = []
        self._expect("READY")

    def _expect(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag) :].strip()
        self.proc.wait()
        raise RuntimeError(f"{self.kind} run failed:\n{self.proc.stderr.read()}")

    def time(self) -> dict:
        self.proc.stdin.write("time\n")
        self.proc.stdin.flush()
        self.timings.append(json.loads(self._expect("TIMING ")))
        return self.timings[-1]

    def finish(self) -> dict:
        self.proc.stdin.write("done\n")
        self.proc.stdin.flush()
        result = json.loads(self._expect("RESULT "))
        self.proc.wait()
        return {**result, **best(self.timings)}


def best(timings: list[dict]) -> dict:
    return {key: max(t[key] for t in timings) for key in ("prefill_tok_s", "decode_tok_s")}


def compare(args: argparse.Namespace, bandwidth: float) -> None:
    kinds = ["plain", "optimized"] + (["fp32-cache"] if fp32_cache_applies(args) else [])
    kinds += ["compiled"] if args.compile else []
    if args.kinds:
        kinds = [kind for kind in kinds if kind in args.kinds] or ["optimized"]
    if args.quantize and "optimized" not in kinds:
        kinds.append("optimized")
    ref = Child("ref", args)
    results, paired = {}, {}
    for kind in kinds:
        ours = Child(kind, args)
        ref_rounds = []
        for _ in range(args.rounds):  # take turns: both see the same drift of the machine
            ref_rounds.append(ref.time())
            ours.time()
        if kind == "optimized" and args.quantize:  # kept: the quantized models take turns with it
            bf16 = ours
        else:
            results[kind] = ours.finish()
        paired[kind] = best(ref_rounds)
    if args.quantize:
        quantized = {kind: Child(kind, args) for kind in QUANTIZED}
        own: dict[str, list[dict]] = {kind: [] for kind in QUANTIZED}
        for _ in range(args.rounds):
            for kind, child in quantized.items():
                own[kind].append(bf16.time())
                child.time()
        results["optimized"] = bf16.finish()
        for kind, child in quantized.items():
            results[kind] = child.finish()
            paired[kind] = paired["optimized"]
            results[kind]["vs_bf16"] = best(own[kind])
        kinds += list(QUANTIZED)
    results = {"ref": ref.finish(), **{kind: results[kind] for kind in kinds}}
    paired["ref"] = results["ref"]
    print(
        f"\n{args.shape} {args.dtype} batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens"
        f", best of {args.rounds} turns each"
    )
    print(
        f"{'implementation':<30}{'prefill tok/s':>14}{'decode tok/s':>14}{'x ref':>8}"
        f"{'GB/s':>8}{'% bw':>7}{'warm-up s':>11}{'peak RSS GB':>13}"
    )
    nbytes = results["ref"]["weights_gb"]
    for kind, result in results.items():
        gbs = nbytes * result["decode_tok_s"] / args.batch
        impl = (
            "stablelm " + ("plain" if kind == "plain" else "optimized") if kind != "ref" else result["impl"]
        )
        impl += {"fp32-cache": " + fp32 cache", "compiled": " compiled"}.get(kind, "")
        impl = f"stablelm {kind} weights" if kind in QUANTIZED else impl
        print(
            f"{impl:<30}{result['prefill_tok_s']:>14.1f}{result['decode_tok_s']:>14.2f}"
            f"{result['decode_tok_s'] / paired[kind]['decode_tok_s']:>8.2f}{gbs:>8.1f}"
            f"{100 * gbs / result['bandwidth_gb_s']:>6.0f}%"
            f"{result['warmup_s']:>11.1f}{result['peak_rss_gb']:>13.2f}"
        )
    print(
        "(prefill x ref: "
        + ", ".join(f"{k} {results[k]['prefill_tok_s'] / paired[k]['prefill_tok_s']:.2f}" for k in kinds)
        + "; reference's best decode in each pairing: "
        + ", ".join(f"{k} {paired[k]['decode_tok_s']:.2f}" for k in kinds)
        + f"; weights read per token {nbytes:.2f} GB; read bandwidth {bandwidth:.1f} GB/s before, "
        + "/".join(f"{r['bandwidth_gb_s']:.1f}" for r in results.values())
        + " GB/s after each process's timings, the % bw column's base)"
    )
    for kind in QUANTIZED if args.quantize else ():
        mine, bf16 = results[kind], results[kind]["vs_bf16"]
        print(
            f"{kind} vs our bfloat16 in the same turns: decode {mine['decode_tok_s'] / bf16['decode_tok_s']:.2f}x"
            f" ({mine['decode_tok_s']:.2f} vs {bf16['decode_tok_s']:.2f} tok/s), prefill "
            f"{mine['prefill_tok_s'] / bf16['prefill_tok_s']:.2f}x ({mine['prefill_tok_s']:.1f} vs "
            f"{bf16['prefill_tok_s']:.1f} tok/s); x ref and GB/s above use the bf16 weights' bytes"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="160m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="timed turns per implementation")
    parser.add_argument("--compile", action="store_true", help="also time the compiled decode path")
    parser.add_argument("--matrix", action="store_true", help="run the issues' matrix of settings")
    parser.add_argument(
        "--quantize", action="store_true", help="also time int8 and int4 weights, in turns with our bf16"
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=["plain", "optimized", "fp32-cache", "compiled"],
        help="only these of ours against the reference (default: plain, optimized, fp32-cache)",
    )
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    sys.path.insert(0, str(ROOT))
    if args.child:
        serve(args)
        return
    from bandwidth import read_bandwidth

    bandwidth = read_bandwidth(device=args.device)
    if not args.matrix:
        compare(args, bandwidth)
        return
    for shape, dtype, batch in [
        ("160m", "float32", 1),
        ("160m", "float32", 8),
        ("160m", "bfloat16", 1),
        ("160m", "bfloat16", 8),
        ("3b", "bfloat16", 1),
        ("3b", "bfloat16", 8),
    ]:
        compare(
            argparse.Namespace(**{**vars(args), "shape": shape, "dtype": dtype, "batch": batch}), bandwidth
        )


if __name__ == "__main__":
    main()
