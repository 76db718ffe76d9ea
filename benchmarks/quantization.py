"""Perplexity of the bundled demo model on its held-out documents: bf16 vs int8 vs int4 (weight-only).

    python benchmarks/quantization.py [--model PATH] [--group-size 64] [--json]

The held-out set is the demo corpus's (`scripts/demo_corpus.py`: every 20th document). Each document
is scored on its own (up to the model's context), and the perplexity is exp of the mean negative
log-likelihood over every predicted token. Targets (issue 17): int8 within 0.5% of bf16, int4 within 5%.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def held_out() -> list[str]:
    import demo_corpus

    return demo_corpus.split(demo_corpus.build_corpus())[1]


def perplexity(model: torch.nn.Module, tokenizer, documents: list[str]) -> float:  # noqa: ANN001
    context = model.config.max_position_embeddings
    nll, count = 0.0, 0
    with torch.inference_mode():
        for text in documents:
            ids = tokenizer(text)["input_ids"][:context]
            if len(ids) < 2:
                continue
            x = torch.tensor([ids])
            logits = model(x).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += len(ids) - 1
    return math.exp(nll / count)


def main() -> None:
    from stablelm import demo_model_path
    from stablelm.heads import StableLmForCausalLM
    from stablelm.quantization import QuantizationConfig
    from stablelm.tokenizer import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(demo_model_path()))
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (64, 128, 256)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    docs = held_out()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = {}
    for name, quant in (
        ("bf16", None),
        ("int8", QuantizationConfig("int8")),
        (f"int4 g{args.group_size}", QuantizationConfig("int4", group_size=args.group_size)),
    ):
        model = StableLmForCausalLM.from_pretrained(
            args.model, dtype=torch.bfloat16, quantization_config=quant
        )
        rows[name] = perplexity(model, tokenizer, docs)
    base = rows["bf16"]
    if args.json:
        print(json.dumps({"documents": len(docs), "perplexity": rows}))
        return
    print(f"{len(docs)} held-out documents, model {args.model}")
    print("| weights | perplexity | vs bf16 |\n| --- | ---: | ---: |")
    for name, ppl in rows.items():
        print(f"| {name} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f}% |")


if __name__ == "__main__":
    main()
