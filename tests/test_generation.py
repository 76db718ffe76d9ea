"""`generate` against the reference's, token for token, on the same random weights."""

from __future__ import annotations

import pytest
import torch
from conftest import make_pair, tiny_config

from stablelm import set_seed
from stablelm.generation import GenerationConfig, resolve_config, stream_tokens

VOCAB = 128
CONFIGS = {
    "mha": dict(),
    "gqa": dict(num_key_value_heads=2),
    "qkln-parallel": dict(num_key_value_heads=2, qk_layernorm=True, use_parallel_residual=True),
    "qkv-bias": dict(num_key_value_heads=1, use_qkv_bias=True),
}


def peaked_pair(**kw):
    """Our model and the reference with the same weights, the LM head scaled by 8.

    A random tiny model's next-token distribution is nearly flat: two logits within ~1e-6 of each other,
    or a uniform draw within ~1e-7 of a CDF boundary, would let fp32 rounding decide the token. Scaling
    the head spreads the logits (std ~3 instead of ~0.4), so such near-ties practically never occur and the
    tests compare behaviour, not rounding.
    """
    ours, ref = make_pair(tiny_config(max_position_embeddings=128, **kw))
    with torch.no_grad():
        ours.lm_head.weight.mul_(8)
        ref.lm_head.weight.mul_(8)
    return ours, ref


def _prompts(batch, length, seed=0):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _left_padded(lengths, seed=0, pad=0):
    ids = _prompts(len(lengths), max(lengths), seed)
    mask = torch.ones_like(ids)
    for row, n in enumerate(lengths):
        mask[row, : max(lengths) - n] = 0
    return ids.masked_fill(mask == 0, pad), mask


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("limit", [dict(max_new_tokens=12), dict(max_length=17)])
def test_greedy_single_prompt_matches_reference(name, limit):
    ours, ref = peaked_pair(**CONFIGS[name])
    ids = _prompts(1, 5)
    a, b = ours.generate(ids, **limit), ref.generate(ids, **limit)
    assert a.shape == (1, 17)
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_greedy_left_padded_batch_matches_reference(name, cache):
    ours, ref = peaked_pair(**CONFIGS[name])
    ids, mask = _left_padded([7, 3, 5])
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=10, cache_implementation=cache)
    b = ref.generate(ids, attention_mask=mask, max_new_tokens=10)
    assert a.tolist() == b.tolist()


def _eos_reached_midway(ref, ids, mask):
    """A token the reference emits a few steps in, to use as EOS so that rows stop early."""
    free = ref.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    return int(free[0, ids.shape[1] + 2])


@pytest.mark.parametrize("name", ["gqa", "qkln-parallel"])
def test_greedy_with_eos_reached_matches_reference(name):
    ours, ref = peaked_pair(**CONFIGS[name])
    ids, mask = _left_padded([6, 4])
    eos = _eos_reached_midway(ref, ids, mask)
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    b = ref.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert a.tolist() == b.tolist()
    assert eos in a[0, ids.shape[1] :].tolist()
    # eos as a list, and the default pad (the first EOS)
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[VOCAB - 1, eos])
    b = ref.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[VOCAB - 1, eos])
    assert a.tolist() == b.tolist()


SAMPLING = {
    "defaults": dict(do_sample=True),
    "temperature": dict(do_sample=True, temperature=0.7),
    "top_k": dict(do_sample=True, top_k=5),
    "top_p": dict(do_sample=True, top_p=0.8),
    "min_p": dict(do_sample=True, min_p=0.1),
    "repetition_penalty": dict(do_sample=True, repetition_penalty=1.3),
    "all": dict(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.2),
}


@pytest.mark.parametrize("setting", SAMPLING)
@pytest.mark.parametrize("batch", [1, 3])
def test_sampling_with_set_seed_matches_reference(setting, batch):
    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids = _prompts(batch, 5, seed=batch)
    kw = dict(max_new_tokens=32, eos_token_id=None, pad_token_id=0, **SAMPLING[setting])
    for seed in (0, 1):
        set_seed(seed)
        a = ours.generate(ids, **kw)
        set_seed(seed)
        b = ref.generate(ids, **kw)
        assert a.tolist() == b.tolist(), seed


def test_sampling_actually_samples():
    """Guards the sampling parity tests: different seeds must give different text."""
    ours, _ = peaked_pair()
    ids = _prompts(1, 5)
    runs = []
    for seed in range(3):
        set_seed(seed)
        runs.append(ours.generate(ids, max_new_tokens=32, do_sample=True, eos_token_id=None).tolist())
    assert runs[0] != runs[1] or runs[1] != runs[2]


def test_num_return_sequences_and_min_new_tokens_match_reference():
    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids = _prompts(2, 4)
    eos = _eos_reached_midway(ref, ids, torch.ones_like(ids))
    kw = dict(
        max_new_tokens=10,
        do_sample=True,
        num_return_sequences=2,
        min_new_tokens=5,
        eos_token_id=eos,
        pad_token_id=0,
    )
    set_seed(3)
    a = ours.generate(ids, **kw)
    set_seed(3)
    b = ref.generate(ids, **kw)
    assert a.shape[0] == 4 and a.tolist() == b.tolist()
    assert eos not in a[:, 4:9].flatten().tolist()  # held back for min_new_tokens


def test_generator_argument_is_reproducible_and_independent_of_the_global_rng():
    ours, _ = peaked_pair()
    ids = _prompts(1, 4)
    a = ours.generate(ids, max_new_tokens=16, do_sample=True, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    b = ours.generate(ids, max_new_tokens=16, do_sample=True, generator=torch.Generator().manual_seed(5))
    assert a.tolist() == b.tolist()


def test_temperature_zero_is_greedy():
    ours, _ = peaked_pair()
    ids = _prompts(2, 4)
    assert (
        ours.generate(ids, max_new_tokens=8, do_sample=True, temperature=0).tolist()
        == ours.generate(ids, max_new_tokens=8).tolist()
    )


def test_default_length_is_twenty_new_tokens_as_the_reference():
    """transformers 5 generates 20 new tokens by default (4.x stopped at 20 in all, prompt included),
    capped at max_position_embeddings."""
    ours, ref = peaked_pair()
    ids = _prompts(1, 6)
    a = ours.generate(ids, eos_token_id=None)
    assert a.shape == (1, 26) and a.tolist() == ref.generate(ids, eos_token_id=None).tolist()
    assert ours.generate(_prompts(1, 120), eos_token_id=None).shape == (1, 128)


def test_static_and_dynamic_caches_give_identical_tokens():
    ours, _ = peaked_pair(**CONFIGS["qkln-parallel"])
    ids, mask = _left_padded([5, 2, 4])
    set_seed(0)
    a = ours.generate(
        ids, attention_mask=mask, max_new_tokens=16, do_sample=True, cache_implementation="static"
    )
    set_seed(0)
    b = ours.generate(
        ids, attention_mask=mask, max_new_tokens=16, do_sample=True, cache_implementation="dynamic"
    )
    assert a.tolist() == b.tolist()


def test_inputs_embeds_generation_matches_reference():
    ours, ref = peaked_pair()
    ids = _prompts(1, 5)
    embeds = ours.model.embed_tokens(ids).detach()
    a = ours.generate(inputs_embeds=embeds, max_new_tokens=6)
    b = ref.generate(inputs_embeds=embeds, max_new_tokens=6)
    assert a.tolist() == b.tolist() and a.shape == (1, 6)


def test_stream_tokens_reports_finish_reasons_per_row():
    ours, ref = peaked_pair()
    ids = _prompts(2, 5, seed=4)
    eos = _eos_reached_midway(ref, ids[:1], torch.ones_like(ids[:1]))
    config = resolve_config(ours, None, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    steps = list(stream_tokens(ours, ids, config=config))
    final = steps[-1].finish_reasons
    assert final[0] == "stop"
    produced = torch.stack([s.tokens for s in steps], dim=1)
    assert final[1] == ("stop" if eos in produced[1].tolist() else "length")
    assert steps[0].finish_reasons == [None, None] or eos in produced[:, 0].tolist()
    assert torch.equal(
        ours.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)[:, 5:], produced
    )


@pytest.mark.parametrize("sync_every", [2, 3, 8])
def test_reading_the_stop_state_back_in_batches_changes_no_step(sync_every):
    ours, _ = peaked_pair()
    ids = _prompts(3, 5, seed=2)
    free = ours.generate(ids, max_new_tokens=12, eos_token_id=None, pad_token_id=0)[:, 5:]
    # Rows stop at different steps, all of them by step 6 (the run ends early) or by the limit of 5.
    eos = [int(free[0, 2]), int(free[1, 6]), int(free[2, 4])]
    for limit in (12, 5):
        config = resolve_config(ours, None, max_new_tokens=limit, eos_token_id=eos, pad_token_id=0)
        every = [(s.tokens.tolist(), s.finish_reasons) for s in stream_tokens(ours, ids, config=config)]
        batched = list(stream_tokens(ours, ids, config=config, sync_every=sync_every))
        assert [(s.tokens.tolist(), s.finish_reasons) for s in batched] == every
        assert every[-1][1][0] == "stop"
        assert len(every) <= min(limit, 7)


def test_sync_every_below_one_is_refused():
    ours, _ = peaked_pair()
    config = resolve_config(ours, None, max_new_tokens=2)
    with pytest.raises(ValueError, match="sync_every must be at least 1"):
        next(stream_tokens(ours, _prompts(1, 3), config=config, sync_every=0))


def test_generation_config_of_the_checkpoint_gives_the_defaults():
    ours, _ = peaked_pair()
    ids = _prompts(1, 4)
    ours.generation_config = {
        "max_new_tokens": 3,
        "do_sample": False,
        "eos_token_id": None,
        "transformers_version": "x",
    }
    assert ours.generate(ids).shape == (1, 7)
    assert ours.generate(ids, max_new_tokens=5).shape == (1, 9)  # an argument wins
    assert ours.generate(ids, generation_config=GenerationConfig(max_new_tokens=2)).shape == (1, 6)
    config = ours.generation_config  # the dict became an object with attributes
    assert isinstance(config, GenerationConfig) and config.max_new_tokens == 3
    assert GenerationConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["transformers_version"] == "x"  # unknown keys are kept


def test_right_padding_gets_the_reference_warning():
    ours, _ = peaked_pair()
    ids = _prompts(2, 5)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    with pytest.warns(UserWarning, match="right-padding was detected"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be at least 1"),
        (dict(max_length=4, max_new_tokens=None), ValueError, r"max_length \(4\) counts the prompt"),
        (dict(do_sample=True, top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(do_sample=True, top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(do_sample=True, temperature=-1.0), ValueError, "temperature must be >= 0"),
        (dict(top_k=-3), ValueError, "top_k must be a non-negative integer"),
        (dict(min_p=2.0), ValueError, r"min_p must be in \[0, 1\]"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty must be > 0"),
        (dict(stop_strings=["\n"]), ValueError, "pass tokenizer=... to generate"),
        (dict(num_return_sequences=0), ValueError, "num_return_sequences must be at least 1"),
        (
            dict(cache_implementation="paged"),
            ValueError,
            "cache_implementation must be 'static' or 'dynamic'",
        ),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, error, message):
    ours, _ = peaked_pair()
    with pytest.raises(error, match=message):
        ours.generate(_prompts(1, 4), **{"max_new_tokens": 3, **kwargs})


def test_prompt_longer_than_the_positions_with_plain_rope_is_an_error():
    ours, _ = make_pair(tiny_config(max_position_embeddings=8))
    with pytest.raises(
        ValueError, match=r"more than the model's max_position_embeddings \(8\).*truncation=True"
    ):
        ours.generate(_prompts(1, 9), max_new_tokens=2)
    with pytest.warns(UserWarning, match="past max_position_embeddings"):
        ours.generate(_prompts(1, 7), max_new_tokens=3)


def test_padding_without_an_attention_mask_is_read_from_the_pad_token_as_the_reference():
    ours, ref = peaked_pair()
    ids, mask = _left_padded([4, 2], pad=5)
    kw = dict(max_new_tokens=4, pad_token_id=5, eos_token_id=0)
    a = ours.generate(ids, **kw)
    assert (
        a.tolist()
        == ref.generate(ids, **kw).tolist()
        == ours.generate(ids, attention_mask=mask, **kw).tolist()
    )


# ---- text: stop strings and streamers, with the real GPT-NeoX tokenizer ---------------------------------

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def neox():
    from stablelm import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURES / "gpt-neox-20b")


@pytest.fixture(scope="module")
def text_model(neox):
    """A tiny random model over the whole GPT-NeoX vocabulary, peaked as `peaked_pair`'s."""
    from stablelm import StableLmForCausalLM

    model = StableLmForCausalLM(
        tiny_config(
            vocab_size=50304,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
        )
    ).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def _stop_across_a_boundary(neox, text_model):
    """A prompt, its free greedy tokens, and a stop string made of the end of new token k's text and the start
    of token k+1's; the tokens a stop there keeps are free[: k + 2]."""
    ids = torch.tensor([neox.encode("The weather is")])
    free = text_model.generate(ids, max_new_tokens=12, eos_token_id=None)[0, ids.shape[1] :].tolist()
    pieces = [neox.decode(free[: i + 1]) for i in range(len(free))]
    k = next(
        i
        for i in range(2, len(free) - 1)
        if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(pieces[i + 1]) - len(pieces[i]) >= 2
    )
    stop = pieces[k][-2:] + pieces[k + 1][len(pieces[k]) : len(pieces[k]) + 2]
    assert stop not in pieces[k] and stop in pieces[k + 1]
    return ids, free[: k + 2], stop


def test_stop_strings_match_across_token_boundaries(neox, text_model):
    ids, kept, stop = _stop_across_a_boundary(neox, text_model)
    out = text_model.generate(ids, max_new_tokens=12, eos_token_id=None, stop_strings=stop, tokenizer=neox)
    assert out[0, ids.shape[1] :].tolist() == kept


def test_stop_strings_read_a_transformers_tokenizer_through_its_decode(neox, text_model):
    """transformers' tokenizer (code written for the reference passes it) stops where stablelm's does, and
    where the reference stops with it; an object without decode is refused clearly."""
    from conftest import reference_config, transformers

    theirs = transformers.AutoTokenizer.from_pretrained(FIXTURES / "gpt-neox-20b")
    ids, kept, stop = _stop_across_a_boundary(neox, text_model)
    kw = dict(max_new_tokens=12, eos_token_id=None, pad_token_id=0, stop_strings=stop, tokenizer=theirs)
    out = text_model.generate(torch.cat([ids, ids]), **kw)
    assert out[:, ids.shape[1] :].tolist() == [kept, kept]
    ref = transformers.StableLmForCausalLM(reference_config(text_model.config)).eval()
    ref.load_state_dict(text_model.state_dict())
    assert ref.generate(ids, **kw)[0, ids.shape[1] :].tolist() == kept
    with pytest.raises(TypeError, match="stop_strings need a tokenizer with decode"):
        text_model.generate(ids, max_new_tokens=2, stop_strings=stop, tokenizer=object())


def test_text_streamer_prints_exactly_the_generated_text(neox, text_model):
    import io

    from stablelm import TextStreamer

    ids = torch.tensor([neox.encode("Hello, world")])
    sink = io.StringIO()
    out = text_model.generate(
        ids, max_new_tokens=15, eos_token_id=None, streamer=TextStreamer(neox, stream=sink)
    )
    assert sink.getvalue() == neox.decode(out[0, ids.shape[1] :]) + "\n"
    sink = io.StringIO()
    text_model.generate(
        ids, max_new_tokens=15, eos_token_id=None, streamer=TextStreamer(neox, skip_prompt=False, stream=sink)
    )
    assert sink.getvalue() == neox.decode(out[0]) + "\n"


def test_text_iterator_streamer_yields_the_text_from_another_thread(neox, text_model):
    from threading import Thread

    from stablelm import TextIteratorStreamer

    ids = torch.tensor([neox.encode("Once upon a time")])
    expected = text_model.generate(ids, max_new_tokens=20, eos_token_id=None)
    streamer = TextIteratorStreamer(neox, timeout=60)
    thread = Thread(
        target=text_model.generate,
        kwargs=dict(input_ids=ids, max_new_tokens=20, eos_token_id=None, streamer=streamer),
    )
    thread.start()
    chunks = list(streamer)
    thread.join()
    assert len(chunks) > 1
    assert "".join(chunks) == neox.decode(expected[0, ids.shape[1] :])


def test_text_streamer_streams_one_sequence(neox, text_model):
    from stablelm import TextStreamer

    with pytest.raises(ValueError, match="batch size 1"):
        text_model.generate(torch.ones(2, 3, dtype=torch.long), max_new_tokens=2, streamer=TextStreamer(neox))


def test_compiled_decode_gives_the_eager_tokens():
    """The compiled decode step (Inductor, frozen weights) against the eager path, greedy and sampled."""
    from stablelm.decode import DecodeStep

    ours, ref = peaked_pair(**CONFIGS["qkln-parallel"])
    ids, mask = _left_padded([6, 3])
    eager = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    compiled = ours.generate(ids, attention_mask=mask, max_new_tokens=12, compile=True)
    assert DecodeStep.for_model(ours, compile=True)._compiled, "compilation fell back to eager"
    assert (
        compiled.tolist()
        == eager.tolist()
        == ref.generate(ids, attention_mask=mask, max_new_tokens=12).tolist()
    )
    set_seed(0)
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, compile=True)
    set_seed(0)
    b = ours.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True)
    assert a.tolist() == b.tolist()


def test_compiled_decode_follows_weights_changed_after_compiling():
    """The compiled graph holds the weights as frozen constants: changing them must not leave it stale."""
    ours, ref = peaked_pair()
    ids = _prompts(1, 5)
    ours.generate(ids, max_new_tokens=8, compile=True)  # compiles, freezing these weights
    changes = [
        lambda m: [p.mul_(-1.5) for p in m.model.layers[1].parameters()],  # in place
        lambda m: setattr(m.lm_head, "weight", torch.nn.Parameter(-m.lm_head.weight)),  # replaced
    ]
    for change in changes:
        with torch.no_grad():
            change(ours)
            change(ref)
        expected = ref.generate(ids, max_new_tokens=8)
        assert ours.generate(ids, max_new_tokens=8, compile=True).tolist() == expected.tolist()


def test_compile_needs_the_static_cache():
    ours, _ = peaked_pair()
    with pytest.raises(ValueError, match="compile=True needs the static cache"):
        ours.generate(_prompts(1, 3), max_new_tokens=2, compile=True, cache_implementation="dynamic")


def test_empty_stop_strings_are_rejected(neox, text_model):
    with pytest.raises(ValueError, match="stop_strings must be non-empty strings"):
        text_model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, stop_strings=[""], tokenizer=neox)
