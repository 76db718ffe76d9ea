"""Rotary frequencies and scaling equal to the reference's for every rope type."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_config, rope_scaling_for, tiny_config, transformers

from stablelm.rope import RotaryEmbedding, apply_rotary, compute_inv_freq

ROPE_TYPES = ["default", "linear", "dynamic", "yarn", "longrope", "llama3"]


def _pair(rope, prf):
    config = tiny_config(partial_rotary_factor=prf, rope_theta=500.0)
    config.rope_scaling = rope_scaling_for(rope, config.rotary_dim)
    config.validate()
    ref = transformers.models.stablelm.modeling_stablelm.StableLmRotaryEmbedding(reference_config(config))
    return RotaryEmbedding(config), ref


@pytest.mark.parametrize("rope", ROPE_TYPES)
@pytest.mark.parametrize("prf", [0.25, 0.5, 1.0])
def test_frequencies_and_scaling_equal_reference(rope, prf):
    ours, ref = _pair(rope, prf)
    assert ours.inv_freq.dtype == torch.float32
    assert torch.equal(ours.inv_freq, ref.inv_freq)
    assert ours.attention_scaling == ref.attention_scaling


@pytest.mark.parametrize("rope", ROPE_TYPES)
@pytest.mark.parametrize("length", [5, 16, 40])
def test_cos_sin_equal_reference_within_and_past_the_trained_length(rope, length):
    ours, ref = _pair(rope, 0.5)
    positions = torch.arange(length)[None].expand(2, length)
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = ours(torch.empty(0), positions)
    ref_cos, ref_sin = ref(x, positions)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


@pytest.mark.parametrize("rope", ROPE_TYPES)
def test_frequencies_follow_casts_as_the_references_do(rope):
    """`.to(torch.bfloat16)` / `.half()` round the frequencies as they round the reference's buffers, and
    `.float()` afterwards keeps the rounded values: the same cos/sin as the reference after the same casts
    (within the trained length: past it the reference's dynamic and longrope frequencies change state)."""
    ours, ref = _pair(rope, 0.5)
    positions = torch.arange(8)[None]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ours.to(dtype), ref.to(dtype)
        assert ours.inv_freq.dtype == ref.inv_freq.dtype == dtype and torch.equal(ours.inv_freq, ref.inv_freq)
        x = torch.zeros(1, dtype=dtype)
        for a, b in zip(ours(x, positions), ref(x, positions), strict=True):
            assert a.dtype == dtype and torch.equal(a, b), (rope, dtype)


def test_frequencies_are_computed_when_a_meta_module_gets_storage():
    config = tiny_config()
    with torch.device("meta"):
        ours = RotaryEmbedding(config)
    ours.to_empty(device="cpu")
    assert ours.inv_freq.dtype == torch.float32 and torch.equal(
        ours.inv_freq, RotaryEmbedding(config).inv_freq
    )


def test_frequencies_are_rebuilt_after_materialising_from_meta():
    config = tiny_config()
    with torch.device("meta"):
        rope = RotaryEmbedding(config)
    assert rope.inv_freq.is_meta
    rope.to_empty(device="cpu")
    assert torch.equal(rope.inv_freq, compute_inv_freq(config)[0])


def test_apply_rotary_leaves_the_pass_through_channels_alone():
    config = tiny_config(partial_rotary_factor=0.25)
    cos, sin = RotaryEmbedding(config)(torch.empty(0), torch.arange(3)[None])
    x = torch.randn(1, 2, 3, config.head_dim)
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., config.rotary_dim :], x[..., config.rotary_dim :])
    # A rotation keeps each pair's norm.
    half = config.rotary_dim // 2
    norm = lambda t: t[..., :half] ** 2 + t[..., half : config.rotary_dim] ** 2  # noqa: E731
    assert torch.allclose(norm(y), norm(x), atol=1e-5)
