"""Beam search against the reference's, on the same random weights: sequences, scores, beam indices."""

from __future__ import annotations

import pytest
import torch
from test_generation import CONFIGS, _left_padded, _prompts, peaked_pair

from stablelm import set_seed


def _eos_in_beams(ref, ids, mask, **kw):
    """A token that the reference's beams produce midway, used as EOS so that beams finish early."""
    out = ref.generate(
        ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None, pad_token_id=0, num_beams=3, **kw
    )
    return int(out[0, ids.shape[1] + 2])


BEAMS = {
    "plain": dict(num_beams=3),
    "four-two-returned": dict(num_beams=4, num_return_sequences=2),
    "length-penalty-short": dict(num_beams=3, length_penalty=-1.0),
    "length-penalty-long": dict(num_beams=3, length_penalty=2.0, num_return_sequences=3),
    "early-stopping": dict(num_beams=3, early_stopping=True),
    "never": dict(num_beams=3, early_stopping="never", length_penalty=1.5),
    "never-negative": dict(num_beams=2, early_stopping="never", length_penalty=-0.5),
}


@pytest.mark.parametrize("setting", BEAMS)
@pytest.mark.parametrize("eos", ["reached", "none"])
def test_beam_search_matches_reference(setting, eos):
    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids, mask = _left_padded([6, 4])
    kw = dict(max_new_tokens=10, pad_token_id=0, **BEAMS[setting])
    kw["eos_token_id"] = _eos_in_beams(ref, ids, mask) if eos == "reached" else None
    a = ours.generate(ids, attention_mask=mask, **kw)
    b = ref.generate(ids, attention_mask=mask, **kw)
    assert a.tolist() == b.tolist()
    assert a.shape[0] == 2 * kw.get("num_return_sequences", 1)
    if eos == "reached" and BEAMS[setting].get("length_penalty", 1.0) <= 1.0:  # long beams may win else
        assert kw["eos_token_id"] in a[:, ids.shape[1] :].flatten().tolist()


def test_beam_search_finds_a_different_continuation_than_greedy():
    """Guards the parity tests above: they would pass with greedy decoding if beams were ignored."""
    ours, _ = peaked_pair(**CONFIGS["gqa"])
    ids = _prompts(4, 5, seed=3)
    greedy = ours.generate(ids, max_new_tokens=10, eos_token_id=None)
    beams = ours.generate(ids, max_new_tokens=10, eos_token_id=None, num_beams=4)
    assert greedy.tolist() != beams.tolist()


@pytest.mark.parametrize("name", ["mha", "qkln-parallel"])
def test_beam_outputs_match_reference_tensor_for_tensor(name):
    ours, ref = peaked_pair(**CONFIGS[name])
    ids = _prompts(2, 5, seed=1)
    eos = _eos_in_beams(ref, ids, None)
    kw = dict(
        max_new_tokens=8,
        num_beams=3,
        num_return_sequences=2,
        eos_token_id=eos,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    a, b = ours.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.sequences_scores, b.sequences_scores)
    assert torch.equal(a.beam_indices, b.beam_indices.to(a.beam_indices.dtype))
    assert len(a.scores) == len(b.scores) == len(a.logits) == len(b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))
    # the cache's rows follow the running beams, as the reference's do
    n = a.cache.get_seq_length()
    assert n == b.cache.get_seq_length()
    for i, layer in enumerate(b.cache.layers):
        assert torch.equal(a.cache.keys[i][:, :, :n], layer.keys)
        assert torch.equal(a.cache.values[i][:, :, :n], layer.values)
    assert a.past_key_values is a.cache
    # without output_scores, no sequences_scores (as the reference)
    c = ours.generate(ids, max_new_tokens=4, num_beams=2, return_dict_in_generate=True)
    assert c.sequences_scores is None and c.scores is None and c.beam_indices is not None


@pytest.mark.parametrize("cache", ["dynamic", "no-cache"])
def test_beam_search_with_other_caches_gives_the_same_beams(cache):
    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids, mask = _left_padded([5, 3])
    kw = dict(max_new_tokens=8, num_beams=3, eos_token_id=None, pad_token_id=0)
    extra = dict(cache_implementation="dynamic") if cache == "dynamic" else dict(use_cache=False)
    expected = ref.generate(ids, attention_mask=mask, **kw)
    assert ours.generate(ids, attention_mask=mask, **kw, **extra).tolist() == expected.tolist()


@pytest.mark.parametrize("sampling", [dict(), dict(top_k=20, temperature=0.8)])
def test_beam_sampling_with_set_seed_matches_reference(sampling):
    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids = _prompts(2, 4, seed=2)
    kw = dict(max_new_tokens=8, num_beams=3, do_sample=True, eos_token_id=None, pad_token_id=0, **sampling)
    for seed in (0, 1):
        set_seed(seed)
        a = ours.generate(ids, **kw)
        set_seed(seed)
        b = ref.generate(ids, **kw)
        assert a.tolist() == b.tolist()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences \(3\) must be at most num_beams"),
        (dict(num_beams=0), "num_beams must be at least 1"),
        (dict(num_return_sequences=2), "num_return_sequences=2 needs do_sample=True or num_beams >= 2"),
        (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
        (dict(num_beams=2, num_beam_groups=2, diversity_penalty=0.5), "num_beam_groups=2 is a setting"),
        (dict(num_beams=2, length_penalty="long"), "length_penalty must be a number"),
        (dict(num_beams=2, stop_strings=["x"]), "stop_strings are not supported with beam search"),
    ],
)
def test_beam_arguments_get_clear_errors(kwargs, message):
    ours, _ = peaked_pair()
    with pytest.raises((ValueError, TypeError), match=message):
        ours.generate(_prompts(1, 4), max_new_tokens=3, **kwargs)


def test_beam_search_refuses_a_streamer():
    ours, _ = peaked_pair()
    ids = _prompts(1, 4)

    class Sink:
        def put(self, value):
            pass

        def end(self):
            pass

    with pytest.raises(ValueError, match="streamer cannot be used with beam search"):
        ours.generate(ids, max_new_tokens=3, num_beams=2, streamer=Sink())
