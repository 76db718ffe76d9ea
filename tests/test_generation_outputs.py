"""`return_dict_in_generate` outputs, caches (returned, passed back, none) and generation configs, against
the reference on the same random weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import transformers
from test_generation import CONFIGS, _left_padded, _prompts, peaked_pair

from stablelm import set_seed
from stablelm.cache import DynamicCache, StaticCache
from stablelm.generation import GenerateDecoderOnlyOutput, GenerationConfig


def _same_cache(ours, ref_cache):
    n = ours.get_seq_length()
    assert n == ref_cache.get_seq_length()
    for i, layer in enumerate(ref_cache.layers):
        assert torch.equal(ours.keys[i][:, :, :n], layer.keys)
        assert torch.equal(ours.values[i][:, :, :n], layer.values)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("sampling", [dict(), dict(do_sample=True, top_k=10, temperature=0.8)])
def test_return_dict_matches_reference_tensor_for_tensor(cache, sampling):
    ours, ref = peaked_pair(**CONFIGS["qkln-parallel"])
    ids = _prompts(2, 5, seed=5)
    kw = dict(
        max_new_tokens=7,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        **sampling,
    )
    set_seed(0)
    a = ours.generate(ids, cache_implementation=cache, **kw)
    set_seed(0)
    b = ref.generate(ids, **kw)
    assert isinstance(a, GenerateDecoderOnlyOutput)
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores) == len(a.logits) == 7
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))
    if sampling:  # processed scores differ from the raw logits
        assert not torch.equal(a.scores[0], a.logits[0])
    _same_cache(a.cache, b.cache)
    assert a.past_key_values is a.cache
    assert a["sequences"] is a.sequences and a[0] is a.sequences  # the reference's ModelOutput access
    assert a.attentions is None and a.hidden_states is None


@pytest.mark.parametrize("beams", [1, 2])
def test_hidden_states_match_reference(beams):
    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids = _prompts(2, 5, seed=2)
    kw = dict(max_new_tokens=4, num_beams=beams, return_dict_in_generate=True, output_hidden_states=True)
    a, b = ours.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.hidden_states) == len(b.hidden_states) == 4
    for ours_step, ref_step in zip(a.hidden_states, b.hidden_states, strict=True):
        assert len(ours_step) == len(ref_step) == 3  # embeddings and each of the 2 layers
        assert all(torch.equal(x, y) for x, y in zip(ours_step, ref_step, strict=True))
    assert a.hidden_states[0][0].shape[1] == 5 and a.hidden_states[1][0].shape[1] == 1
    plain = ours.generate(ids, max_new_tokens=4, num_beams=beams)
    assert torch.equal(plain, a.sequences)


def test_return_dict_stops_where_the_reference_stops():
    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids = _prompts(2, 5, seed=1)
    free = ref.generate(ids, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    eos = [int(free[0, 7]), int(free[1, 9])]
    kw = dict(max_new_tokens=8, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True)
    a, b = ours.generate(ids, output_scores=True, **kw), ref.generate(ids, output_scores=True, **kw)
    assert torch.equal(a.sequences, b.sequences) and a.sequences.shape[1] < 13
    assert len(a.scores) == len(b.scores) and a.logits is None and b.logits is None
    _same_cache(a.cache, b.cache)


def test_inputs_embeds_keeps_the_cache_even_with_use_cache_false():
    ours, ref = peaked_pair()
    embeds = ours.model.embed_tokens(_prompts(1, 5)).detach()
    a = ours.generate(inputs_embeds=embeds, max_new_tokens=5, use_cache=False)
    b = ref.generate(inputs_embeds=embeds, max_new_tokens=5, use_cache=False)
    assert a.tolist() == b.tolist()


def test_max_time_stops_every_row_as_the_reference():
    ours, ref = peaked_pair()
    ids = _prompts(2, 4)
    a = ours.generate(ids, max_new_tokens=10, max_time=0.0, eos_token_id=None)
    b = ref.generate(ids, max_new_tokens=10, max_time=0.0, eos_token_id=None)
    assert a.shape == b.shape == (2, 5)
    with pytest.raises(TypeError, match="max_time must be a number"):
        ours.generate(ids, max_new_tokens=2, max_time="1s")


def test_output_flags_without_return_dict_give_the_tensor():
    ours, ref = peaked_pair()
    ids = _prompts(1, 4)
    a = ours.generate(ids, max_new_tokens=3, output_scores=True, output_logits=True)
    b = ref.generate(ids, max_new_tokens=3, output_scores=True, output_logits=True)
    assert isinstance(a, torch.Tensor) and a.tolist() == b.tolist()


@pytest.mark.parametrize("padded", [False, True])
def test_use_cache_false_recomputes_and_matches_reference(padded):
    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids, mask = _left_padded([5, 3, 4]) if padded else (_prompts(3, 5), None)
    kw = dict(
        max_new_tokens=8, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_logits=True
    )
    a = ours.generate(ids, attention_mask=mask, use_cache=False, **kw)
    b = ref.generate(ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(a.sequences, b.sequences) and a.cache is None
    tolerance = dict(atol=1e-4) if padded else dict(atol=0, rtol=0)
    assert all(torch.allclose(x, y, **tolerance) for x, y in zip(a.logits, b.logits, strict=True))
    cached = ours.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(cached.sequences, a.sequences)


def test_continuing_from_a_returned_cache_matches_reference():
    """A second call passes the first call's sequences (plus new tokens) and its cache, as the reference
    documents for multi-turn use."""
    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids = _prompts(2, 5, seed=4)
    kw = dict(max_new_tokens=5, eos_token_id=None, return_dict_in_generate=True)
    first_a, first_b = ours.generate(ids, **kw), ref.generate(ids, **kw)
    follow = torch.cat([first_a.sequences, _prompts(2, 3, seed=9)], dim=1)
    a = ours.generate(follow, past_key_values=first_a.cache, output_logits=True, **kw)
    b = ref.generate(follow, past_key_values=first_b.cache, output_logits=True, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))
    assert a.cache is first_a.cache  # extended in place, as the reference's
    _same_cache(a.cache, b.cache)
    fresh = ours.generate(follow, **kw)  # and the same as computing everything again
    assert torch.equal(fresh.sequences, a.sequences)


@pytest.mark.parametrize("cache_cls", [DynamicCache, StaticCache])
def test_continuing_from_a_forward_cache_matches_reference(cache_cls):
    ours, ref = peaked_pair(**CONFIGS["mha"])
    ids = _prompts(1, 7, seed=6)
    if cache_cls is StaticCache:
        cache = StaticCache.for_model(
            ours.config, batch_size=1, max_cache_len=8, dtype=torch.float32, device="cpu"
        )
    else:
        cache = DynamicCache()
    ours(ids[:, :4], past_key_values=cache, use_cache=True)
    ref_cache = ref(ids[:, :4], use_cache=True).past_key_values
    a = ours.generate(ids, past_key_values=cache, max_new_tokens=6, eos_token_id=None)
    b = ref.generate(ids, past_key_values=ref_cache, max_new_tokens=6, eos_token_id=None)
    assert a.tolist() == b.tolist()


def test_past_key_values_errors_name_the_argument():
    ours, _ = peaked_pair()
    ids = _prompts(1, 4)
    cache = DynamicCache()
    ours(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="already holds 4 positions"):
        ours.generate(ids, past_key_values=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="holds 1 rows but the prompt has 2"):
        ours.generate(_prompts(2, 6), past_key_values=cache, max_new_tokens=2)
    with pytest.raises(TypeError, match="past_key_values must be a stablelm cache"):
        ours.generate(ids, past_key_values=((1, 2),), max_new_tokens=2)
    # transformers' own cache: the message names it and says what to pass instead
    with pytest.raises(TypeError, match=r"got transformers\..*DynamicCache: pass stablelm\.DynamicCache\(\)"):
        ours.generate(ids, past_key_values=transformers.DynamicCache(), max_new_tokens=2)
    # and a forward's, under either name
    for name in ("past_key_values", "cache"):
        with pytest.raises(TypeError, match=rf"{name} must be a stablelm cache, got transformers\."):
            ours(ids, use_cache=True, **{name: transformers.DynamicCache()})


def test_inputs_is_input_ids():
    ours, ref = peaked_pair()
    ids = _prompts(2, 4)
    assert (
        ours.generate(inputs=ids, max_new_tokens=4).tolist()
        == ref.generate(inputs=ids, max_new_tokens=4).tolist()
    )
    with pytest.raises(ValueError, match="inputs and input_ids are the same argument"):
        ours.generate(ids, inputs=ids, max_new_tokens=2)


def test_the_references_generation_config_object_is_read():
    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids = _prompts(2, 4, seed=3)
    free = ref.generate(ids, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    eos = int(free[0, 6])
    for model in (ours, ref):
        model.generation_config = transformers.GenerationConfig(eos_token_id=eos, pad_token_id=0)
    config = transformers.GenerationConfig(max_new_tokens=8, num_beams=2, no_repeat_ngram_size=2)
    # the passed config's unset fields come from the model's (EOS here), as the reference merges them
    a, b = ours.generate(ids, generation_config=config), ref.generate(ids, generation_config=config)
    assert a.tolist() == b.tolist() and eos in a[0].tolist()
    assert ours.generate(ids, config).tolist() == b.tolist()  # positional, as the reference's
    as_dict = dict(max_new_tokens=8, num_beams=2, no_repeat_ngram_size=2)
    assert ours.generate(ids, generation_config=as_dict).tolist() == b.tolist()
    assert ours.generate(ids, generation_config=GenerationConfig(**as_dict)).tolist() == b.tolist()
    assert ours.generation_config.eos_token_id == eos  # became stablelm's object, with attributes
    assert isinstance(ours.generation_config, GenerationConfig)


def test_model_generation_config_is_an_object_from_file_dict_or_config(tmp_path):
    ours, ref = peaked_pair()
    assert ours.generation_config.eos_token_id == ours.config.eos_token_id  # no file: the config's tokens
    ours.generation_config = {"max_new_tokens": 3, "do_sample": False}
    assert ours.generation_config.max_new_tokens == 3 and ours.generation_config.top_k is None
    ours.generation_config.eos_token_id = None
    assert ours.generate(_prompts(1, 4)).shape == (1, 7)
    ours.generation_config = None
    assert ours.generation_config.max_new_tokens is None


def test_generation_config_files_round_trip_with_the_reference(tmp_path):
    ours = GenerationConfig(max_new_tokens=9, num_beams=3, sequence_bias={(1, 2): -1.0}, eos_token_id=[0, 2])
    ours.save_pretrained(tmp_path / "ours")
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path / "ours")
    assert (theirs.max_new_tokens, theirs.num_beams, theirs.eos_token_id) == (9, 3, [0, 2])
    ref = transformers.GenerationConfig(max_new_tokens=4, do_sample=True, top_p=0.9, no_repeat_ngram_size=3)
    ref.save_pretrained(tmp_path / "ref")
    back = GenerationConfig.from_pretrained(tmp_path / "ref")
    assert (back.max_new_tokens, back.top_p, back.no_repeat_ngram_size) == (4, 0.9, 3)
    assert "transformers_version" in back.extra
    assert GenerationConfig.from_pretrained(
        tmp_path / "ours" / "generation_config.json"
    ) == GenerationConfig.from_dict(json.loads((tmp_path / "ours" / "generation_config.json").read_text()))
    with pytest.raises(FileNotFoundError, match="No generation_config.json"):
        GenerationConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="No folder at"):
        GenerationConfig.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="model.generation_config must be a GenerationConfig"):
        peaked_pair()[0].generation_config = 3


def test_the_references_text_generation_pipeline_drives_generate(monkeypatch):
    """transformers' pipeline reads model.generation_config (to_diff_dict, update) and passes its
    generation_config and settings to generate. (`can_generate` is set here in case the model lacks it.)"""
    from pathlib import Path

    ours, ref = peaked_pair(vocab_size=50304)
    monkeypatch.setattr(type(ours), "can_generate", classmethod(lambda cls: True), raising=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        Path(__file__).parent / "fixtures" / "gpt-neox-20b"
    )
    texts = [
        transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)(
            "Hello there", max_new_tokens=6, do_sample=False, num_beams=2
        )
        for model in (ours, ref)
    ]
    assert texts[0] == texts[1] and texts[0][0]["generated_text"].startswith("Hello there")


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("normalize", [False, True])
def test_compute_transition_scores_matches_reference(beams, normalize):
    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids = _prompts(2, 4, seed=8)
    free = ref.generate(ids, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    kw = dict(
        max_new_tokens=6,
        num_beams=beams,
        eos_token_id=int(free[0, 6]),
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    a, b = ours.generate(ids, **kw), ref.generate(ids, **kw)
    beam_a = a.beam_indices if beams > 1 else None
    beam_b = b.beam_indices if beams > 1 else None
    got = ours.compute_transition_scores(a.sequences, a.scores, beam_a, normalize_logits=normalize)
    want = ref.compute_transition_scores(b.sequences, b.scores, beam_b, normalize_logits=normalize)
    assert torch.equal(got, want) and got.shape[0] == 2
    with pytest.raises(ValueError, match="scores is empty"):
        ours.compute_transition_scores(a.sequences, ())
