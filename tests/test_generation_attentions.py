"""`generate(..., return_dict_in_generate=True, output_attentions=True)`: each step's attention probabilities
(a tuple over layers of (rows, heads, positions fed, positions attended)), against the reference's eager
attention on the same random weights, for greedy decoding, sampling, beam search, beam sampling and
speculative decoding, with and without a cache."""

from __future__ import annotations

import pytest
import torch
from conftest import make_pair, tiny_config, transformers
from test_generation import _left_padded, _prompts

from stablelm import set_seed
from stablelm.generation import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

OUTPUTS = dict(
    return_dict_in_generate=True,
    output_attentions=True,
    output_hidden_states=True,
    output_scores=True,
    output_logits=True,
)


def attention_pair(**kw):
    """Ours (sdpa: it takes eager attention only for the requests that ask for attentions) and the
    reference on eager attention (the only one that returns them), same weights, the LM head scaled so
    that no two logits are within rounding (see test_generation.peaked_pair)."""
    ours, ref = make_pair(tiny_config(max_position_embeddings=128, num_key_value_heads=2, **kw), attn="eager")
    ours.config.attn_implementation = "sdpa"
    with torch.no_grad():
        ours.lm_head.weight.mul_(8)
        ref.lm_head.weight.mul_(8)
    return ours, ref


def _equal_steps(ours_steps, ref_steps, *, atol=0.0):
    """Per step, per layer: the same shapes, and equal values (bit for bit unless `atol`)."""
    assert isinstance(ours_steps, tuple) and len(ours_steps) == len(ref_steps)
    for a, b in zip(ours_steps, ref_steps, strict=True):
        assert isinstance(a, tuple) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape
            if atol:
                torch.testing.assert_close(x, y, rtol=0, atol=atol)
            else:
                assert torch.equal(x, y)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(
    "setting",
    [
        dict(),
        dict(cache_implementation="dynamic"),
        dict(use_cache=False),
        dict(do_sample=True, top_k=20),
        dict(do_sample=True, num_return_sequences=2, use_cache=False),
    ],
)
def test_greedy_and_sampling_attentions_equal_the_references(setting, padded):
    ours, ref = attention_pair()
    if padded:
        ids, mask = _left_padded([6, 4], seed=3)
    else:
        ids, mask = _prompts(2, 6, seed=3), None
    kw = dict(max_new_tokens=5, eos_token_id=None, pad_token_id=0, attention_mask=mask, **OUTPUTS, **setting)
    set_seed(0)
    a = ours.generate(ids, **kw)
    set_seed(0)
    b = ref.generate(ids, **kw)
    assert isinstance(a, GenerateDecoderOnlyOutput)
    assert torch.equal(a.sequences, b.sequences)
    _equal_steps(a.attentions, b.attentions)
    _equal_steps(a.hidden_states, b.hidden_states)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores, strict=True))
    rows = 2 * setting.get("num_return_sequences", 1)
    cached = setting.get("use_cache", True)
    for step, layers in enumerate(a.attentions):
        assert len(layers) == 2  # one per decoder layer
        fed = 1 if cached and step else 6 + step
        assert layers[0].shape == (rows, 8, fed, 6 + step)
    # The request changes nothing else: the same tokens as the fast path's.
    set_seed(0)
    plain = ours.generate(ids, **{k: v for k, v in kw.items() if k not in OUTPUTS})
    assert torch.equal(plain, a.sequences)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("sample", [False, True])
def test_beam_search_attentions_equal_the_references(use_cache, sample):
    ours, ref = attention_pair()
    ids, mask = _left_padded([6, 5], seed=4)
    kw = dict(
        max_new_tokens=4,
        num_beams=3,
        num_return_sequences=2,
        do_sample=sample,
        use_cache=use_cache,
        eos_token_id=None,
        pad_token_id=0,
        attention_mask=mask,
        **OUTPUTS,
    )
    set_seed(1)
    a = ours.generate(ids, **kw)
    set_seed(1)
    b = ref.generate(ids, **kw)
    assert isinstance(a, GenerateBeamDecoderOnlyOutput)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.beam_indices, b.beam_indices)
    # Per step, the rows in the order the step ran them (B * num_beams), as the hidden states.
    _equal_steps(a.attentions, b.attentions)
    _equal_steps(a.hidden_states, b.hidden_states)
    assert a.attentions[1][0].shape == (6, 8, 1 if use_cache else 7, 7)


def test_continuing_from_a_cache_gives_the_uncached_positions_attentions():
    from stablelm.cache import DynamicCache

    ours, ref = attention_pair()
    ids = _prompts(2, 7, seed=2)
    ours.config.attn_implementation = "eager"  # the cache as the reference's eager forward fills it
    ours_cache, ref_cache = DynamicCache(), transformers.DynamicCache(config=ref.config)
    with torch.no_grad():
        ours(ids[:, :4], past_key_values=ours_cache)
        ref(ids[:, :4], past_key_values=ref_cache)
    ours.config.attn_implementation = "sdpa"
    kw = dict(max_new_tokens=3, eos_token_id=None, **OUTPUTS)
    a = ours.generate(ids, past_key_values=ours_cache, **kw)
    b = ref.generate(ids, past_key_values=ref_cache, **kw)
    assert torch.equal(a.sequences, b.sequences)
    _equal_steps(a.attentions, b.attentions)
    _equal_steps(a.hidden_states, b.hidden_states)
    assert a.attentions[0][0].shape == (2, 8, 3, 7)  # the 3 positions the cache did not hold


def _assistant_pair(ours):
    """A second, different random model, as ours and as the reference's."""
    small, ref_small = make_pair(tiny_config(**{**ours.config.to_dict(), "num_hidden_layers": 1}), seed=7)
    return small, ref_small


@pytest.mark.parametrize("drafting", ["itself", "other", "lookup"])
def test_speculative_attentions_are_plain_decodings_split_per_token(drafting):
    ours, ref = attention_pair()
    ids = _prompts(1, 6, seed=4)
    ids = torch.cat([ids, ids[:, :3]], dim=1)  # a repeated n-gram for prompt lookup to find
    kw = dict(max_new_tokens=7, eos_token_id=None, **OUTPUTS)
    greedy = ref.generate(ids, **kw)
    if drafting == "lookup":
        ours_draft = ref_draft = dict(prompt_lookup_num_tokens=3)
    else:
        ours.generation_config.num_assistant_tokens = ref.generation_config.num_assistant_tokens = 2
        ref.generation_config.num_assistant_tokens_schedule = "constant"
        if drafting == "itself":
            ours_draft, ref_draft = dict(assistant_model=ours), dict(assistant_model=ref)
        else:
            small, ref_small = _assistant_pair(ours)
            ours_draft, ref_draft = dict(assistant_model=small), dict(assistant_model=ref_small)
    a = ours.generate(ids, **kw, **ours_draft)
    b = ref.generate(ids, **kw, **ref_draft)
    assert torch.equal(a.sequences, greedy.sequences) and torch.equal(b.sequences, greedy.sequences)
    # Shapes as the reference's assisted generation splits them; values those of plain decoding, within
    # the rounding of checking several positions in one pass. The prompt's step: bit for bit on the AMX
    # Xeon; within float32 rounding on an AVX2 EPYC, where MKL's float32 products of the prompt's rows
    # alone and of the prompt with the looked-up draft round apart.
    for field in ("attentions", "hidden_states"):
        ours_steps, ref_steps = getattr(a, field), getattr(b, field)
        assert [[x.shape for x in s] for s in ours_steps] == [[x.shape for x in s] for s in ref_steps]
        _equal_steps(ours_steps, getattr(greedy, field), atol=1e-5)
        _equal_steps(ours_steps[:1], getattr(greedy, field)[:1], atol=1e-5)
        _equal_steps(ours_steps[:1], ref_steps[:1], atol=1e-5)
    if drafting == "itself":
        # The reference's first round takes the rows of the prompt for the kept draft tokens (its
        # `_split_model_outputs` slices rows from 0, not from the prompt's end): its token 1 is no step of
        # plain decoding. Ours is (docs/generation.md).
        assert not torch.allclose(b.attentions[1][0], greedy.attentions[1][0], atol=1e-3)
        torch.testing.assert_close(a.attentions[1][0], greedy.attentions[1][0], rtol=0, atol=1e-6)


def test_speculative_sampling_attentions_are_the_final_sequences():
    """Sampled with an assistant (speculative sampling): each token's attentions are the reference's
    forward over the sequence it followed."""
    ours, ref = attention_pair()
    small, _ = _assistant_pair(ours)
    ids = _prompts(1, 6, seed=5)
    set_seed(3)
    a = ours.generate(
        ids, assistant_model=small, do_sample=True, max_new_tokens=6, eos_token_id=None, **OUTPUTS
    )
    assert len(a.attentions) == len(a.hidden_states) == 6
    full = ref(a.sequences, output_attentions=True, output_hidden_states=True)
    for step, layers in enumerate(a.attentions):
        for layer, probs in enumerate(layers):
            if step == 0:
                expected = full.attentions[layer][:, :, :6, :6]
            else:
                expected = full.attentions[layer][:, :, 5 + step : 6 + step, : 6 + step]
            torch.testing.assert_close(probs, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.hidden_states[3][2], full.hidden_states[2][:, 8:9], rtol=0, atol=1e-4)


def test_forward_attentions_of_padded_queries_are_the_references():
    """Queries on left padding see no key: the reference's eager attention weighs every key alike for
    them; so does ours (whose fused kernels open such rows up instead, never read)."""
    ours, ref = attention_pair()
    ids, mask = _left_padded([5, 3], seed=3)
    a = ours(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    b = ref(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert all(torch.equal(x, y) for x, y in zip(a.attentions, b.attentions, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states, strict=True))
    assert torch.equal(a.attentions[0][1, :, :2], torch.full((8, 2, 5), 0.2))


def test_the_fast_path_is_taken_unless_attentions_are_asked_for(monkeypatch):
    from stablelm import attention as attention_module
    from stablelm.decode import DecodeStep

    ours, _ = attention_pair()
    ids = _prompts(2, 6, seed=3)
    made, eager = [], []
    original_for_model, original_attention = DecodeStep.for_model, attention_module.attention

    def for_model(*args, **kwargs):
        made.append(1)
        return original_for_model(*args, **kwargs)

    def attention(*args, weights=None, **kwargs):
        eager.append(weights is not None)
        return original_attention(*args, weights=weights, **kwargs)

    monkeypatch.setattr(DecodeStep, "for_model", staticmethod(for_model))
    monkeypatch.setattr("stablelm.model.attention", attention)
    ours.generate(ids, max_new_tokens=3, return_dict_in_generate=True, output_scores=True)
    assert made and not any(eager)
    made.clear()
    eager.clear()
    ours.generate(ids, max_new_tokens=3, return_dict_in_generate=True, output_attentions=True)
    assert not made and eager and all(eager)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(output_attentions="yes"), TypeError, "output_attentions must be True or False"),
        (dict(output_attentions=True, compile=True), ValueError, "compile=True does not return attentions"),
    ],
)
def test_bad_attention_requests_are_refused_naming_them(kwargs, error, message):
    ours, _ = attention_pair()
    with pytest.raises(error, match=message):
        ours.generate(_prompts(1, 4), max_new_tokens=2, return_dict_in_generate=True, **kwargs)


def test_without_return_dict_the_request_gives_the_tokens():
    ours, ref = attention_pair()
    ids = _prompts(2, 5, seed=1)
    a = ours.generate(ids, max_new_tokens=4, output_attentions=True)
    assert torch.equal(a, ref.generate(ids, max_new_tokens=4, output_attentions=True))
    assert torch.equal(a, ours.generate(ids, max_new_tokens=4))
