"""What each part of the planned decode step (`stablelm.lean_step`) costs where it runs: the whole step
against the same step with one part left out, taking turns in one process.

Timing a small operation alone misleads: after a linear kernel has streamed megabytes of weights, the
operation finds its code and data evicted. Here the step runs as `LeanStep.__call__` runs it (the plan's
own kernels, buffers and torch calls, in the same order) and, in turns, with the layer norms, the
residual sums, the activation, the rotary-and-cache-write call or attention left out (the logits are
then wrong: this measures time only); "all" leaves out all of them, so what remains is the linear
kernels, the embedding and Python. Random weights of a shape, the cache filled to --fill positions.

Run:  python benchmarks/step_parts.py [--shape 160m] [--threads 1] [--quantize int4] [--turns 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stablelm  # noqa: E402
from stablelm.bench import SHAPES, random_model  # noqa: E402
from stablelm.cache import StaticCache  # noqa: E402
from stablelm.kernels import attention as native_attention  # noqa: E402
from stablelm.lean_step import LeanStep  # noqa: E402

PARTS = ("norms", "residuals", "activation", "rotary", "attention")


def step(
    plan: LeanStep, cache: StaticCache, tokens: torch.Tensor, positions: torch.Tensor, skip: set
) -> None:
    """`LeanStep.__call__` for one row and no mask, with the parts in `skip` left out."""
    slot = cache.get_seq_length()
    length, slots = slot + 1, cache.max_cache_len
    x = F.embedding(tokens, plan.embed.weight, plan.embed.padding_idx).view(1, -1)
    cos, sin = plan.rotary_emb(x, positions)
    cos, sin = cos.contiguous(), sin.contiguous()
    for i, layer in enumerate(plan.layers):
        kc, vc = cache.keys[i], cache.values[i]
        h = x if "norms" in skip else torch.layer_norm(x, *layer.ln1)
        qkv = layer.qkv(h)
        if "rotary" not in skip:
            plan.qkv_fn(
                qkv.data_ptr(), qkv.shape[1], cos.data_ptr(), sin.data_ptr(), plan.q.data_ptr(), kc.data_ptr(),
                vc.data_ptr(), slots, slot, 1, plan.H, plan.Hkv, plan.D, cos.shape[-1],
            )  # fmt: skip
        if "attention" not in skip:
            native_attention.run(plan.attn, plan.q_heads, kc, vc, length, None, plan.attn_out, plan.scale)
        o = layer.o(plan.attn_out)
        x = o if "residuals" in skip else o.add_(x)
        m_in = h if layer.parallel else x if "norms" in skip else torch.layer_norm(x, *layer.ln2)
        if "activation" in skip:
            layer.gate_up(m_in)
            m = layer.down(layer.mlp_in)
        else:
            m = layer.mlp(m_in)
        x = m if "residuals" in skip else m.add_(x)
    x = x if "norms" in skip else torch.layer_norm(x, *plan.norm)
    plan.head(x).to(torch.float32, copy=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="160m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quantize", choices=["int8", "int4"])
    parser.add_argument("--fill", type=int, default=160, help="cache positions already written")
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per turn")
    args = parser.parse_args()
    for name in ("threads", "turns", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.fill < 0:
        parser.error(f"--fill must be 0 or more, got {args.fill}")
    torch.set_num_threads(args.threads)
    model = random_model(args.shape, torch.bfloat16)
    if args.quantize:
        stablelm.quantize(model, args.quantize)
    stablelm.optimize_for_inference(model)
    cache = StaticCache.for_model(
        model.config, batch_size=1, max_cache_len=args.fill + 64, dtype=torch.bfloat16, device="cpu"
    )
    cache.advance(args.fill)
    plan = LeanStep.build(model, cache, 1)
    if plan is None or plan.attn is None or plan.head is None or plan.layers[0].mlp_in is None:
        sys.exit("the planned step with native attention does not apply here (see stablelm.lean_step)")
    tokens, positions = torch.tensor([[5]]), torch.tensor([[args.fill]])
    variants = [(), *((p,) for p in PARTS), PARTS]
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    with torch.inference_mode():
        for _ in range(2):
            for v in variants:
                step(plan, cache, tokens, positions, set(v))
        for _ in range(args.turns):
            for v in variants:
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(plan, cache, tokens, positions, set(v))
                times[v].append((time.perf_counter() - start) / args.steps * 1e3)
    whole = statistics.median(times[()])
    quant = f" {args.quantize}" if args.quantize else ""
    print(f"{args.shape}{quant}, {args.threads} thread(s), {args.fill} cached positions; median ms per step")
    for v in variants:
        label = "whole step" if not v else "without " + ("all" if v == PARTS else v[0])
        median = statistics.median(times[v])
        print(f"  {label:24s} {median:8.3f}  (the part: {whole - median:+.3f})")


if __name__ == "__main__":
    main()
