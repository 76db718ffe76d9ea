"""`python -m stablelm.bench` (also `stablelm bench`): time this package's generation on random weights of
a real model's shape, or on a checkpoint.

Prints prefill and decode tokens/s, the effective read bandwidth of decoding (weight bytes per token
times tokens/s) against the machine's measured read bandwidth, compile time and peak RSS. The
side-by-side comparison with the reference lives in `benchmarks/generate.py`, which runs this module
and the reference in separate processes on the same weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .config import StableLmConfig
from .fast import optimize_for_inference
from .heads import StableLmForCausalLM

SHAPES: dict[str, dict[str, Any]] = {
    "3b": {},  # stablelm-3b-4e1t: the config's defaults
    "1.6b": dict(
        vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, use_qkv_bias=True
    ),
    "160m": dict(
        vocab_size=50304,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
    ),
    "tiny": dict(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def random_model(
    shape: str, dtype: torch.dtype, *, seed: int = 0, device: str = "cpu"
) -> StableLmForCausalLM:
    """A model of `shape` with seeded random weights, built directly in `dtype` (no fp32 copy)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = StableLmForCausalLM(StableLmConfig(**SHAPES[shape]))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decoded token: every distinct parameter once, except an input embedding table
    (only the batch's rows of it are read) unless it is also the LM head."""
    head = model.get_output_embeddings().weight
    skip = {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not head
    }
    params = {id(p): p for p in model.parameters() if id(p) not in skip}
    # quantized layers keep their weights in buffers (stablelm.quantization); rotary tables are not read
    for module in model.modules():
        if hasattr(module, "quant_type"):
            params.update({id(b): b for b in module.buffers(recurse=False)})
    return sum(p.numel() * p.element_size() for p in params.values())


def peak_rss_gb() -> float:
    """Peak resident memory of this process: VmHWM on Linux (ru_maxrss would carry over the parent's peak
    across fork and exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


class _Clock:
    """A streamer that notes when the prompt was handed over and when each new token arrived."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_generate(
    generate: Any, input_ids: torch.Tensor, new_tokens: int, *, repeats: int = 3
) -> dict[str, float]:
    """Prefill and decode tokens/s of `generate(input_ids, streamer=...)`, each the best of `repeats` calls.

    Prefill is the time to the first new token (the prompt's forward and one sampling step); decode is
    the rest, over the remaining new tokens of every row. The best of several calls is the figure least
    disturbed by other work on the machine.
    """
    batch, prompt = input_ids.shape
    prefill, decode = 0.0, 0.0
    for _ in range(repeats):
        clock = _Clock()
        start = time.perf_counter()
        generate(input_ids, streamer=clock)
        end = time.perf_counter()
        first = clock.times[1]  # times[0]: the prompt was handed over
        prefill = max(prefill, batch * prompt / (first - start))
        decode = max(decode, batch * (new_tokens - 1) / (end - first))
    return {"prefill_tok_s": prefill, "decode_tok_s": decode}


def load_model(name_or_path: str, dtype: str | None, *, device: str = "cpu") -> StableLmForCausalLM:
    """A checkpoint to time, in `dtype` (None: the checkpoint's own), not yet optimized."""
    return StableLmForCausalLM.from_pretrained(
        name_or_path, dtype=dtype or "auto", device=device, optimize=False
    ).eval()


def prepare(
    *,
    shape: str | None = None,
    dtype: str | None = None,
    batch: int,
    prompt: int,
    new_tokens: int,
    compile: bool = False,
    optimize: bool = True,
    fp32_cache: bool = False,
    device: str = "cpu",
    model: str | None = None,
    quantize: str | None = None,
    adapter: str | None = None,
) -> tuple[Callable[..., torch.Tensor], torch.Tensor, dict[str, Any]]:
    """Build the model (random weights of `shape`, or the checkpoint `model`), optimised for inference
    unless asked not to, and warm up (compiling if asked). `adapter`, a peft LoRA adapter folder, is merged
    into the checkpoint's weights first (before quantizing).

    Returns `generate(input_ids, streamer=None)`, the prompt's ids, and what describes the run.
    """
    if model is not None:
        source, model = model, load_model(model, dtype, device=device)
        dtype = str(model.dtype).removeprefix("torch.")
        if adapter is not None:
            from .training.lora import apply_adapter

            model = apply_adapter(model, adapter)
    else:
        shape, dtype = shape or "160m", dtype or "bfloat16"
        source, model = shape, random_model(shape, DTYPES[dtype], device=device)
    if quantize is not None:  # weight-only int8 / int4 (stablelm.quantization)
        from .quantization import quantize as quantize_model

        quantize_model(model, quantize)
    nbytes = weight_bytes(model)
    optimize_for_inference(model, kernels=optimize, fp32_cache=fp32_cache)
    ids = torch.randint(
        0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1)
    )
    ids = ids.to(device)

    def generate(input_ids: torch.Tensor, streamer: Any = None, new: int = new_tokens) -> torch.Tensor:
        return model.generate(
            input_ids,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            streamer=streamer,
            compile=compile,
        )

    start = time.perf_counter()
    generate(ids, new=4)  # warm-up: kernels, page faults, compilation (same cache-length bucket)
    info = {
        "impl": "stablelm"
        + (" optimized" if optimize else " plain")
        + (" fp32-cache" if fp32_cache else "")
        + (" compiled" if compile else ""),
        "shape": source,
        "dtype": dtype,
        "batch": batch,
        "prompt": prompt,
        "new_tokens": new_tokens,
        "warmup_s": time.perf_counter() - start,
        "weights_gb": nbytes / 1e9,
        "threads": torch.get_num_threads(),
    }
    return generate, ids, info


def run(**kwargs: Any) -> dict[str, Any]:
    """`prepare(**kwargs)`, then time generations (best of 3): every figure of one run."""
    generate, ids, info = prepare(**kwargs)
    result = time_generate(generate, ids, info["new_tokens"])
    return {
        **info,
        **result,
        "decode_weight_gb_s": info["weights_gb"] * result["decode_tok_s"] / info["batch"],
        "peak_rss_gb": peak_rss_gb(),
    }


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    """`run` with the options of `stablelm bench` (see `stablelm.cli.bench.add_arguments`)."""
    return run(
        shape=args.shape,
        dtype=args.dtype,
        batch=args.batch,
        prompt=args.prompt,
        new_tokens=args.new_tokens,
        compile=args.compile,
        optimize=not args.no_optimize,
        fp32_cache=args.fp32_cache,
        device=args.device,
        model=args.model,
        quantize=getattr(args, "quantize", None),
        adapter=getattr(args, "adapter", None),
    )


def report(result: dict[str, Any], *, as_json: bool) -> None:
    """Print `run`'s figures: one JSON line, or one figure a line."""
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>20}: {value:.2f}" if isinstance(value, float) else f"{key:>20}: {value}")


def main(argv: list[str] | None = None) -> None:
    """`python -m stablelm.bench`: the options of `stablelm bench` (`stablelm bench --help`)."""
    from .cli import bench as command
    from .cli.options import compile_notice
    from .threads import parse_threads, set_threads

    summary, _, details = (command.__doc__ or "").strip().partition("\n")
    parser = argparse.ArgumentParser(
        prog="python -m stablelm.bench",
        description=summary,
        epilog=details.strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_arguments(parser)
    parser.add_argument(
        "--threads",
        metavar="N|auto",
        help="CPU threads (default: torch's; `stablelm bench` defaults to auto)",
    )
    args = parser.parse_args(argv)
    try:
        threads = parse_threads(args.threads, name="--threads")
    except ValueError as err:
        parser.error(str(err))
    problem = command.check(args)
    if problem:
        parser.error(problem)
    if args.threads is not None:
        set_threads(threads)
    if args.compile:
        compile_notice()
    report(run_args(args), as_json=args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
