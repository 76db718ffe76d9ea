"""The inference speed transforms change no bf16 output bit (fp32: within rounding) and keep the
checkpoint's keys."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_pair, tiny_config, transformers

from stablelm import StableLmForCausalLM
from stablelm import kernels as native
from stablelm.fast import KernelLinear, PackedLinear, can_pack, fuse_projections, optimize_for_inference

VARIANTS = {
    "gqa-bias-qkln": dict(num_key_value_heads=2, use_qkv_bias=True, qk_layernorm=True),
    "mqa-parallel": dict(num_key_value_heads=1, use_parallel_residual=True),
    "tied": dict(tie_word_embeddings=True),
}


def _ids(batch=2, length=12):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "dtype,kernels",
    [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)],
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_optimized_model_keeps_logits_and_state_dict(variant, dtype, kernels):
    model, _ = make_pair(tiny_config(**VARIANTS[variant]))
    model = model.to(dtype)
    with torch.no_grad():
        before = model(_ids()).logits
    state = model.state_dict()
    packable = can_pack(model)
    optimize_for_inference(model, kernels=kernels)
    linears = [m for m in model.modules() if isinstance(m, (PackedLinear, KernelLinear))]
    assert bool(linears) == packable
    uses_kernel = any(isinstance(m, KernelLinear) for m in linears)
    assert uses_kernel == (kernels and native.supports(dtype))
    assert model.model.layers[0].self_attn.qkv_proj is not None
    with torch.no_grad():
        after = model(_ids()).logits
    if dtype == torch.bfloat16:  # bf16: bit for bit, whichever kernel
        assert torch.equal(after, before)
    else:  # fp32: packed kernels sum in another order, within float32 rounding
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        assert torch.equal(after.argmax(-1), before.argmax(-1))
    after = model.state_dict()
    assert list(after) == list(state) or set(after) == set(state)
    for key, tensor in state.items():
        assert torch.equal(after[key], tensor), key


def test_optimized_model_saves_what_the_reference_loads(tmp_path):
    model, ref = make_pair(tiny_config(**VARIANTS["gqa-bias-qkln"]))
    optimize_for_inference(model)
    model.save_pretrained(tmp_path)
    reloaded = transformers.StableLmForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()).logits, ref(_ids()).logits)


def test_optimized_model_loads_a_state_dict():
    model, ref = make_pair(tiny_config(**VARIANTS["gqa-bias-qkln"]))
    fresh = optimize_for_inference(StableLmForCausalLM(tiny_config(**VARIANTS["gqa-bias-qkln"])))
    fresh.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(_ids()).logits, model(_ids()).logits)


def test_generation_is_unchanged_and_the_fused_step_compiles():
    model, ref = make_pair(tiny_config(num_key_value_heads=2, max_position_embeddings=64))
    ids = _ids(1, 5)
    expected = ref.generate(ids, max_new_tokens=10)
    optimize_for_inference(model)
    assert model.generate(ids, max_new_tokens=10).tolist() == expected.tolist()
    fused, _ = make_pair(tiny_config(num_key_value_heads=2, max_position_embeddings=64))
    optimize_for_inference(fused, pack=False)  # compile works on plain (fused) weights
    assert fused.generate(ids, max_new_tokens=10, compile=True).tolist() == expected.tolist()


def test_fusing_twice_is_harmless():
    model, _ = make_pair(tiny_config())
    fuse_projections(model)
    fuse_projections(model)
    with torch.no_grad():
        model(_ids())


def test_packing_where_it_cannot_apply_is_a_clear_error():
    model = StableLmForCausalLM(tiny_config()).to(torch.float16)
    assert not can_pack(model)
    with pytest.raises(ValueError, match="Packing needs the model on the CPU in float32 or bfloat16"):
        optimize_for_inference(model, pack=True)
    optimize_for_inference(model)  # the default skips packing
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_fp32_cache_is_opt_in_and_only_for_half_precision_on_the_cpu():
    assert (
        optimize_for_inference(StableLmForCausalLM(tiny_config()).to(torch.bfloat16)).kv_cache_dtype is None
    )
    wide = optimize_for_inference(StableLmForCausalLM(tiny_config()).to(torch.bfloat16), fp32_cache=True)
    assert wide.kv_cache_dtype is torch.float32
    with pytest.raises(ValueError, match="Drop fp32_cache=True"):
        optimize_for_inference(StableLmForCausalLM(tiny_config()), fp32_cache=True)


def test_attention_over_a_wider_cache_rounds_once_and_leaves_prefill_exact():
    from stablelm.attention import AttentionMask, attention

    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 2, 9, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    for T, causal in [(1, False), (9, True)]:
        q = torch.randn(2, 4, T, 16, generator=g).to(torch.bfloat16)
        mask = AttentionMask(allowed=None, is_causal=causal, key_length=9)
        wide = attention(q, k.float(), v.float(), mask, implementation="sdpa", scale=0.25)
        assert wide.dtype == torch.bfloat16
        if T > 1:  # prefill: the model's dtype throughout, bit for bit
            assert torch.equal(wide, attention(q, k, v, mask, implementation="sdpa", scale=0.25))
        else:  # decode: fp32 attention over the same values, rounded once
            fp32 = attention(q.float(), k.float(), v.float(), mask, implementation="sdpa", scale=0.25)
            assert torch.allclose(wide.float(), fp32, atol=1e-2, rtol=1e-2)  # one bf16 rounding apart
            truth = attention(q.double(), k.double(), v.double(), mask, implementation="eager", scale=0.25)
            bf16_kernel = attention(q, k, v, mask, implementation="sdpa", scale=0.25)
            assert (wide.double() - truth).abs().mean() <= (bf16_kernel.double() - truth).abs().mean()


def test_generate_decodes_over_the_fp32_cache(monkeypatch):
    from stablelm.generation import loop

    model = optimize_for_inference(StableLmForCausalLM(tiny_config()).to(torch.bfloat16), fp32_cache=True)
    caches = []
    make_cache = loop._make_cache
    monkeypatch.setattr(loop, "_make_cache", lambda *a: caches.append(make_cache(*a)) or caches[-1])
    out = model.generate(_ids(2, 5), max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 11)
    assert caches[0].keys[0].dtype == torch.float32 and caches[0].get_seq_length() == 10


def test_decoding_over_an_fp32_cache_keeps_bf16_logits_within_tolerance():
    from stablelm.cache import DynamicCache, StaticCache

    model, _ = make_pair(tiny_config(num_key_value_heads=2))
    model = model.to(torch.bfloat16)
    ids = _ids(2, 12)
    logits = {}
    for name, cache in [
        ("bf16", DynamicCache()),
        (
            "fp32",
            StaticCache.for_model(
                model.config, batch_size=2, max_cache_len=16, dtype=torch.float32, device="cpu"
            ),
        ),
    ]:
        with torch.no_grad():
            model(ids[:, :8], past_key_values=cache)
            for t in range(8, 12):  # one token at a time: the decode path
                out = model(ids[:, t : t + 1], past_key_values=cache, position_ids=torch.full((2, 1), t))
        logits[name] = out.logits.float()
    assert torch.allclose(logits["fp32"], logits["bf16"], atol=2e-2, rtol=2e-2)


def test_one_query_attention_matches_sdpa_with_grouped_heads_and_a_mask():
    from stablelm.attention import _one_query_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(3, 6, 1, 8, generator=g),
        torch.randn(3, 2, 11, 8, generator=g),
        torch.randn(3, 2, 11, 8, generator=g),
    )
    allowed = torch.rand(3, 1, 1, 11, generator=g) > 0.4
    allowed[..., -1] = True  # the new token always sees itself
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3, enable_gqa=True)
    assert torch.allclose(_one_query_attention(q, k, v, allowed, 0.3), expected.transpose(1, 2), atol=1e-6)


def test_compiling_a_packed_model_says_what_to_do_and_runs_eager(capsys, monkeypatch):
    import stablelm.decode

    monkeypatch.setattr(stablelm.decode, "_NOTICE_SHOWN", set())
    model, ref = make_pair(tiny_config(max_position_embeddings=64))
    optimize_for_inference(model, kernels=False)  # oneDNN-packed
    ids = _ids(1, 5)
    if not can_pack(model):
        pytest.skip("oneDNN packing is not available on this CPU")
    out = model.generate(ids, max_new_tokens=6, compile=True)
    assert "optimize_for_inference(model, pack=False)" in capsys.readouterr().err
    assert out.tolist() == ref.generate(ids, max_new_tokens=6).tolist()


@pytest.mark.parametrize("kernels", [True, False])
def test_an_optimized_model_converted_to_another_dtype_gives_that_dtypes_logits(kernels):
    model, _ = make_pair(tiny_config(num_key_value_heads=2))
    plain = copy.deepcopy(model)
    optimize_for_inference(model, kernels=kernels)  # float32, packed
    for dtype in [torch.bfloat16, torch.float16, torch.float32]:
        model, plain = model.to(dtype), plain.to(dtype)
        with torch.no_grad():
            got, want = model(_ids()).logits, plain(_ids()).logits
        assert got.dtype == want.dtype
        if dtype == torch.float32:  # packed kernels sum in another order
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:  # bf16 on a bit-identical kernel, fp16 through F.linear
            assert torch.equal(got, want), dtype
    assert model.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("kernels", [True, False])
def test_an_optimized_model_copies_and_pickles_whole(kernels, tmp_path):
    model, _ = make_pair(tiny_config(**VARIANTS["gqa-bias-qkln"]))
    optimize_for_inference(model, kernels=kernels)
    with torch.no_grad():
        before = model(_ids()).logits
    torch.save(model, tmp_path / "model.pt")  # whole-module pickling, as some users do
    for other in [copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)]:
        with torch.no_grad():
            assert torch.equal(other(_ids()).logits, before)
        assert other.state_dict().keys() == model.state_dict().keys()  # the checkpoint's keys still
        assert any(isinstance(m, (PackedLinear, KernelLinear)) for m in other.modules()) == can_pack(model)
