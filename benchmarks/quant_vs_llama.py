"""Batch-1 decoding of one checkpoint in bf16, int8 and int4 (the documented path: `from_pretrained(...,
quantization_config=...)` then greedy `generate`), taking turns with llama.cpp's `llama-bench` on GGUF files
of the same weights (bf16, Q8_0, Q4_K_M), in one run; wall time, best of the rounds.

`--modules` also times the quantized models with the planned decode step off (`stablelm.lean_step`), so
the two can be compared; their tokens must equal the planned step's.

Run:
    python benchmarks/quant_vs_llama.py --folder DIR --threads 2 --rounds 2 \
        --llama-bench PATH/llama-bench --gguf bf16=DIR/model-bf16.gguf q8_0=DIR/model-q8_0.gguf \
        q4_k_m=DIR/model-q4_k_m.gguf
(`DIR`: a checkpoint, e.g. written by `benchmarks/documented_path.py --folder DIR`; the GGUF files by
llama.cpp's `convert_hf_to_gguf.py` and `llama-quantize`.)
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from documented_path import llama_bench, reread, timed  # noqa: E402

import stablelm  # noqa: E402
from stablelm.decode import DecodeStep  # noqa: E402
from stablelm.quantization import modes as qmodes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="a bf16 checkpoint folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--modules", action="store_true", help="also the quantized models without the plan")
    parser.add_argument(
        "--int4-modes",
        help="also the int4 model with these kernel modes forced, comma-separated (bits of "
        "stablelm.quantization.modes.int4_mode: 1 AVX512-BF16, 2 VNNI; 0 float32)",
    )
    parser.add_argument("--llama-bench", help="llama.cpp's llama-bench binary")
    parser.add_argument(
        "--llama-args", default="", help="more llama-bench arguments, one string (e.g. '--repack 0')"
    )
    parser.add_argument("--gguf", nargs="*", default=[], help="NAME=FILE pairs, e.g. q8_0=model-q8_0.gguf")
    parser.add_argument(
        "--page-cache",
        choices=["reread", "as-is"],
        default="reread",
        help="drop the weight files from the page cache and read them back first (default; see "
        "documented_path.py), or not",
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1 or args.new_tokens < 2 or args.prompt < 1:
        parser.error("--rounds, --threads and --prompt must be at least 1, --new-tokens at least 2")
    for pair in args.gguf:
        name, _, path = pair.partition("=")
        if not name or not path or not Path(path).is_file():
            parser.error(f"--gguf takes NAME=FILE pairs of existing files; got {pair!r}")
    if args.gguf and not args.llama_bench:
        parser.error("--gguf needs --llama-bench (the llama-bench binary that runs them)")
    try:
        modes = [int(v) for v in args.int4_modes.split(",")] if args.int4_modes else []
        extra = tuple(shlex.split(args.llama_args))
    except ValueError as error:
        parser.error(
            f"--int4-modes takes kernel modes 0-3, comma-separated; --llama-args one quoted string ({error})"
        )
    if any(not 0 <= mode <= 3 for mode in modes):
        parser.error(
            f"--int4-modes takes kernel modes 0-3 (bits: 1 AVX512-BF16, 2 VNNI); got {args.int4_modes!r}"
        )
    torch.set_num_threads(args.threads)
    new = args.new_tokens
    if args.page_cache == "reread":
        reread([*sorted(args.folder.glob("*.safetensors")), *(Path(p.partition("=")[2]) for p in args.gguf)])
    models = {"bf16": stablelm.AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16)}
    for q in ("int8", "int4"):
        models[q] = stablelm.AutoModelForCausalLM.from_pretrained(
            args.folder, dtype=torch.bfloat16, quantization_config={"quant_type": q}
        )
    vocab = models["bf16"].config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    variants = [("bf16", "bf16", True, None), ("int8", "int8", True, None), ("int4", "int4", True, None)]
    if args.modules:
        variants += [("int8 modules", "int8", False, None), ("int4 modules", "int4", False, None)]
    for mode in modes:
        variants.append((f"int4 mode {mode}", "int4", True, mode))

    def run(model: torch.nn.Module, lean: bool, mode: int | None) -> tuple[float, float, torch.Tensor]:
        DecodeStep.for_model(model, compile=False).lean = lean
        qmodes.FORCE_INT4_MODE = mode
        try:
            return timed(
                lambda input_ids, streamer: model.generate(
                    input_ids=input_ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                    streamer=streamer,
                ),
                ids,
            )  # fmt: skip
        finally:
            DecodeStep.for_model(model, compile=False).lean = True
            qmodes.FORCE_INT4_MODE = None

    for _, model, lean, mode in variants:  # warm-up: kernel builds, plans, page faults
        run(models[model], lean, mode)
    ggufs = dict(pair.split("=", 1) for pair in args.gguf)
    best: dict[str, list[float]] = {}
    tokens: dict[str, torch.Tensor] = {}
    for turn in range(args.rounds):
        timings = []
        for name, model, lean, mode in variants:
            prefill, decode, tokens[name] = run(models[model], lean, mode)
            timings.append((name, prefill, decode))
        for name, path in ggufs.items():
            timings.append(
                (
                    f"llama.cpp {name}",
                    *llama_bench(args.llama_bench, path, args.threads, args.prompt, new, extra),
                )
            )
        for name, prefill, decode in timings:
            b = best.setdefault(name, [0.0, 0.0])
            b[0], b[1] = max(b[0], prefill), max(b[1], decode)
            print(f"round {turn} {name}: prefill {prefill:.2f} decode {decode:.2f} tok/s", flush=True)
    print(
        f"\n{args.folder}: batch 1, prompt {args.prompt}, {new} new tokens, {args.threads} thread(s), best of {args.rounds}"
    )
    base = best["bf16"][1]
    for name, (prefill, decode) in best.items():
        print(
            f"  {name:18s} prefill {prefill:7.2f}  decode {decode:6.2f} tok/s  ({decode / base:.2f}x our bf16)"
        )
    for q in ("int8", "int4"):
        if f"{q} modules" in tokens and not torch.equal(tokens[q], tokens[f"{q} modules"]):
            sys.exit(f"{q}: the planned step's tokens differ from the modules'")


if __name__ == "__main__":
    main()
