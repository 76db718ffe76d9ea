"""Give the bundled demo model (stablelm/assets/demo) a chat template and a short chat fine-tune.

    python scripts/build_demo_chat.py            # right after scripts/build_demo_model.py
    python scripts/build_demo_chat.py --model FOLDER   # from a copy of the demo model before its fine-tune

1. The corpus: the same Python documentation as the demo model (scripts/demo_corpus.py), with the same
   training / held-out split.
2. The conversations: questions about a reference-manual topic ("What is the "for" statement?", "How does
   slicing work?") or a standard-library object ("What does json.dumps do?"), answered with the first
   paragraphs of its documentation; several phrasings per topic, some follow-ups ("Tell me more."), some
   pairs of questions, sometimes a system message. The held-out documents (4 topics, 244 docstrings) give
   the held-out conversations. Made by scripts/demo_chat_data.py.
3. The fine-tune: the demo weights, trained in float32 on the conversations rendered with CHAT_TEMPLATE (the
   loss on the assistant's tokens and its end of turn only) mixed with plain documentation (the loss on every
   token, so that `stablelm generate` keeps writing documentation); AdamW, warmup then cosine decay.
4. The report: perplexity on the held-out documentation and on the held-out chat answers, before and after,
   and greedy and sampled replies.
5. The export: the package's save_pretrained into a temporary folder, then model.safetensors (bfloat16),
   tokenizer_config.json (with the chat template) and generation_config.json replace the demo's files.
   config.json and tokenizer.json are checked to be unchanged.

Deterministic given --seed and --threads on the same Python build, torch version and CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stablelm import AutoTokenizer, StableLmForCausalLM  # noqa: E402
from stablelm.training import pack, read_documents, tokenize  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from demo_chat_data import CHAT_TEMPLATE, CONTEXT, IGNORE, conversations, encode, pack_examples, sources  # noqa: E402

DEMO = REPO / "stablelm" / "assets" / "demo"
FINETUNE = dict(
    steps=400,
    chat_rows=6,  # per step: 6 rows of 512 tokens of conversations ...
    text_rows=2,  # ... and 2 of plain documentation
    lr=1e-3,
    min_lr=1e-5,
    warmup=20,
    weight_decay=0.1,
    max_grad_norm=1.0,
)
QUESTIONS = ('What is the "if" statement?', "Explain binary bitwise operations.", "What does max do?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "demo-build" / "chat", help="corpus, report")
    parser.add_argument("--model", type=Path, default=DEMO, help="the demo model to start from")
    parser.add_argument("--output", type=Path, default=DEMO)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=FINETUNE["steps"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: the machine is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    corpus = args.work_dir / "corpus"

    _step("corpus")
    subprocess.run([sys.executable, "-I", str(REPO / "scripts" / "demo_corpus.py"), str(corpus)], check=True)
    train_docs = read_documents([corpus / "train.jsonl"])
    held_docs = read_documents([corpus / "eval.jsonl"])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.chat_template is not None:
        raise SystemExit(
            f"{args.model} already has a chat template, so it was fine-tuned already: start from the demo model "
            "as scripts/build_demo_model.py exports it (--model FOLDER)"
        )
    tokenizer.chat_template = CHAT_TEMPLATE
    rng = random.Random(args.seed)
    train_chats = conversations(sources(train_docs, tokenizer), tokenizer, rng)
    held_chats = conversations(sources(held_docs, tokenizer), tokenizer, random.Random(args.seed + 1))
    chat_examples = [encode(tokenizer, chat) for chat in train_chats]
    held_examples = [encode(tokenizer, chat) for chat in held_chats]
    chat_rows = pack_examples(chat_examples, rng)
    text_rows = pack(tokenize(tokenizer, train_docs), CONTEXT)
    held_text = pack(tokenize(tokenizer, held_docs), 256)  # as build_demo_model.py measures it
    report = {
        "conversations": len(train_chats),
        "multi_turn": sum(sum(m["role"] == "user" for m in chat) > 1 for chat in train_chats),
        "with_system": sum(chat[0]["role"] == "system" for chat in train_chats),
        "chat_tokens": sum(len(ids) for ids, _ in chat_examples),
        "assistant_tokens": sum(sum(label != IGNORE for label in labels) for _, labels in chat_examples),
        "longest_conversation": max(len(ids) for ids, _ in chat_examples),
        "chat_rows": len(chat_rows),
        "held_out_conversations": len(held_chats),
    }
    print(json.dumps(report, indent=2), file=sys.stderr)
    (args.work_dir / "conversations.jsonl").write_text(
        "".join(json.dumps(chat) + "\n" for chat in train_chats + held_chats), encoding="utf-8"
    )

    _step("before")
    model = StableLmForCausalLM.from_pretrained(args.model, dtype=torch.float32, optimize=False)
    report["before"] = measure(model, held_text, held_examples)
    print(json.dumps(report["before"]), file=sys.stderr)

    _step("fine-tune")
    start = time.perf_counter()
    finetune(model, chat_rows, text_rows, steps=args.steps, seed=args.seed)
    report["steps"] = args.steps
    report["fine_tune_minutes"] = round((time.perf_counter() - start) / 60, 1)

    _step("after")
    report["after"] = measure(model, held_text, held_examples)
    print(json.dumps(report["after"]), file=sys.stderr)
    export(model, tokenizer, args.model, args.output)
    report["samples"] = samples(args.output)
    (args.work_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def _step(name: str) -> None:
    print(f"\n== {name} ==", file=sys.stderr, flush=True)


# ---- training and measuring --------------------------------------------------------------------------------
def finetune(model, chat_rows: torch.Tensor, text_rows: torch.Tensor, *, steps: int, seed: int) -> None:
    """AdamW on the masked loss (float32), batches of FINETUNE's chat and text rows, warmup then cosine."""
    torch.manual_seed(seed)
    settings = FINETUNE
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for name, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings["lr"],
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(seed)
    chat_order = _epochs(len(chat_rows), generator)
    text_order = _epochs(len(text_rows), generator)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps)
        chat = chat_rows[[next(chat_order) for _ in range(settings["chat_rows"])]]
        text = text_rows[[next(text_order) for _ in range(settings["text_rows"])]]
        ids = torch.cat([chat[:, 0], text])
        labels = torch.cat([chat[:, 1], text])
        loss = masked_loss(model(ids).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["max_grad_norm"])
        optimizer.step()
        if step % 25 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            print(
                f"step {step:4d}  loss {loss.item():.4f}  {elapsed / 60:.1f} min", file=sys.stderr, flush=True
            )
    model.eval()


def _epochs(count: int, generator: torch.Generator):
    """Indices 0..count-1, reshuffled every pass."""
    while True:
        yield from torch.randperm(count, generator=generator).tolist()


def _learning_rate(step: int, steps: int) -> float:
    lr, min_lr, warmup = FINETUNE["lr"], FINETUNE["min_lr"], FINETUNE["warmup"]
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def masked_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting each token from those before it, over the labels not IGNORE."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


@torch.no_grad()
def measure(model, held_text: torch.Tensor, held_examples: list[tuple[list[int], list[int]]]) -> dict:
    """Perplexity of the held-out documentation (blocks of 256) and of the held-out chat answers."""
    model.eval()
    total = sum(model(batch, labels=batch).loss.item() * len(batch) for batch in held_text.split(32))
    text_loss = total / len(held_text)
    nll, count = 0.0, 0
    for ids, labels in held_examples:
        ids_tensor, labels_tensor = torch.tensor([ids]), torch.tensor([labels])
        n = int((labels_tensor[:, 1:] != IGNORE).sum())
        nll += masked_loss(model(ids_tensor).logits, labels_tensor).item() * n
        count += n
    chat_loss = nll / count
    return {
        "held_out_text_perplexity": round(math.exp(text_loss), 2),
        "held_out_chat_answer_perplexity": round(math.exp(chat_loss), 2),
        "held_out_chat_answer_tokens": count,
    }


# ---- export ------------------------------------------------------------------------------------------------
def export(model, tokenizer, source: Path, output: Path) -> None:
    """Save with the package into a temporary folder; replace the weights, tokenizer_config.json and
    generation_config.json of `output`, after checking that the architecture and vocabulary are unchanged."""
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as folder:
        saved = Path(folder)
        model.to(torch.bfloat16).save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        for name in ("config.json", "tokenizer.json"):
            if _json(saved / name) != _json(source / name):
                raise RuntimeError(f"{name} changed in the fine-tune; it should not")
        generation = _json(saved / "generation_config.json")
        if generation.get("eos_token_id") != tokenizer.eos_token_id:
            raise RuntimeError("generation_config.json must stop at the end of turn (the eos token)")
        for name in ("model.safetensors", "tokenizer_config.json", "generation_config.json"):
            shutil.copyfile(saved / name, output / name)
        if source.resolve() != output.resolve():
            for name in ("config.json", "tokenizer.json"):
                shutil.copyfile(source / name, output / name)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@torch.no_grad()
def samples(folder: Path) -> dict:
    """Greedy and sampled replies of the exported model to QUESTIONS (about held-out documents)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = StableLmForCausalLM.from_pretrained(folder)
    replies = {}
    for question in QUESTIONS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=False,
        )
        room = CONTEXT - ids.shape[1]
        greedy = model.generate(ids, max_new_tokens=room, do_sample=False)
        torch.manual_seed(0)
        sampled = model.generate(ids, max_new_tokens=room)  # generation_config.json's sampling
        replies[question] = {
            "greedy": tokenizer.decode(greedy[0, ids.shape[1] :]),
            "sampled": tokenizer.decode(sampled[0, ids.shape[1] :]),
        }
    return replies


if __name__ == "__main__":
    sys.exit(main())
