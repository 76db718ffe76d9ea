"""Give the bundled demo model (stablelm/assets/demo) a chat template and a short chat fine-tune.

    python scripts/build_demo_chat.py            # right after scripts/build_demo_model.py
    python scripts/build_demo_chat.py --model FOLDER   # from a copy of the demo model before its fine-tune

1. The corpus: the same Python documentation as the demo model (scripts/demo_corpus.py), with the same
   training / held-out split.
2. The conversations: questions about a reference-manual topic ("What is the "for" statement?", "How does
   slicing work?") or a standard-library object ("What does json.dumps do?"), answered with the first
   paragraphs of its documentation; several phrasings per topic, some follow-ups ("Tell me more."), some
   pairs of questions, sometimes a system message. The held-out documents (4 topics, 244 docstrings) give
   the held-out conversations.
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
import keyword
import math
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stablelm import AutoTokenizer, StableLmForCausalLM  # noqa: E402
from stablelm.training import pack, read_documents, tokenize  # noqa: E402

DEMO = REPO / "stablelm" / "assets" / "demo"
CONTEXT = 512
IGNORE = -100  # labels the loss skips

# stablelm-zephyr-3b's format: each message is a role header, its text and the end-of-text token; a reply
# ends with that token, where generation stops. Unknown roles are refused.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('The demo model knows the roles system, user and assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant that answers questions about Python.",
    "You answer questions about the Python language and its standard library.",
    "You are an assistant that explains Python, quoting its documentation.",
    "Answer questions about Python.",
)
SYSTEM_RATE = 0.2  # conversations that open with a system message
FOLLOW_UP_RATE = 0.15  # conversations with a "Tell me more." turn
PAIR_RATE = 0.1  # conversations of two unrelated questions
FOLLOW_UPS = ("Tell me more.", "Go on.", "Can you say more?", "What else?", "Continue.", "And then?")
TOPIC_QUESTIONS = (
    "What {be} {subject}?",
    "Explain {subject}.",
    "Tell me about {subject}.",
    "Describe {subject}.",
    "How {do} {subject} work?",
    "What does the documentation say about {subject}?",
)
KEYWORD_QUESTIONS = ('What does the "{key}" keyword do?', "What is {key} in Python?")
# Questions that people ask in their own words, for some topics.
TOPIC_ALIASES = {
    "class": ("How do I define a class?",),
    "comparisons": ("How do comparisons work?",),
    "context-managers": ("What is a context manager?",),
    "debugger": ("How do I use pdb?", "How do I debug a Python program?"),
    "dict": ("How do I write a dictionary?",),
    "exceptions": ("What is an exception?",),
    "for": ("How do I write a for loop?", "How do I loop over a list?"),
    "formatstrings": ("How do format strings work?",),
    "function": ("How do I define a function?",),
    "import": ("How do I import a module?",),
    "integers": ("How do I write an integer?",),
    "lambda": ("What is a lambda?",),
    "lists": ("How do I write a list?",),
    "operator-summary": ("What is the precedence of operators?",),
    "slicings": ("How does slicing work?", "What is a slice?"),
    "specialnames": ("What are special methods?",),
    "string-methods": ("What methods do strings have?",),
    "strings": ("How do I write a string?",),
    "truth": ("Which values are false?",),
    "try": ("How do I handle exceptions?", "How do I catch an exception?"),
    "typesmapping": ("What is a dictionary?", "How do dictionaries work?"),
    "typesseq": ("What is a list?", "What is a tuple?"),
    "while": ("How do I write a while loop?",),
    "with": ("How do I use the with statement?",),
}
FUNCTION_QUESTIONS = (
    "What does {name} do?",
    "Explain {name}.",
    "How do I use {name}?",
    "What is {name} for?",
)
CLASS_QUESTIONS = (
    "What is {name}?",
    "What is the {name} class?",
    "Explain the {name} class.",
    "Describe {name}.",
)
MODULE_QUESTIONS = ("What is the {name} module?", "What does the {name} module do?", "Tell me about {name}.")
OTHER_QUESTIONS = ("What is {name}?", "Explain {name}.", "What does {name} do?")
ANSWER_TOKENS = 192  # an answer's paragraphs stop here (the first is cut at a sentence when it is longer)
MIN_ANSWER_CHARS = 30
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


@dataclass
class Source:
    """One document seen as something to ask about: its questions and its answer's paragraphs."""

    questions: list[str]
    paragraphs: list[str]


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


# ---- conversations ----------------------------------------------------------------------------------------
def sources(documents: list[str], tokenizer) -> list[Source]:
    """Each document with its questions and answer paragraphs; documents with too little text are dropped."""
    modules = _module_names(documents)
    found = []
    for document in documents:
        head, _, body = document.partition("\n")
        if set(body.lstrip("\n").partition("\n")[0]) == {"*"}:  # a topic: a title underlined with *
            questions = _topic_questions(head, document)
            body = body.lstrip("\n").partition("\n")[2]
        else:
            questions = _docstring_questions(head, modules)
        paragraphs = _answer(body, tokenizer)
        if paragraphs:
            found.append(Source(questions, paragraphs))
    return found


def _topic_questions(title: str, document: str) -> list[str]:
    import pydoc_data.topics

    keys = [key for key, text in sorted(pydoc_data.topics.topics.items()) if text.strip() == document]
    plain = title.replace('"', "")
    subjects = {_lower(title), _lower(plain)}
    plural = _plural(plain)
    questions = [
        question.format(subject=subject, be="are" if plural else "is", do="do" if plural else "does")
        for subject in sorted(subjects)
        for question in TOPIC_QUESTIONS
    ]
    for key in keys:
        if keyword.iskeyword(key):
            questions += [question.format(key=key) for question in KEYWORD_QUESTIONS]
        questions += TOPIC_ALIASES.get(key, ())
    return questions


def _lower(title: str) -> str:
    """'The Null Object' -> 'the null object'; 'Python' and acronyms keep their case."""
    return " ".join(
        word.lower() if word.istitle() and word != "Python" else word for word in title.split(" ")
    )


def _plural(title: str) -> bool:
    """Whether a topic's title names several things ('Binary arithmetic operations', 'Lambdas')."""
    head = re.split(r" with | of | —|,| \(", title)[0]
    return " and " in head or (head.endswith("s") and not head.endswith("ss"))


def _docstring_questions(head: str, modules: set[str]) -> list[str]:
    is_class = head.startswith("class ")
    name = head.removeprefix("class ").split("(")[0].removeprefix("builtins.")
    if is_class:
        return [question.format(name=name) for question in CLASS_QUESTIONS]
    if "(" in head:
        return [question.format(name=name) for question in FUNCTION_QUESTIONS]
    if name in modules:
        return [question.format(name=name) for question in MODULE_QUESTIONS]
    return [question.format(name=name) for question in OTHER_QUESTIONS]


def _module_names(documents: list[str]) -> set[str]:
    """Headers without a signature that other documents' names extend: the modules (and packages)."""
    heads = {doc.partition("\n")[0] for doc in documents}
    names = {head.removeprefix("class ").split("(")[0] for head in heads}
    parents = {name.rpartition(".")[0] for name in names}
    return {head for head in heads if "(" not in head and not head.startswith("class ")} & (
        parents | set(sys.stdlib_module_names)
    )


def _answer(body: str, tokenizer) -> list[str]:
    """The body's paragraphs up to the first longer than ANSWER_TOKENS tokens, which is cut at the end of a
    sentence (or of a line) and ends the list."""
    paragraphs = []
    for paragraph in body.strip().split("\n\n"):
        paragraph = paragraph.strip("\n").rstrip()
        if not paragraph.strip():
            continue
        if len(tokenizer(paragraph)["input_ids"]) <= ANSWER_TOKENS:
            paragraphs.append(paragraph)
            continue
        lines = paragraph.split("\n")
        while len(lines) > 1 and len(tokenizer("\n".join(lines))["input_ids"]) > ANSWER_TOKENS:
            lines.pop()
        cut = "\n".join(lines) if len(lines) > 1 else ""
        sentence_end = max(cut.rfind(". "), cut.rfind(".\n"))
        cut = cut[: sentence_end + 1] if sentence_end > len(cut) // 2 else cut
        if cut.strip():
            paragraphs.append(cut)
        break
    if not paragraphs or len(paragraphs[0].strip()) < MIN_ANSWER_CHARS:
        return []
    return paragraphs


def conversations(found: list[Source], tokenizer, rng: random.Random) -> list[list[dict]]:
    """Conversations about the sources: every question of a topic, one random question of a docstring."""
    chats = []
    for source in found:
        many = len(source.questions) > len(FUNCTION_QUESTIONS) + 1  # a topic: ask it every way
        for question in source.questions if many else [rng.choice(source.questions)]:
            chat = []
            if rng.random() < SYSTEM_RATE:
                chat.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            rest = _reply(chat, question, source.paragraphs, tokenizer)
            if rest is None:
                continue
            roll = rng.random()
            if roll < FOLLOW_UP_RATE and rest:
                _reply(chat, rng.choice(FOLLOW_UPS), rest, tokenizer)
            elif roll < FOLLOW_UP_RATE + PAIR_RATE:
                other = rng.choice(found)
                _reply(chat, rng.choice(other.questions), other.paragraphs, tokenizer)
            chats.append(chat)
    rng.shuffle(chats)
    return chats


def _reply(chat: list[dict], question: str, paragraphs: list[str], tokenizer) -> list[str] | None:
    """Add the question and an answer of leading paragraphs that fits the context; the paragraphs left,
    or None (and `chat` unchanged) when not even the first paragraph fits."""
    used = None
    for count in range(1, len(paragraphs) + 1):
        answer = "\n\n".join(paragraphs[:count])
        trial = [*chat, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        length = len(tokenizer.apply_chat_template(trial, return_dict=False))
        if length >= CONTEXT or (count > 1 and len(tokenizer(answer)["input_ids"]) > ANSWER_TOKENS):
            break
        used = count
    if used is None:
        return None
    answer = "\n\n".join(paragraphs[:used])
    chat += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return paragraphs[used:]


def encode(tokenizer, chat: list[dict]) -> tuple[list[int], list[int]]:
    """The conversation's tokens (without the newline after its last end of turn) and its labels: the
    assistant's tokens and end-of-turn token; IGNORE elsewhere."""
    ids = tokenizer.apply_chat_template(chat, return_dict=False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(chat[:i], add_generation_prompt=True, return_dict=False))
        end = (
            len(tokenizer.apply_chat_template(chat[: i + 1], return_dict=False)) - 1
        )  # the "\n" after the end of turn
        if ids[end - 1] != tokenizer.eos_token_id or start >= end - 1:
            raise RuntimeError(f"the template's turns do not tokenize on their own: {chat}")
        labels[start:end] = ids[start:end]
    assert len(ids) <= CONTEXT and labels[-1] == IGNORE, chat
    return ids[:-1], labels[:-1]


def pack_examples(examples: list[tuple[list[int], list[int]]], rng: random.Random) -> torch.Tensor:
    """Rows of CONTEXT tokens holding whole conversations, padded with masked end-of-text tokens: a
    (rows, 2, CONTEXT) tensor of ids and labels."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    rows, ids, labels = [], [], []
    for index in order:
        example_ids, example_labels = examples[index]
        if len(ids) + len(example_ids) > CONTEXT:
            rows.append(_padded(ids, labels))
            ids, labels = [], []
        ids, labels = ids + example_ids, labels + example_labels
    rows.append(_padded(ids, labels))
    return torch.tensor(rows)


def _padded(ids: list[int], labels: list[int]) -> list[list[int]]:
    pad = CONTEXT - len(ids)
    return [ids + [0] * pad, labels + [IGNORE] * pad]


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
