"""Speculative decoding on the bundled demo model: plain greedy against prompt lookup and an assistant.

Greedy, one thread (`torch.set_num_threads(1)`: the machine is shared), the demo model as `stablelm
generate` loads it (bfloat16, `optimize_for_inference`). Each task runs every method in turns, one timed
generation each, for `--rounds` rounds (the machine's speed drifts; turns expose all methods to the same
drift); each figure is the best of its rounds, each ratio against plain greedy's best. Every method's
text must equal plain greedy's token for token (the script stops otherwise). Reported: new tokens/s, the
ratio to plain greedy, the share of draft tokens kept, and new tokens per forward pass of the model.

Methods:
- plain: `generate` token by token.
- lookup: `prompt_lookup_num_tokens=--lookup` (drafts copied from earlier in the prompt and text).
- assistant: `assistant_model=` a truncated copy of the demo model (its first `--draft-layers` decoder
  layers, final norm and head: no training), drafting with the reference's defaults (20 tokens, confidence
  threshold 0.4).
- oracle: drafts of `--lookup` tokens that are plain greedy's own continuation: what prompt lookup gets
  when the output repeats the input word for word. An upper bound of the check itself (forward pass, rollback,
  bookkeeping), not a method.

Tasks (input-grounded: the output is meant to repeat text of the prompt):
- docstring: a docstring, the end of the document, then its header again (the demo model was trained on
  such documents): continue the document.
- repeated: the docstring twice, then its first words again.

Run:  python benchmarks/speculative.py [--rounds 3] [--new-tokens 128] [--lookup 10] [--draft-layers 2]

`--model DIR` runs another checkpoint (bfloat16; its tokenizer beside it) instead of the demo model, e.g.
random weights of stablelm-3b-4e1t's shape written by `benchmarks/documented_path.py --shape 3b --folder
DIR`, with `--methods plain oracle` to see what a check costs on a model whose steps are bound by reading
its weights; `--threads N` sets torch's threads (default 1); `--quantize int8|int4` quantizes the model's weights (the check
then runs the quantized kernels, each row with the one-row kernel's bits).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import stablelm
from stablelm import AutoTokenizer, StableLmForCausalLM
from stablelm.fast import optimize_for_inference
from stablelm.generation import generate, resolve_config
from stablelm.generation.drafts import AssistantDraft, PromptLookup
from stablelm.generation.speculative import Draft, Drafter

# textwrap.dedent's docstring (CPython 3.11), as the demo model's corpus heads a document.
DOCSTRING = """textwrap.dedent(text)

Remove any common leading whitespace from every line in `text`.

This can be used to make triple-quoted strings line up with the left
edge of the display, while still presenting them in the source code
in indented form.

Note that tabs and spaces are both treated as whitespace, but they
are not equal: the lines "  hello" and "\\thello" are
considered to have no common leading whitespace.

Entirely blank lines are normalized to a newline character."""
TASKS = {
    "docstring": DOCSTRING + "<|endoftext|>" + DOCSTRING.split("\n")[0] + "\n\n",
    "repeated": DOCSTRING + "\n\n" + DOCSTRING + "\n\n" + DOCSTRING[:40],
}


METHODS = ("plain", "lookup", "assistant", "oracle")


class Oracle(Drafter):
    """Drafts `size` tokens of a known continuation (plain greedy's): every draft token is kept."""

    def __init__(self, truth: list[int], prompt_length: int, size: int) -> None:
        super().__init__()
        self.truth, self.prompt_length, self.size = truth, prompt_length, size

    def propose(self, seq: Any, limit: int, plan: Any, generator: Any) -> Draft:
        done = seq.length - self.prompt_length
        tokens = self.truth[done : done + min(self.size, limit)]
        return Draft(torch.tensor(tokens, dtype=torch.long), None)


def truncated(model: StableLmForCausalLM, layers: int) -> StableLmForCausalLM:
    """The first `layers` decoder layers of `model`, its final norm and head, sharing no memory with it."""
    config = type(model.config)(**{**model.config.to_dict(), "num_hidden_layers": layers})
    small = StableLmForCausalLM(config).to(model.dtype)
    wanted = small.state_dict().keys()
    small.load_state_dict({k: v.clone() for k, v in model.state_dict().items() if k in wanted}, strict=True)
    return optimize_for_inference(small)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    path = args.model or stablelm.demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = optimize_for_inference(StableLmForCausalLM.from_pretrained(path, dtype=torch.bfloat16))
    assistant = truncated(model, args.draft_layers) if "assistant" in args.methods else None
    if args.quantize:  # the model's weights int8 / int4 (the assistant keeps bfloat16 ones)
        model = stablelm.quantize(model, args.quantize)
    config = resolve_config(model, None, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)
    name = "demo model" if args.model is None else str(args.model)
    name += f" ({args.quantize})" if args.quantize else ""
    results: dict[str, Any] = {"model": name, "threads": args.threads, "dtype": str(model.dtype), "tasks": {}}
    for task, prompt in TASKS.items():
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        plain = generate(model, ids, config=config)  # warm-up, and the tokens every method must give
        truth = plain[0, ids.shape[1] :].tolist()
        drafters = {
            "plain": lambda: None,
            "lookup": lambda: PromptLookup(num_tokens=args.lookup),
            "assistant": lambda: AssistantDraft(assistant),
            "oracle": lambda truth=truth, length=ids.shape[1]: Oracle(truth, length, args.lookup),
        }
        drafters = {name: make for name, make in drafters.items() if name in args.methods}
        best: dict[str, float] = {}  # plain first: the ratios are against it
        stats: dict[str, Any] = {}
        for _ in range(args.rounds):
            for name, make in drafters.items():
                draft = make()
                start = time.perf_counter()
                out = generate(model, ids, config=config, draft=draft)
                seconds = time.perf_counter() - start
                if out.tolist() != plain.tolist():
                    raise SystemExit(f"{task}/{name}: the text differs from plain greedy's")
                best[name] = min(best.get(name, float("inf")), seconds)
                stats[name] = draft.stats if draft is not None else None
        rows = {}
        for name, seconds in best.items():
            s = stats[name]
            rows[name] = {
                "tokens_per_s": args.new_tokens / seconds,
                "x_plain": best["plain"] / seconds,
                "kept": None if s is None else s.acceptance,
                "tokens_per_pass": 1.0 if s is None else s.tokens / s.passes,
            }
        results["tasks"][task] = {"prompt_tokens": ids.shape[1], "identical": True, "methods": rows}
    return results


def report(results: dict[str, Any]) -> None:
    print(
        f"{results['model']}, {results['dtype']}, {results['threads']} thread(s), greedy; best of rounds; "
        "every text identical"
    )
    print(f"{'task':<10} {'method':<10} {'tokens/s':>9} {'x plain':>8} {'kept':>6} {'tokens/pass':>12}")
    for task, data in results["tasks"].items():
        for name, row in data["methods"].items():
            kept = "-" if row["kept"] is None else f"{row['kept']:.0%}"
            print(
                f"{task:<10} {name:<10} {row['tokens_per_s']:>9.1f} {row['x_plain']:>8.2f} {kept:>6} "
                f"{row['tokens_per_pass']:>12.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens (and oracle drafts)")
    parser.add_argument("--draft-layers", type=int, default=2, help="decoder layers of the assistant")
    parser.add_argument("--model", type=Path, help="a checkpoint folder (default: the demo model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quantize", choices=["int8", "int4"], help="the model's weights quantized so")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="plain always runs (the baseline)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, not {args.threads}")
    if args.model is not None and not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (a checkpoint folder, tokenizer beside it)")
    args.methods = ["plain", *(m for m in args.methods if m != "plain")]
    results = run(args)
    print(json.dumps(results, indent=2)) if args.json else report(results)


if __name__ == "__main__":
    main()
