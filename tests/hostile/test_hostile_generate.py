"""Hostile arguments to `generate` and the model's forward: clear errors naming the argument, raised before
any work; and a KV cache sized to what can be generated, not to `max_new_tokens`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_pair, tiny_config

from stablelm import DynamicCache, StableLmForCausalLM, StableLmForSequenceClassification, StaticCache
from stablelm.generation import loop, resolve_config, stepper

VOCAB = 128


def _peaked(max_positions=64):
    """Our model and the reference with the same weights, logits spread (no near-ties decide a token)."""
    ours, ref = make_pair(tiny_config(max_position_embeddings=max_positions, num_key_value_heads=2))
    with torch.no_grad():
        ours.lm_head.weight.mul_(8)
        ref.lm_head.weight.mul_(8)
    return ours, ref


def _ids(batch=1, length=4, seed=0):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def cache_slots(monkeypatch):
    """Every key tensor a cache hands to attention: its slot count (dim 2), whichever cache is used."""
    seen: list[int] = []
    for cls in (StaticCache, DynamicCache):
        original = cls.update

        def update(self, *args, _original=original, **kwargs):
            keys, values = _original(self, *args, **kwargs)
            seen.append(keys.shape[2])
            return keys, values

        monkeypatch.setattr(cls, "update", update)
    return seen


# ---- the cache is sized to what can be generated ----------------------------------------------------------


def test_huge_max_new_tokens_allocates_no_more_than_the_context(cache_slots):
    """max_new_tokens=10**9 used to preallocate a static cache of 10**9 positions (a raw allocation
    error; 10**7 got the process killed). With EOS reached at once, it must cost what a short run does."""
    ours, _ = _peaked(max_positions=64)
    ids = _ids()
    eos = int(ours.generate(ids, max_new_tokens=1, eos_token_id=None)[0, -1])  # the first greedy token
    with pytest.warns(UserWarning, match="past max_position_embeddings"):  # as before: warned, not refused
        out = ours.generate(ids, max_new_tokens=10**9, eos_token_id=eos)
    assert out.tolist() == [[*ids[0].tolist(), eos]]
    assert cache_slots and max(cache_slots) <= 64


@pytest.mark.parametrize("padded", [False, True])
def test_generating_past_the_context_grows_the_cache_and_keeps_the_tokens(padded, cache_slots, monkeypatch):
    """Past max_position_embeddings (warned, as the reference does) the static cache starts at the context
    and grows as the text does: the tokens are the dynamic cache's and the reference's."""
    monkeypatch.setattr(stepper, "CACHE_GROW_MIN", 8)
    ours, ref = _peaked(max_positions=16)
    ids = _ids(batch=2, length=5, seed=3)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :2] = 0
        ids = ids.masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, max_new_tokens=40, eos_token_id=None, pad_token_id=0)
    with pytest.warns(UserWarning, match="past max_position_embeddings"):
        static = ours.generate(ids, **kw)
    sizes = sorted(set(cache_slots))
    cache_slots.clear()
    with pytest.warns(UserWarning, match="past max_position_embeddings"):
        dynamic = ours.generate(ids, cache_implementation="dynamic", **kw)
    assert static.shape == (2, 45)
    assert static.tolist() == dynamic.tolist() == ref.generate(ids, **kw).tolist()
    # The static cache held the context's 16 positions first, then grew, up to the 45 needed.
    assert sizes[0] == 16 and len(sizes) > 1 and max(sizes) <= 45


def test_a_generation_within_the_context_still_preallocates_it_all(monkeypatch):
    """The common path keeps one static cache of prompt + max_new_tokens slots, allocated once."""
    made: list[int] = []
    original = StaticCache.__init__

    def init(self, **kwargs):
        made.append(kwargs["max_cache_len"])
        original(self, **kwargs)

    monkeypatch.setattr(StaticCache, "__init__", init)
    monkeypatch.setattr(StaticCache, "grow", lambda *a: pytest.fail("grew within the context"))
    ours, _ = _peaked(max_positions=64)
    ours.generate(_ids(), max_new_tokens=30, eos_token_id=None)
    assert made == [34]


@pytest.mark.parametrize("zeroed", [False, True])
def test_growing_a_static_cache_keeps_the_stored_positions(zeroed):
    cache = StaticCache(
        num_layers=2, batch_size=2, num_kv_heads=1, head_dim=3, max_cache_len=4, zeroed=zeroed
    )
    keys = torch.randn(2, 1, 3, 3)
    for layer in range(2):
        cache.update(layer, keys + layer, -keys, torch.arange(3))
    cache.advance(3)
    cache.grow(9)
    assert cache.max_cache_len == 9 and cache.get_seq_length() == 3
    for layer in range(2):
        assert cache.keys[layer].shape == cache.values[layer].shape == (2, 1, 9, 3)
        assert cache.keys[layer][:, :, :3].equal(keys + layer) and cache.values[layer][:, :, :3].equal(-keys)
        if zeroed:  # a compiled step reads every slot: new ones must be zeros, as at creation
            assert not cache.keys[layer][:, :, 3:].any() and not cache.values[layer][:, :, 3:].any()
    cache.grow(5)  # never shrinks
    assert cache.max_cache_len == 9


# ---- settings: refused before any work ----------------------------------------------------------------------


class _Recorder:
    def __init__(self):
        self.calls = 0

    def put(self, value):
        self.calls += 1

    def end(self):
        self.calls += 1


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the decoder runs, or a cache is allocated, before the error."""

    def refuse(*args, **kwargs):
        raise AssertionError("work was done before the arguments were checked")

    monkeypatch.setattr(StaticCache, "__init__", refuse)
    monkeypatch.setattr(stepper, "DynamicCache", refuse)


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(max_new_tokens=2.5), TypeError, "max_new_tokens"),
        (dict(max_new_tokens=True), TypeError, "max_new_tokens"),
        (dict(max_new_tokens="8"), TypeError, "max_new_tokens"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),  # as the reference's validate
        (dict(max_new_tokens=None, max_length=7.5), TypeError, "max_length"),
        (dict(min_new_tokens=1.5), TypeError, "min_new_tokens"),
        (dict(min_new_tokens=-2), ValueError, "min_new_tokens"),
        (dict(do_sample=True, num_return_sequences=2.5), TypeError, "num_return_sequences"),
        (dict(do_sample=True, temperature=float("nan")), ValueError, "temperature"),
        (dict(do_sample=True, temperature=float("inf")), ValueError, "temperature"),
        (dict(do_sample=True, temperature=-0.5), ValueError, "temperature"),
        (dict(do_sample=True, temperature="hot"), TypeError, "temperature"),
        (dict(do_sample=True, top_p=0.0), ValueError, "top_p"),
        (dict(do_sample=True, top_p=1.01), ValueError, "top_p"),
        (dict(do_sample=True, top_p=float("nan")), ValueError, "top_p"),
        (dict(do_sample=True, top_k=-1), ValueError, "top_k"),  # ValueError, as the reference's
        (dict(do_sample=True, top_k=2.5), ValueError, "top_k"),
        (dict(do_sample=True, min_p=float("nan")), ValueError, "min_p"),
        (dict(repetition_penalty=float("nan")), ValueError, "repetition_penalty"),  # as the reference's
        (dict(eos_token_id=2.5), TypeError, "eos_token_id"),
        (dict(eos_token_id=[3, "x"]), TypeError, "eos_token_id"),
        (dict(pad_token_id=1.5), TypeError, "pad_token_id"),
        (dict(do_sample="yes"), TypeError, "do_sample"),
    ],
)
def test_bad_settings_are_refused_before_any_work(kwargs, error, name, no_work):
    ours, _ = _peaked()
    streamer = _Recorder()
    with pytest.raises(error, match=name):
        ours.generate(_ids(), streamer=streamer, **{"max_new_tokens": 3, **kwargs})
    assert streamer.calls == 0


def test_a_pad_token_outside_the_vocabulary_is_refused_when_rows_can_finish_early(no_work):
    """Finished rows are fed the pad token: one outside the vocabulary would fail mid-generation."""
    ours, _ = _peaked()
    for pad in (VOCAB, -1):
        with pytest.raises(ValueError, match=rf"pad_token_id \({pad}\).*vocabulary of {VOCAB}"):
            ours.generate(_ids(batch=2), max_new_tokens=3, eos_token_id=5, pad_token_id=pad)
    with pytest.raises(ValueError, match=r"pad_token_id \(200, the first eos_token_id\)"):
        ours.generate(_ids(batch=2), max_new_tokens=3, eos_token_id=[200, 5])


# ---- prompt tensors -------------------------------------------------------------------------------------------


def _bad_inputs():
    ids = _ids()
    embeds = torch.randn(1, 4, 128)
    return {
        "float ids": (dict(input_ids=ids.float()), TypeError, "input_ids"),
        "bool ids": (dict(input_ids=ids > 5), TypeError, "input_ids"),
        "list ids": (dict(input_ids=ids.tolist()), TypeError, "input_ids"),
        "empty batch": (dict(input_ids=ids[:0]), ValueError, r"input_ids .*got shape \(0, 4\)"),
        "empty prompt": (dict(input_ids=ids[:, :0]), ValueError, r"input_ids .*got shape \(1, 0\)"),
        "3-d ids": (dict(input_ids=ids[None]), ValueError, "input_ids"),
        "id = vocab": (
            dict(input_ids=torch.tensor([[1, VOCAB, 2]])),
            ValueError,
            rf"input_ids holds the id {VOCAB}, outside the model's vocabulary of {VOCAB}",
        ),
        "negative id": (dict(input_ids=torch.tensor([[1, -1]])), ValueError, "input_ids holds the id -1"),
        "empty embeds": (dict(inputs_embeds=embeds[:, :0]), ValueError, "inputs_embeds"),
        "embeds width": (dict(inputs_embeds=embeds[..., :64]), ValueError, "inputs_embeds has 64 channels"),
        "integer embeds": (dict(inputs_embeds=ids[..., None].expand(1, 4, 128)), TypeError, "inputs_embeds"),
        "mask shape": (
            dict(input_ids=ids, attention_mask=torch.ones(1, 3, dtype=torch.long)),
            ValueError,
            r"attention_mask must have shape \(1, 4\)",
        ),
        "mask 1-d": (dict(input_ids=ids, attention_mask=torch.ones(4)), ValueError, "attention_mask"),
        "mask 0.5": (
            dict(input_ids=ids, attention_mask=torch.full((1, 4), 0.5)),
            ValueError,
            "attention_mask must hold only 0",
        ),
        "mask -inf": (
            dict(input_ids=ids, attention_mask=torch.tensor([[float("-inf"), 0.0, 0.0, 0.0]])),
            ValueError,
            "attention_mask must hold only 0",
        ),
        "mask 2": (dict(input_ids=ids, attention_mask=torch.full((1, 4), 2)), ValueError, "attention_mask"),
        "mask list": (dict(input_ids=ids, attention_mask=[[1, 1, 1, 1]]), TypeError, "attention_mask"),
        "mask complex": (
            dict(input_ids=ids, attention_mask=torch.ones(1, 4, dtype=torch.complex64)),
            TypeError,
            "attention_mask",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_prompt_tensors_are_refused_before_any_work(case, no_work):
    kwargs, error, message = _bad_inputs()[case]
    ours, _ = _peaked()
    streamer = _Recorder()
    with pytest.raises(error, match=message):
        ours.generate(**kwargs, max_new_tokens=3, streamer=streamer)
    assert streamer.calls == 0


def test_a_list_of_ids_with_stop_strings_is_refused_by_name():
    ours, _ = _peaked()
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):
        ours.generate(_ids().tolist(), max_new_tokens=3, stop_strings=["x"], tokenizer=object())


def test_stream_tokens_checks_when_called():
    ours, _ = _peaked()
    config = resolve_config(ours, None, max_new_tokens=3)
    with pytest.raises(ValueError, match=f"input_ids holds the id {VOCAB}"):
        loop.stream_tokens(ours, torch.tensor([[VOCAB]]), config=config)  # no next(): refused at the call
    with pytest.raises(TypeError, match="max_new_tokens"):
        loop.stream_tokens(ours, _ids(), config=resolve_config(ours, None, max_new_tokens=1.5))


def test_good_arguments_of_every_accepted_kind_still_generate():
    """The checks refuse no input the reference takes with the same meaning."""
    ours, _ = _peaked()
    ids = _ids(batch=2)
    want = ours.generate(ids, max_new_tokens=3, eos_token_id=None)
    for mask in (torch.ones(2, 4), torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 4, dtype=torch.int32)):
        assert ours.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=None).equal(want)
    assert ours.generate(ids, max_new_tokens=np.int64(3), eos_token_id=None).equal(want)
    assert ours.generate(ids.int(), max_new_tokens=3, eos_token_id=None).equal(want)
    assert ours.generate(ids[0], max_new_tokens=3, eos_token_id=None).equal(want[:1])  # one 1-D row
    assert ours.generate(ids, max_new_tokens=3, eos_token_id=(VOCAB + 5,), pad_token_id=0).equal(want)


# ---- the model's forward --------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", [StableLmForCausalLM, StableLmForSequenceClassification])
def test_forward_refuses_ids_outside_the_vocabulary(head):
    """Used to be an IndexError from inside torch's embedding."""
    model = head(tiny_config(pad_token_id=0)).eval()
    for bad in (VOCAB, VOCAB + 7, -3):
        with pytest.raises(ValueError, match=rf"input_ids holds the id {bad}.*vocabulary of {VOCAB} tokens"):
            model(torch.tensor([[1, bad, 2]]))
    with pytest.raises(TypeError, match="input_ids must hold integer token ids"):
        model(torch.tensor([[1.0, 2.0]]))
    assert model(torch.tensor([[0, VOCAB - 1]])).logits.shape[0] == 1  # both ends of the range are fine


def test_forward_refuses_a_bad_attention_mask():
    model = StableLmForCausalLM(tiny_config()).eval()
    ids = _ids(batch=2)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(2, length\)"):
        model(ids, attention_mask=torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        model(ids, attention_mask=torch.full((2, 4), 0.5))
    with pytest.raises(TypeError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4, dtype=torch.complex64))
    # a decode step's mask covers the cache too (past + new): still accepted
    out = model(ids, attention_mask=torch.ones(2, 4))
    step = model(ids[:, :1], attention_mask=torch.ones(2, 5), past_key_values=out.past_key_values)
    assert step.logits.shape == (2, 1, VOCAB)
