"""The bundled demo model (stablelm/assets/demo): complete, small, loadable by the reference, trained, and able
to chat: its template renders conversations in stablelm-zephyr-3b's format and its replies end at the end of
turn."""

from __future__ import annotations

import math
import os
import pydoc_data.topics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import transformers

from stablelm import AutoTokenizer, StableLmForCausalLM
from stablelm.tokenizer.chat_template import ChatTemplateError

DEMO = Path(__file__).resolve().parent.parent / "stablelm" / "assets" / "demo"
FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)
# Reference-manual topics that scripts/demo_corpus.py holds out of training (every 20th document; "else" is
# the same text as "if"), and so out of the chat fine-tune's conversations too.
HELD_OUT_TOPICS = ("bitwise", "if", "numeric-types", "typesmethods")
CONVERSATION = [
    {"role": "system", "content": "You answer questions about Python."},
    {"role": "user", "content": 'What is the "for" statement?'},
    {"role": "assistant", "content": "It iterates over the elements of a sequence."},
    {"role": "user", "content": "Tell me more."},
]
# stablelm-zephyr-3b's format, with the demo's end-of-text token ending each turn.
RENDERED = (
    "<|system|>\nYou answer questions about Python.<|endoftext|>\n"
    '<|user|>\nWhat is the "for" statement?<|endoftext|>\n'
    "<|assistant|>\nIt iterates over the elements of a sequence.<|endoftext|>\n"
    "<|user|>\nTell me more.<|endoftext|>\n"
)


@pytest.fixture(scope="module")
def demo():
    return StableLmForCausalLM.from_pretrained(DEMO), AutoTokenizer.from_pretrained(DEMO)


def test_the_bundle_is_complete_and_small():
    assert all((DEMO / name).is_file() for name in FILES)
    assert sum(path.stat().st_size for path in DEMO.iterdir()) <= 20 * 10**6


def test_it_loads_here_and_in_the_reference_alike(demo):
    model, tokenizer = demo
    assert 2e6 < model.num_parameters() < 10e6
    assert len(tokenizer) == model.config.vocab_size
    reference = transformers.AutoModelForCausalLM.from_pretrained(DEMO).eval()
    text = 'The "while" statement is used for repeated execution as long as an expression is true'
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert (
        ids.tolist()
        == transformers.AutoTokenizer.from_pretrained(DEMO)(text, return_tensors="pt")["input_ids"].tolist()
    )
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("topic", HELD_OUT_TOPICS)
def test_held_out_documentation_is_predicted_far_better_than_by_token_frequencies(demo, topic):
    model, tokenizer = demo
    ids = tokenizer(pydoc_data.topics.topics[topic], return_tensors="pt")["input_ids"][:, :512]
    with torch.no_grad():
        perplexity = math.exp(model(ids, labels=ids).loss.item())
    assert perplexity < 100  # a unigram model of the training tokens: ~700


def test_greedy_text_is_english_about_python(demo):
    model, tokenizer = demo
    ids = tokenizer('The "for" statement', return_tensors="pt")["input_ids"]
    text = tokenizer.decode(model.generate(ids, max_new_tokens=48, do_sample=False)[0, ids.shape[1] :])
    words = text.split()
    assert len(words) >= 20
    assert (
        sum(word.strip('".,:*()').lower() in {"the", "is", "a", "of", "in", "and", "if"} for word in words)
        >= 5
    )
    assert text.isascii()


def test_the_chat_template_renders_a_conversation_as_stablelm_zephyr_does(demo):
    _, tokenizer = demo
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == RENDERED
    prompt = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert prompt == RENDERED + "<|assistant|>\n"
    reference = transformers.AutoTokenizer.from_pretrained(DEMO)
    assert reference.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == prompt
    ids = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=False)
    assert ids.count(0) == 4 and tokenizer.decode(ids) == prompt  # one end-of-text token per turn


def test_the_chat_template_refuses_roles_it_does_not_know(demo):
    _, tokenizer = demo
    with pytest.raises(ChatTemplateError, match="not tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)


def test_generation_stops_at_the_end_of_a_turn(demo):
    model, tokenizer = demo
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", 0)
    assert model.generation_config.eos_token_id == 0


# Held-out documents' questions; most greedy replies end (28 of 30 held-out questions in the README's
# measure): "Explain binary bitwise operations." is one that runs to the end of the context.
@pytest.mark.parametrize(
    "question", ['What is the "if" statement?', "What are methods?", "What does sys.setrecursionlimit do?"]
)
def test_a_reply_to_a_held_out_question_ends_at_the_end_of_turn(demo, question):
    model, tokenizer = demo
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=False,
    )
    room = model.config.max_position_embeddings - ids.shape[1]
    out = model.generate(ids, max_new_tokens=room, do_sample=False)[0, ids.shape[1] :]
    assert out[-1] == tokenizer.eos_token_id and len(out) < room  # ended by the model, within the context
    reply = tokenizer.decode(out, skip_special_tokens=True)
    # Words, no chat markup, no broken bytes (the documentation itself has a few non-ASCII quotes).
    assert len(reply.split()) >= 5 and "<|" not in reply and "\ufffd" not in reply


def test_stablelm_chat_answers_with_the_demo_model_by_default():
    result = subprocess.run(
        [Path(sys.executable).with_name("stablelm"), "chat", "--temperature", "0"],
        input='What is the "while" statement?\n',
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) >= 5 and "<|" not in result.stdout
