"""Attention backends and masks. flash_attn needs CUDA: its padding/cache plumbing is checked here on CPU
against a stand-in module with flash_attn's interface and semantics (bottom-right causal alignment)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_, tiny_config

from stablelm import DynamicCache, StableLmForCausalLM, StaticCache
from stablelm import attention as attention_module


def _fake_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """(B, T, H, D) x (B, S, Hkv, D), causal aligned to the bottom-right as flash-attn >= 2.1 does."""
    T, S = q.shape[1], k.shape[1]
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    mask = None
    if causal:
        mask = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=softmax_scale
    )
    return out.transpose(1, 2)


def _fake_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal
):
    outs = []
    for i in range(len(cu_seqlens_q) - 1):
        qs = q[cu_seqlens_q[i] : cu_seqlens_q[i + 1]][None]
        ks = k[cu_seqlens_k[i] : cu_seqlens_k[i + 1]][None]
        vs = v[cu_seqlens_k[i] : cu_seqlens_k[i + 1]][None]
        outs.append(_fake_flash_attn_func(qs, ks, vs, softmax_scale=softmax_scale, causal=causal)[0])
    return torch.cat(outs)


@pytest.fixture
def fake_flash(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.flash_attn_func = _fake_flash_attn_func
    module.flash_attn_varlen_func = _fake_varlen
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setattr(attention_module, "check_flash_attention_available", lambda: None)
    monkeypatch.setattr(attention_module, "_check_flash_inputs", lambda q: None)


def _models():
    config = tiny_config(num_key_value_heads=2, qk_layernorm=True)
    sdpa = StableLmForCausalLM(config).eval()
    randomize_(sdpa)
    flash = StableLmForCausalLM(tiny_config(num_key_value_heads=2, qk_layernorm=True)).eval()
    flash.config.attn_implementation = "flash_attention_2"
    flash.load_state_dict(sdpa.state_dict())
    return sdpa, flash


def _run(model, ids, mask, cache, prefill):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        ids[:, :prefill],
        attention_mask=mask[:, :prefill],
        position_ids=positions[:, :prefill],
        past_key_values=cache,
    )
    logits = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(
            ids[:, t : t + 1],
            attention_mask=mask[:, : t + 1],
            position_ids=positions[:, t : t + 1],
            past_key_values=cache,
        )
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_flash_attention_plumbing_matches_sdpa(fake_flash, padded, kind):
    sdpa, flash = _models()
    ids = torch.randint(1, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
        mask[2, :6] = 0

    def cache():
        if kind == "dynamic":
            return DynamicCache()
        return StaticCache.for_model(
            sdpa.config, batch_size=3, max_cache_len=12, dtype=torch.float32, device="cpu"
        )

    with torch.no_grad():
        expected = _run(sdpa, ids, mask, cache(), prefill=6)
        got = _run(flash, ids, mask, cache(), prefill=6)
    real = mask.bool()
    assert (expected[real] - got[real]).abs().max().item() <= 1e-5


def test_flash_attention_on_cpu_says_what_to_change(fake_flash, monkeypatch):
    monkeypatch.undo()  # keep the real input check, but still pretend the package is installed
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setattr(attention_module, "check_flash_attention_available", lambda: None)
    _, flash = _models()
    with pytest.raises(ValueError, match="runs on CUDA in float16 or bfloat16"):
        flash(torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_flash_attention_matches_sdpa_in_bf16():
    pytest.importorskip("flash_attn")
    sdpa, _ = _models()
    sdpa = sdpa.to("cuda", torch.bfloat16)
    flash = StableLmForCausalLM(
        tiny_config(num_key_value_heads=2, qk_layernorm=True, attn_implementation="flash_attention_2")
    )
    flash.load_state_dict(sdpa.state_dict())
    flash = flash.to("cuda", torch.bfloat16).eval()
    ids = torch.randint(1, 128, (2, 10), device="cuda")
    with torch.no_grad():
        a, b = sdpa(ids).logits.float(), flash(ids).logits.float()
    assert (a - b).abs().max().item() <= 2**-6 * b.abs().max().item()


def test_fully_masked_query_rows_do_not_produce_nan():
    model = StableLmForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    for attn in ("sdpa", "eager"):
        model.config.attn_implementation = attn
        with torch.no_grad():
            assert torch.isfinite(model(ids, attention_mask=mask).logits).all(), attn


def test_a_compiled_decode_step_attends_in_float32_within_rounding_of_sdpa():
    from stablelm.attention import AttentionMask, attention

    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, 1, 16, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, 2, 20, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    allowed = torch.rand(2, 1, 1, 20, generator=g) > 0.3  # written slots, padding and empty ones masked
    allowed[..., 0] = True
    mask = AttentionMask(allowed=allowed, is_causal=False, key_length=20)

    def step(q, k, v):
        return attention(q, k, v, mask, implementation="sdpa", scale=0.25)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)(q, k, v)
    eager = step(q, k, v)  # PyTorch's bf16 SDPA kernel
    truth = attention(q.double(), k.double(), v.double(), mask, implementation="eager", scale=0.25)
    assert compiled.dtype == torch.bfloat16 and compiled.shape == eager.shape == (2, 1, 6, 16)
    torch.testing.assert_close(compiled.float(), eager.float(), atol=2e-2, rtol=2e-2)
    # one rounding of a float32 result: nearer the truth than the bf16 kernel (which rounds the weights)
    assert (compiled.double() - truth).abs().mean() < (eager.double() - truth).abs().mean()


def test_a_whole_graph_compile_takes_an_attention_mask():
    # build_mask once asked whether the mask was all ones (a value the graph cannot branch on):
    # torch.compile(fullgraph=True) failed on every call with an attention_mask
    torch.manual_seed(0)
    model = StableLmForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    for mask in (torch.ones_like(ids), torch.ones_like(ids).index_fill(1, torch.tensor([0, 1]), 0)):
        mask[1] = 1  # row 0 left-padded (in the second mask), row 1 whole
        with torch.no_grad():
            got, want = compiled(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)
