"""The demo model's chat fine-tune data (scripts/build_demo_chat.py): the chat template, questions about the
Python documentation's topics and objects answered with the first paragraphs of their documents, and the
conversations encoded and packed into rows for training (the loss on the assistant's tokens only).
"""

from __future__ import annotations

import keyword
import random
import re
import sys
from dataclasses import dataclass

import torch

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


@dataclass
class Source:
    """One document seen as something to ask about: its questions and its answer's paragraphs."""

    questions: list[str]
    paragraphs: list[str]


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
