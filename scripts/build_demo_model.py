"""Rebuild the bundled demo model (stablelm/assets/demo) from scratch, with the package's own commands.

    python scripts/build_demo_model.py

1. The corpus: the Python documentation of the running interpreter (scripts/demo_corpus.py), 5% of the
   documents held out.
2. `stablelm train-tokenizer`: a 4,096-token byte-level BPE vocabulary learned on the training documents.
3. `stablelm train`: a small StableLM from DEMO_CONFIG, trained from random weights with TRAIN_FLAGS.
4. The report: held-out perplexity against a unigram baseline, greedy samples, load + generate time.
5. The export: config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
   generation_config.json into stablelm/assets/demo.
6. Then `python scripts/build_demo_chat.py` gives the exported model its chat template and a short chat
   fine-tune (the export above writes a tokenizer_config.json without a template).

Deterministic given --seed on the same Python build, torch version and CPU (threads and vector units decide
the order of floating-point sums). Interrupted? Run the same command again: training resumes from its last
checkpoint in --work-dir and ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stablelm import AutoTokenizer, StableLmForCausalLM  # noqa: E402
from stablelm.cli import main as stablelm  # noqa: E402
from stablelm.training import pack, read_documents, tokenize  # noqa: E402

VOCAB_SIZE = 4096
CONTEXT = 512
DEMO_CONFIG = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=CONTEXT,
    partial_rotary_factor=0.25,
    rope_theta=10_000.0,
    qk_layernorm=False,
    use_parallel_residual=False,
    tie_word_embeddings=True,
    hidden_dropout=0.1,  # the corpus is small and read ~10 times: dropout keeps the model from memorising it
)
TRAIN_FLAGS = dict(
    block_size=256,
    batch_size=16,
    grad_accum=1,
    max_steps=1300,  # ~5.3M tokens, ~10 passes over the corpus: ~20 minutes on 2 CPU cores
    lr=2e-3,
    min_lr=1e-4,
    warmup_steps=100,
    weight_decay=0.1,
    max_grad_norm=1.0,
    eval_interval=100,
    save_interval=100,
    log_interval=25,
    precision="bf16",  # autocast: 1.4x faster than fp32 on an AVX512-BF16 CPU; weights stay fp32
    save_dtype="bfloat16",
)
GENERATION_CONFIG = dict(
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
    do_sample=True,
    temperature=0.7,
    top_k=40,
    repetition_penalty=1.1,
    max_new_tokens=64,
)
EXPORTED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
PROMPTS = ('The "for" statement', "The dictionary", "Return a new list", "class Counter")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--work-dir", type=Path, default=REPO / "demo-build", help="corpus, tokenizer, checkpoints"
    )
    parser.add_argument("--output", type=Path, default=REPO / "stablelm" / "assets" / "demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=TRAIN_FLAGS["max_steps"])
    args = parser.parse_args()
    work = args.work_dir
    corpus, tokenizer_dir, run_dir = work / "corpus", work / "tokenizer", work / "run"

    _step("corpus")
    # A fresh, isolated interpreter, so that nothing imported here changes the standard library it reads.
    subprocess.run([sys.executable, "-I", str(REPO / "scripts" / "demo_corpus.py"), str(corpus)], check=True)
    _step("tokenizer")
    _run(
        "train-tokenizer",
        data=corpus / "train.jsonl",
        vocab_size=VOCAB_SIZE,
        model_max_length=CONTEXT,
        output_dir=tokenizer_dir,
    )
    _step("training")
    (work / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=2) + "\n")
    start = time.perf_counter()
    flags = {**TRAIN_FLAGS, "max_steps": args.max_steps, "seed": args.seed}
    _run(
        "train",
        "--resume",
        config=work / "config.json",
        tokenizer=tokenizer_dir,
        data=corpus / "train.jsonl",
        eval_data=corpus / "eval.jsonl",
        output_dir=run_dir,
        **flags,
    )
    minutes = (time.perf_counter() - start) / 60
    _step("report")
    report = evaluate(run_dir, corpus, block_size=TRAIN_FLAGS["block_size"])
    report["training_minutes_this_run"] = round(minutes, 1)
    export(run_dir, args.output)
    report |= timing_and_samples(args.output)
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def _step(name: str) -> None:
    print(f"\n== {name} ==", file=sys.stderr, flush=True)


def _run(command: str, *switches: str, **flags: object) -> None:
    """Run `stablelm COMMAND --flag value ...` in this process; stop on failure."""
    argv = [command, *switches]
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    print("$ stablelm " + " ".join(argv), file=sys.stderr, flush=True)
    status = stablelm(argv)
    if status != 0:
        raise SystemExit(f"stablelm {command} failed with status {status}")


@torch.no_grad()
def evaluate(run_dir: Path, corpus: Path, *, block_size: int) -> dict:
    """The held-out loss and perplexity of the trained model and of a unigram model, on the same tokens."""
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = StableLmForCausalLM.from_pretrained(run_dir, dtype=torch.float32)
    train = tokenize(tokenizer, read_documents([corpus / "train.jsonl"]))
    held = pack(tokenize(tokenizer, read_documents([corpus / "eval.jsonl"])), block_size)
    total = sum(model(batch, labels=batch).loss.item() * len(batch) for batch in held.split(32))
    loss = total / len(held)
    # Unigram: each token's training frequency (add-one smoothed), scored on the tokens the model predicts.
    counts = torch.bincount(train, minlength=len(tokenizer)).double() + 1
    log_p = (counts / counts.sum()).log()
    unigram = -log_p[held[:, 1:]].mean().item()
    return {
        "parameters": model.num_parameters(),
        "training_tokens": train.numel(),
        "held_out_tokens": held[:, 1:].numel(),
        "held_out_loss": round(loss, 4),
        "held_out_perplexity": round(math.exp(loss), 2),
        "unigram_loss": round(unigram, 4),
        "unigram_perplexity": round(math.exp(unigram), 2),
    }


def export(run_dir: Path, output: Path) -> None:
    """The files the CLI loads, and a generation_config.json with the demo's sampling defaults."""
    output.mkdir(parents=True, exist_ok=True)
    for name in EXPORTED:
        shutil.copyfile(run_dir / name, output / name)
    (output / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")


@torch.no_grad()
def timing_and_samples(folder: Path) -> dict:
    """Seconds to load the exported model and generate 64 tokens, and greedy continuations of PROMPTS."""
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = StableLmForCausalLM.from_pretrained(folder)
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    seconds = time.perf_counter() - start
    samples = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=64, do_sample=False, repetition_penalty=1.0)
        samples[prompt] = tokenizer.decode(out[0], skip_special_tokens=True)
    size = sum(path.stat().st_size for path in folder.iterdir())
    return {
        "load_and_generate_64_seconds": round(seconds, 2),
        "bundle_bytes": size,
        "greedy_samples": samples,
    }


if __name__ == "__main__":
    sys.exit(main())
