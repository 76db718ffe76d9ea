"""Decoding with each cache equals one full forward; the static and dynamic caches agree."""

from __future__ import annotations

import pytest
import torch
from conftest import make_pair, rope_scaling_for, tiny_config

from stablelm import DynamicCache, StableLmForCausalLM, StaticCache


def _model(**kw):
    config = tiny_config(num_key_value_heads=2, qk_layernorm=True, use_qkv_bias=True, **kw)
    model, ref = make_pair(config)
    return model, ref


def _static(model, batch, length):
    return StaticCache.for_model(
        model.config, batch_size=batch, max_cache_len=length, dtype=torch.float32, device="cpu"
    )


def _decode(model, ids, cache, prefill, mask=None, positions=None):
    """Prefill `prefill` tokens, then feed the rest one at a time; return the logits of every position."""
    kw = {} if positions is None else {"position_ids": positions[:, :prefill]}
    out = model(
        ids[:, :prefill],
        attention_mask=None if mask is None else mask[:, :prefill],
        past_key_values=cache,
        **kw,
    )
    logits = [out.logits]
    for t in range(prefill, ids.shape[1]):
        kw = {} if positions is None else {"position_ids": positions[:, t : t + 1]}
        step_mask = None if mask is None else mask[:, : t + 1]
        out = model(ids[:, t : t + 1], attention_mask=step_mask, past_key_values=cache, **kw)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_token_by_token_equals_full_forward(kind, attn):
    model, _ = _model()
    model.config.attn_implementation = attn
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache() if kind == "dynamic" else _static(model, 2, 16)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        stepped = _decode(model, ids, cache, prefill=5)
    assert cache.get_seq_length() == 12
    assert (full - stepped).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_left_padded_batch_decodes_like_the_full_forward(kind):
    model, _ = _model()
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache() if kind == "dynamic" else _static(model, 2, 10)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        stepped = _decode(model, ids, cache, prefill=6, mask=mask, positions=positions)
    real = mask.bool()
    assert (full[real] - stepped[real]).abs().max().item() <= 1e-5


def test_static_cache_gives_the_dynamic_cache_logits():
    model, _ = _model()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dynamic = _decode(model, ids, DynamicCache(), prefill=4)
        static = _decode(model, ids, _static(model, 1, 32), prefill=4)
    assert (dynamic - static).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rope", ["dynamic", "longrope"])
def test_decoding_past_the_trained_length_matches_the_reference(rope):
    """dynamic and longrope change their frequencies with the length: decoding must follow the reference."""
    config = tiny_config(num_key_value_heads=2, partial_rotary_factor=0.5)
    config.rope_scaling = rope_scaling_for(rope, config.rotary_dim)
    ours, ref = make_pair(config)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    from transformers import DynamicCache as RefCache

    with torch.no_grad():
        a = _decode(ours, ids, DynamicCache(), prefill=12)
        b = _decode(ref, ids, RefCache(config=ref.config), prefill=12)
    assert (a - b).abs().max().item() <= 1e-4


def test_forward_returns_a_dynamic_cache_by_default():
    model = StableLmForCausalLM(tiny_config())
    out = model(torch.zeros(1, 3, dtype=torch.long))
    assert isinstance(out.past_key_values, DynamicCache)
    assert out.past_key_values.get_seq_length() == 3
    assert model(torch.zeros(1, 3, dtype=torch.long), use_cache=False).past_key_values is None


def test_static_cache_overflow_says_how_to_fix():
    model = StableLmForCausalLM(tiny_config())
    cache = _static(model, 1, 4)
    model(torch.zeros(1, 3, dtype=torch.long), past_key_values=cache)
    with pytest.raises(ValueError, match="larger max_cache_len"):
        model(torch.zeros(1, 2, dtype=torch.long), past_key_values=cache)


def test_mask_of_the_wrong_length_is_rejected():
    model = StableLmForCausalLM(tiny_config())
    out = model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="pass a mask of length 4"):
        model(
            torch.zeros(1, 1, dtype=torch.long),
            attention_mask=torch.ones(1, 1),
            past_key_values=out.past_key_values,
        )


def test_cache_crop_select_and_reset():
    model = StableLmForCausalLM(tiny_config())
    cache = DynamicCache()
    model(torch.zeros(2, 5, dtype=torch.long), past_key_values=cache)
    cache.crop(3)
    assert cache.get_seq_length() == 3
    cache.select_batch(torch.tensor([1, 1, 0]))
    assert cache.keys[0].shape[0] == 3
    static = _static(model, 1, 8)
    model(torch.zeros(1, 5, dtype=torch.long), past_key_values=static)
    static.reset()
    assert static.get_seq_length() == 0 and all(k.abs().sum() == 0 for k in static.keys)


@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_is_bit_identical_to_the_dynamic_one_in_bf16(padded):
    """Eager attention reads only the written slots of a static cache, so bf16 rounding cannot tell the two
    caches apart (greedy text then matches the reference's, which uses a dynamic cache)."""
    model, _ = _model()
    model = model.to(torch.bfloat16)
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    static = StaticCache.for_model(
        model.config, batch_size=2, max_cache_len=64, dtype=torch.bfloat16, device="cpu"
    )
    with torch.no_grad():
        a = _decode(model, ids, DynamicCache(), prefill=6, mask=mask, positions=positions)
        b = _decode(model, ids, static, prefill=6, mask=mask, positions=positions)
    assert torch.equal(a[mask.bool()], b[mask.bool()])


@pytest.mark.parametrize("padded", [False, True])
def test_eager_decoding_never_reads_an_unwritten_slot(padded, monkeypatch):
    """generate's eager static cache skips the zero fill: garbage (here NaN) in unwritten slots is unseen."""
    from stablelm.generation import stepper

    model, ref = make_pair(tiny_config(num_key_value_heads=2))
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :2] = 0
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    make_cache = stepper.make_cache

    def poisoned(*args):
        cache = make_cache(*args)
        assert isinstance(cache, StaticCache)
        for t in (*cache.keys, *cache.values):
            t.fill_(float("nan"))
        return cache

    monkeypatch.setattr(stepper, "make_cache", poisoned)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert out.tolist() == expected.tolist()


def test_static_cache_crop_rolls_back_and_the_next_writes_overwrite():
    model = StableLmForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    other = (ids[:, 6:] + 1) % 128
    rolled = _static(model, 1, 12)
    with torch.no_grad():
        model(ids, past_key_values=rolled)
        rolled.crop(6)  # drop the last three positions, then write others there
        a = model(other, past_key_values=rolled).logits
        fresh = _static(model, 1, 12)
        model(ids[:, :6], past_key_values=fresh)
        b = model(other, past_key_values=fresh).logits
    assert rolled.get_seq_length() == 9
    # float32: the prefills' projections of 9 and of 6 rows may run different kernels (on non-Intel CPUs
    # stablelm's f32 kernel serves up to 8 rows, MKL more): the same within float32 rounding; a crop that
    # kept the dropped positions would differ by far more
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"crop length must be in \[0, 9\]"):
        rolled.crop(10)
