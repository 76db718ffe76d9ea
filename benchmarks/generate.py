"""This package's `generate` against the reference's (transformers), on the same random weights.

Each implementation runs in its own process (so peak RSS is its own), builds the same seeded weights
(`stablelm.bench.random_model`; the reference receives them with `load_state_dict(assign=True)`, no
copy), warms up once, then times one generation: prefill tokens/s (time to the first new token) and
decode tokens/s (the rest). Prints one table with the ratios and decoding's effective bandwidth as a
fraction of the machine's measured read bandwidth.

Run:  python benchmarks/generate.py --shape 160m --dtype bfloat16 --batch 1 [--compile]
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


def run_reference(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    from stablelm.bench import DTYPES, peak_rss_gb, random_model, time_generate, weight_bytes

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

    def generate(input_ids, streamer=None, new=args.new_tokens):
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
    warmup = time.perf_counter() - start
    result = time_generate(generate, ids, args.new_tokens)
    return {
        "impl": f"transformers {transformers.__version__}",
        **result,
        "decode_weight_gb_s": nbytes * result["decode_tok_s"] / args.batch / 1e9,
        "warmup_s": warmup,
        "weights_gb": nbytes / 1e9,
        "peak_rss_gb": peak_rss_gb(),
    }


def fp32_cache_applies(args: argparse.Namespace) -> bool:
    """Whether `optimize_for_inference(fp32_cache=True)` takes these settings: half precision on CPU."""
    return args.dtype != "float32" and args.device == "cpu"


def child(args: argparse.Namespace) -> None:
    if args.child == "ref":
        result = run_reference(args)
    else:
        from stablelm.bench import run

        result = run(
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
        )
    # This machine's bandwidth drifts between minutes (32-48 GB/s seen on the 2-core VM): each run
    # measures it right after its own timing (after its peak RSS was taken) and is compared to that.
    from bandwidth import read_bandwidth

    result["bandwidth_gb_s"] = read_bandwidth(gigabytes=1.0, device=args.device)
    print("RESULT " + json.dumps(result))


def spawn(kind: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--shape", args.shape, "--dtype", args.dtype]
    cmd += ["--batch", str(args.batch), "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens)]
    cmd += ["--device", args.device]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{kind} run failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(line[len("RESULT ") :])


def compare(args: argparse.Namespace, bandwidth: float) -> None:
    kinds = ["ref", "plain", "optimized"]
    if fp32_cache_applies(args):
        kinds.append("fp32-cache")
    kinds += ["compiled"] if args.compile else []
    results = {kind: spawn(kind, args) for kind in kinds}
    ref = results["ref"]
    print(
        f"\n{args.shape} {args.dtype} batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens"
    )
    print(
        f"{'implementation':<28}{'prefill tok/s':>14}{'decode tok/s':>14}{'x ref':>8}"
        f"{'GB/s':>8}{'% bw':>7}{'warm-up s':>11}{'peak RSS GB':>13}"
    )
    for result in results.values():
        gbs = result["decode_weight_gb_s"]
        print(
            f"{result['impl']:<28}{result['prefill_tok_s']:>14.1f}{result['decode_tok_s']:>14.2f}"
            f"{result['decode_tok_s'] / ref['decode_tok_s']:>8.2f}{gbs:>8.1f}"
            f"{100 * gbs / result['bandwidth_gb_s']:>6.0f}%"
            f"{result['warmup_s']:>11.1f}{result['peak_rss_gb']:>13.2f}"
        )
    print(
        "(prefill x ref: "
        + ", ".join(
            f"{r['impl']} {r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}"
            for k, r in results.items()
            if k != "ref"
        )
        + f"; weights read per token {ref['weights_gb']:.2f} GB; read bandwidth {bandwidth:.1f} GB/s before, "
        + "/".join(f"{r['bandwidth_gb_s']:.1f}" for r in results.values())
        + " GB/s after each run, the % bw column's base)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="160m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time the compiled decode path")
    parser.add_argument("--matrix", action="store_true", help="run the issues' matrix of settings")
    parser.add_argument(
        "--child", choices=["ref", "plain", "optimized", "fp32-cache", "compiled"], help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        child(args)
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
