"""The fast path is the default: `from_pretrained` then `generate` (or `model(...)` under no_grad) runs on
stablelm's kernels with fused projections, bf16 bit-identical to the reference (fp32 within rounding),
and nothing a user of the reference does afterwards breaks: training, peft, saving, casts, copies,
compiling. Each such use is checked on a model that has already generated."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import make_pair, randomize_, reference_config, tiny_config, transformers
from test_devices import assert_same_or_parted_at_a_near_tie

from stablelm import StableLmForCausalLM, layers, lean_step
from stablelm.fast import optimize_for_inference, set_kernels
from stablelm.kernels.linear import plan

VARIANTS = {
    "gqa-bias-qkln": dict(num_key_value_heads=2, use_qkv_bias=True, qk_layernorm=True),
    "mqa-parallel": dict(num_key_value_heads=1, use_parallel_residual=True),
    "tied": dict(tie_word_embeddings=True),
}
CONFIG = dict(num_key_value_heads=2, use_qkv_bias=True, max_position_embeddings=64)


def _ids(batch=2, length=12):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(0))


def _serves(dtype: torch.dtype, rows: int = 2) -> bool:
    return plan(dtype, 128, 64, True, rows) is not None


@pytest.fixture
def kernel_calls(monkeypatch):
    """The kinds of kernel each call of the model's layers ran (empty: torch's F.linear only)."""
    calls = []
    call = layers.call

    def recording(fn, kind, x, weights, biases, block):
        calls.append((kind, len(weights)))
        return call(fn, kind, x, weights, biases, block)

    monkeypatch.setattr(layers, "call", recording)
    planned = lean_step._Kernel.__call__  # the planned decode step calls its kernels itself

    def recording_planned(self, x):
        calls.append((self.kind, self.args.G))
        return planned(self, x)

    monkeypatch.setattr(lean_step._Kernel, "__call__", recording_planned)
    return calls


def _write_checkpoint(folder, **config):
    """A random-weight checkpoint written by the reference's save_pretrained; the reference (fp32)."""
    torch.manual_seed(0)
    ref = transformers.StableLmForCausalLM._from_config(reference_config(tiny_config(**config)))
    randomize_(ref)
    ref.save_pretrained(folder)
    return folder, ref.eval()


def _reference(folder, dtype):
    """The reference loaded as its users load it (rotary frequencies stay fp32, unlike after .to())."""
    return transformers.StableLmForCausalLM.from_pretrained(folder, dtype=dtype).eval()


@pytest.fixture
def checkpoint(tmp_path):
    return _write_checkpoint(tmp_path, **CONFIG)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_from_pretrained_then_generate_runs_on_the_kernels_with_fused_projections(
    checkpoint, dtype, kernel_calls
):
    path, ref = checkpoint
    model = StableLmForCausalLM.from_pretrained(path, dtype=dtype)
    ids = _ids(1, 9)
    out = model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    expected = _reference(path, dtype).generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.tolist() == expected.tolist()
    # one decode row through q/k/v (with bias), o, gate/up, down (K = 96) and the LM head
    shapes = [(128, 128, True), (128, 64, True), (128, 128, False), (128, 96, False), (96, 128, False)]
    served = [plan(dtype, k, n, bias, 1) is not None for k, n, bias in shapes]
    step = kernel_calls[-(4 * model.config.num_hidden_layers + 1) :]
    if all(served):  # q/k/v in one call, o, gate/up in one call, down, and the head
        assert [n for _, n in step] == [3, 1, 2, 1] * model.config.num_hidden_layers + [1]
    elif not any(served):
        assert kernel_calls == []  # torch's kernels, exactly the reference's computation
        pytest.skip(f"no stablelm kernel serves {dtype} on this machine")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_default_path_logits_equal_the_references_in_bf16_and_round_alike_in_fp32(variant, dtype, tmp_path):
    path, _ = _write_checkpoint(tmp_path, **VARIANTS[variant], max_position_embeddings=64)
    model, ref = StableLmForCausalLM.from_pretrained(path, dtype=dtype), _reference(path, dtype)
    for batch, length in [(1, 1), (2, 1), (2, 12), (1, 40)]:
        ids = torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            got, want = model(ids).logits, ref(ids).logits
        if dtype == torch.bfloat16:  # bit for bit, kernel or not
            assert torch.equal(got, want), (batch, length)
        else:  # another summation order: within float32 rounding
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_greedy_tokens_equal_the_references_on_a_model_that_uses_every_variant(checkpoint):
    path, ref = checkpoint
    model = StableLmForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    expected = _reference(path, torch.bfloat16).generate(ids, **kwargs)
    assert model.generate(ids, **kwargs).tolist() == expected.tolist()


def _train_step(model, ids):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return loss.detach(), grads, {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_after_generating_equals_the_references(checkpoint, dtype, kernel_calls):
    path, ref = checkpoint
    model, ref = StableLmForCausalLM.from_pretrained(path, dtype=dtype), _reference(path, dtype)
    ids = _ids(2, 16)
    model.generate(ids[:, :4], max_new_tokens=4, do_sample=False)
    ref.generate(ids[:, :4], max_new_tokens=4, do_sample=False)
    kernel_calls.clear()
    loss, grads, params = _train_step(model, ids)
    ref_loss, ref_grads, ref_params = _train_step(ref, ids)
    assert kernel_calls == []  # gradients: torch's kernels
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
        assert torch.equal(params[name], ref_params[name]), name


def test_after_generating_the_state_dict_is_the_checkpoints_and_saves_for_the_reference(checkpoint, tmp_path):
    path, ref = checkpoint
    model = StableLmForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generate(_ids(1, 4), max_new_tokens=3)
    state, ref_state = model.state_dict(), ref.state_dict()
    assert state.keys() == ref_state.keys() or set(state) == set(ref_state)
    for key in ref_state:
        assert torch.equal(state[key], ref_state[key]), key
        assert state[key].layout == torch.strided and state[key].is_contiguous(), key
    model.save_pretrained(tmp_path / "saved")
    reloaded = transformers.StableLmForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()).logits, ref(_ids()).logits)


@pytest.mark.parametrize("start", [torch.float32, torch.bfloat16])
def test_casts_after_generating_compute_in_the_new_dtype(checkpoint, start):
    path, _ = checkpoint
    model = StableLmForCausalLM.from_pretrained(path, dtype=start)
    model.generate(_ids(1, 4), max_new_tokens=3)
    exact = StableLmForCausalLM.from_pretrained(path, dtype=start, optimize=False)  # torch's kernels
    for cast, dtype in [
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.float(), torch.float32),
        (lambda m: m.double(), torch.float64),
        (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16),
    ]:
        model, exact = cast(model), cast(exact)
        with torch.no_grad():
            got, want = model(_ids()).logits, exact(_ids()).logits
        assert got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        else:  # half precision bit for bit (kernel or torch), fp64 through torch
            assert torch.equal(got, want), dtype


def test_moving_to_another_device_after_generating_keeps_the_checkpoints_layout(checkpoint):
    path, _ = checkpoint
    model = StableLmForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model.generate(_ids(1, 4), max_new_tokens=3)
    moved = model.to("meta")  # the device every machine has besides the CPU
    assert all(p.device.type == "meta" for p in moved.parameters())
    assert moved.model.layers[0].self_attn.q_proj.weight.shape == (128, 128)
    if torch.cuda.is_available():  # pragma: no cover - on a GPU machine
        model = StableLmForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
        assert model.generate(_ids(1, 4).cuda(), max_new_tokens=3).device.type == "cuda"


def test_resizing_the_vocabulary_after_generating_keeps_the_fast_head(checkpoint, kernel_calls):
    path, _ = checkpoint
    model = StableLmForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model.generate(_ids(1, 4), max_new_tokens=3)
    model.resize_token_embeddings(200)
    head = model.get_output_embeddings()
    assert isinstance(head, layers.Linear) and head.weight.shape == (200, 128) and head.use_kernels
    out = model.generate(_ids(1, 4), max_new_tokens=3)
    assert out.shape == (1, 7)
    if _serves(torch.bfloat16, 1):
        assert kernel_calls[-1] == (kernel_calls[-1][0], 1)  # the LM head on the kernel too


def test_autograd_takes_torchs_kernels_and_inference_takes_stablelms(checkpoint, kernel_calls):
    path, _ = checkpoint
    model = StableLmForCausalLM.from_pretrained(path, dtype=torch.float32)
    logits = model(_ids()).logits  # autograd on: torch's kernels, a graph to train on
    assert logits.requires_grad and kernel_calls == []
    model.requires_grad_(False)
    model(_ids())  # autograd still on (a frozen model, as LoRA's base): torch's kernels
    assert kernel_calls == []
    for inference in (torch.no_grad, torch.inference_mode):
        kernel_calls.clear()
        with inference():
            model(_ids())
        assert bool(kernel_calls) == _serves(torch.float32, 24)  # 2 x 12 tokens: the rows of each call


@pytest.mark.parametrize("how", ["argument", "environment", "set_kernels", "optimize_for_inference"])
def test_the_kernels_can_be_switched_off(checkpoint, monkeypatch, kernel_calls, how):
    path, ref = checkpoint
    if how == "environment":
        monkeypatch.setenv("STABLELM_OPTIMIZE", "0")
    model = StableLmForCausalLM.from_pretrained(
        path, dtype=torch.float32, optimize=False if how == "argument" else None
    )
    if how == "set_kernels":
        set_kernels(model, False)
    elif how == "optimize_for_inference":
        optimize_for_inference(model, kernels=False)
    with torch.no_grad():
        logits = model(_ids()).logits
        assert torch.equal(logits, ref(_ids()).logits)  # exactly the reference's computation
    assert kernel_calls == []


def test_optimize_must_be_a_bool(checkpoint):
    with pytest.raises(TypeError, match="optimize must be True, False or None"):
        StableLmForCausalLM.from_pretrained(checkpoint[0], optimize="yes")


def test_a_hooked_or_wrapped_projection_keeps_its_own_call(checkpoint, kernel_calls):
    path, _ = checkpoint
    model = StableLmForCausalLM.from_pretrained(path, dtype=torch.float32).requires_grad_(False)
    seen = []
    model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        hooked = model(_ids()).logits
    assert seen == [(2, 12, 32)]  # the hook ran: k_proj was not folded into a fused call
    if _serves(torch.float32, 24):  # 2 x 12 tokens: the rows of each call
        assert (kernel_calls[0][1], kernel_calls[1][1], kernel_calls[2][1]) == (1, 1, 1)  # q, k, v alone
        plain = StableLmForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            assert torch.equal(hooked, plain(_ids()).logits)  # fused or not, the same bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_lora_on_a_loaded_model_equals_the_same_on_a_model_without_kernels(checkpoint, dtype):
    peft = pytest.importorskip("peft")
    path, _ = checkpoint
    results = []
    for optimize in (True, False):
        model = StableLmForCausalLM.from_pretrained(path, dtype=dtype, optimize=optimize)
        model.generate(_ids(1, 4), max_new_tokens=3)
        torch.manual_seed(0)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
        lora = peft.get_peft_model(model, config)
        for p in lora.parameters():  # B starts at zero: make the adapter do something
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)
        loss, grads, _ = _train_step(lora, _ids(2, 16))
        lora.eval()
        with torch.no_grad():
            adapted = lora(_ids()).logits
        merged = lora.merge_and_unload()
        assert isinstance(merged.model.layers[0].self_attn.q_proj, layers.Linear)
        with torch.no_grad():
            results.append((loss, grads, adapted, merged(_ids()).logits))
    (loss, grads, adapted, merged), (loss0, grads0, adapted0, merged0) = results
    assert torch.equal(loss, loss0)
    for name in grads0:
        assert torch.equal(grads[name], grads0[name]), name
    if dtype == torch.bfloat16:
        assert torch.equal(adapted, adapted0) and torch.equal(merged, merged0)
    else:
        torch.testing.assert_close(adapted, adapted0, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(merged, merged0, rtol=2e-5, atol=2e-5)


def test_copies_and_pickles_of_a_model_that_generated_keep_the_fast_path(checkpoint, kernel_calls):
    path, _ = checkpoint
    model = StableLmForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model.generate(_ids(1, 4), max_new_tokens=5)
    kernel_calls.clear()
    out = model.generate(_ids(1, 4), max_new_tokens=5)
    calls = list(kernel_calls)
    for other in [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]:
        kernel_calls.clear()
        assert other.generate(_ids(1, 4), max_new_tokens=5).tolist() == out.tolist()
        assert kernel_calls == calls  # the same kernels, fused alike
        assert other.state_dict().keys() == model.state_dict().keys()


def test_torch_compile_of_a_model_that_generated(checkpoint):
    path, _ = checkpoint
    model = StableLmForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generate(_ids(1, 4), max_new_tokens=3)
    compiled = torch.compile(model)
    with torch.no_grad():
        got, want = compiled(_ids()).logits, model(_ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    compiled.train()  # and it trains, through torch's kernels
    compiled(_ids(), labels=_ids()).loss.backward()
    assert model.lm_head.weight.grad is not None


def test_fp32_cache_is_opt_in_and_only_for_half_precision_on_the_cpu():
    assert (
        optimize_for_inference(StableLmForCausalLM(tiny_config()).to(torch.bfloat16)).kv_cache_dtype is None
    )
    wide = optimize_for_inference(StableLmForCausalLM(tiny_config()).to(torch.bfloat16), fp32_cache=True)
    assert wide.kv_cache_dtype is torch.float32
    with pytest.raises(ValueError, match="Drop fp32_cache=True"):
        optimize_for_inference(StableLmForCausalLM(tiny_config()), fp32_cache=True)


def test_optimize_for_inference_prepares_a_model_built_by_hand(kernel_calls):
    model = optimize_for_inference(StableLmForCausalLM(tiny_config()).to(torch.bfloat16).train())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    with torch.no_grad():
        model(_ids(1, 1))
    assert bool(kernel_calls) == (plan(torch.bfloat16, 128, 128, False, 1) is not None)


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
    from stablelm.generation import stepper

    model = optimize_for_inference(StableLmForCausalLM(tiny_config()).to(torch.bfloat16), fp32_cache=True)
    caches = []
    make_cache = stepper.make_cache
    monkeypatch.setattr(stepper, "make_cache", lambda *a: caches.append(make_cache(*a)) or caches[-1])
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_compiled_decode_step_calls_the_kernels_over_the_same_weights(
    checkpoint, dtype, monkeypatch, capsys
):
    import stablelm.decode
    from stablelm.kernels import op

    monkeypatch.setattr(stablelm.decode, "_NOTICE_SHOWN", set())
    path, _ = checkpoint
    model = StableLmForCausalLM.from_pretrained(path, dtype=dtype)
    calls = []
    run = op.run_linear
    monkeypatch.setattr(op, "run_linear", lambda kind, *a: calls.append(kind) or run(kind, *a))
    ids = _ids(2, 5)
    eager = model.generate(ids, max_new_tokens=8, do_sample=False)
    compiled = model.generate(ids, max_new_tokens=8, do_sample=False, compile=True)
    assert capsys.readouterr().err == ""  # no fallback notice
    assert stablelm.decode.DecodeStep.for_model(model, compile=True).compile_seconds is not None
    # the graph calls the operator, which runs the kernel where one serves these shapes
    assert bool(calls) == (plan(dtype, 128, 128, False, 2) is not None)
    assert_same_or_parted_at_a_near_tie(model, eager, compiled)  # compiled: within rounding
