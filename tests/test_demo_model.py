"""The bundled demo model (stablelm/assets/demo): complete, small, loadable by the reference, and trained."""

from __future__ import annotations

import math
import pydoc_data.topics
from pathlib import Path

import pytest
import torch
from conftest import transformers

from stablelm import AutoTokenizer, StableLmForCausalLM

DEMO = Path(__file__).resolve().parent.parent / "stablelm" / "assets" / "demo"
FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)
# Reference-manual topics that scripts/demo_corpus.py holds out of training (every 20th document).
HELD_OUT_TOPICS = ("bitwise", "numbers", "typesmapping")


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
