"""The planned eager decode step (`stablelm.lean_step`) gives the modules' logits bit for bit (and in
bfloat16 the reference's), on every instruction-set level of the kernels, and steps aside wherever it
would not: hooks, training mode, q/k norms, a float32 cache, autograd."""

from __future__ import annotations

import pytest
import torch
from conftest import make_pair, randomize_, reference_config, tiny_config, transformers
from test_kernels import (
    LEVELS,
    _run_isolated,
    isa,  # noqa: F401 - the fixture: each level this CPU has, forced
)

import stablelm
from stablelm import StableLmForCausalLM, kernels, lean_step
from stablelm.cache import StaticCache
from stablelm.decode import DecodeStep
from stablelm.kernels import rotation
from stablelm.quantization import QuantizationConfig, QuantizedLinear
from stablelm.rope import apply_rotary

VARIANTS = {
    "plain": dict(),
    "gqa-bias": dict(num_key_value_heads=2, use_qkv_bias=True),
    "mqa-parallel": dict(num_key_value_heads=1, use_parallel_residual=True),
    "tied-partial-rotary": dict(tie_word_embeddings=True, partial_rotary_factor=0.5),
}


@pytest.fixture
def lean_calls(monkeypatch):
    """How many decode steps the planned step ran."""
    calls = []
    run = lean_step.LeanStep.__call__

    def counting(self, *args):
        calls.append(self.rows)
        return run(self, *args)

    monkeypatch.setattr(lean_step.LeanStep, "__call__", counting)
    return calls


def _model(dtype=torch.bfloat16, **config):
    torch.manual_seed(0)
    model = StableLmForCausalLM(tiny_config(**{"max_position_embeddings": 64, **config}))
    randomize_(model)
    return model.to(dtype).eval()


def _generate(model, ids, mask=None, *, lean, new=10):
    DecodeStep.for_model(model, compile=False).lean = lean
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    DecodeStep.for_model(model, compile=False).lean = True
    return out.sequences, torch.stack(out.logits)


def _prompts():
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    return ids, mask


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.usefixtures("isa")
def test_the_planned_step_gives_the_modules_logits(variant, dtype, lean_calls):
    model = _model(dtype, **VARIANTS[variant])
    ids, mask = _prompts()
    for prompt, padding in [(ids[:1], None), (ids, mask)]:  # one row; a padded batch
        lean_calls.clear()
        tokens, logits = _generate(model, prompt, padding, lean=True)
        ran = len(lean_calls)
        modules_tokens, modules_logits = _generate(model, prompt, padding, lean=False)
        assert torch.equal(logits, modules_logits) and torch.equal(tokens, modules_tokens)
        assert len(lean_calls) == ran and ran in (0, 9)  # every decode step, or none; none with lean off
        if (
            dtype == torch.bfloat16 and kernels.selected_isa() == kernels.best_isa()
        ):  # torch's bf16 kernel is reproduced here
            assert ran == 9


@pytest.mark.parametrize("qtype", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.usefixtures("isa")
def test_quantized_models_decode_on_the_planned_step_with_the_modules_logits(qtype, dtype, lean_calls):
    # in_features multiples of 64: int4 (group 64) quantizes every layer, the head too
    model = _model(
        dtype, hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
        use_qkv_bias=True,
    )  # fmt: skip
    stablelm.quantize(model, QuantizationConfig(qtype, group_size=64))
    assert type(model.model.layers[0].self_attn.q_proj) is QuantizedLinear
    ids, mask = _prompts()
    for prompt, padding in [(ids[:1], None), (ids, mask)]:  # one row (outputs in place); three rows
        lean_calls.clear()
        tokens, logits = _generate(model, prompt, padding, lean=True)
        ran = len(lean_calls)
        modules_tokens, modules_logits = _generate(model, prompt, padding, lean=False)
        assert torch.equal(logits, modules_logits) and torch.equal(tokens, modules_tokens)
        assert ran == (9 if kernels.quant_library() is not None else 0)


def test_a_quantized_model_steps_aside_where_its_kernels_do_not_serve(lean_calls):
    model = _model(hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=4)
    stablelm.quantize(model, QuantizationConfig("int8"))
    assert not any(m.training for m in model.modules())  # quantizing a model in eval mode keeps it there
    if kernels.quant_library() is None:
        pytest.skip("no quantized kernels on this machine")
    assert lean_step.LeanStep.build(model, _cache(model), 1) is not None
    assert lean_step.LeanStep.build(model, _cache(model, 9), 9) is None  # rows past KERNEL_MAX_ROWS: tiles
    model.model.layers[1].mlp.down_proj.use_kernels = False  # torch's dequantized product asked for
    assert lean_step.LeanStep.build(model, _cache(model), 1) is None
    ids, _ = _prompts()
    want = _generate(model, ids[:1], lean=False)
    lean_calls.clear()
    got = _generate(model, ids[:1], lean=True)
    assert not lean_calls and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("variant", ["plain", "gqa-bias", "mqa-parallel"])
def test_bf16_decoding_on_the_planned_step_equals_the_references_logits(variant, tmp_path, lean_calls):
    torch.manual_seed(0)
    ref = transformers.StableLmForCausalLM._from_config(
        reference_config(tiny_config(max_position_embeddings=64, **VARIANTS[variant]))
    )
    randomize_(ref)
    ref.save_pretrained(tmp_path)
    ref = transformers.StableLmForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = StableLmForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids, mask = _prompts()
    tokens, logits = _generate(model, ids, mask, lean=True)
    want = ref.generate(
        ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    if not lean_calls:
        pytest.skip("no stablelm kernel reproduces torch's bf16 linear on this machine")
    assert torch.equal(tokens, want.sequences)
    assert torch.equal(logits, torch.stack(want.logits).float())


_AVX2_MACHINE = """
import torch
from stablelm import StableLmConfig, StableLmForCausalLM, kernels, lean_step
from stablelm.decode import DecodeStep
from stablelm.kernels import linear
linear.SPEED_CHECK = False
assert kernels.selected_isa() == "avx2", kernels.selected_isa()
torch.manual_seed(0)
config = StableLmConfig(vocab_size=128, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=2, use_qkv_bias=True, max_position_embeddings=64)
model = StableLmForCausalLM(config).to(torch.bfloat16).eval()
ids = torch.randint(0, 128, (2, 7))
calls = []
run = lean_step.LeanStep.__call__
lean_step.LeanStep.__call__ = lambda self, *a: calls.append(1) or run(self, *a)
outs = []
for lean in (True, False):
    DecodeStep.for_model(model, compile=False).lean = lean
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    outs.append(torch.stack(out.logits))
    print("lean", lean, "steps", len(calls))
assert torch.equal(outs[0], outs[1])
print("same logits")
"""


@pytest.mark.skipif("avx2" not in LEVELS, reason="needs an x86-64 CPU with AVX2 and FMA, and a C compiler")
def test_on_an_avx2_machine_the_planned_step_runs_and_gives_the_modules_logits():
    # torch as it runs on an AVX2-only CPU (its bf16 linear: ATen's kernel, which bf16_dot reproduces)
    env = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "STABLELM_ISA": "avx2"}
    out = _run_isolated(_AVX2_MACHINE, env)
    assert "lean True steps 7" in out and "lean False steps 7" in out and "same logits" in out, out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.usefixtures("isa")
def test_the_decode_qkv_kernel_rotates_and_writes_the_cache_as_torch(dtype):
    gen = torch.Generator().manual_seed(0)
    for B, H, Hkv, D, rot, slots, slot in [
        (1, 12, 12, 64, 16, 40, 17),
        (3, 8, 2, 32, 32, 9, 8),
        (2, 4, 1, 16, 2, 5, 0),
    ]:
        qkv = (torch.randn(B, (H + 2 * Hkv) * D, generator=gen) * 8).to(dtype)
        cos, sin = (torch.randn(B, 1, rot, generator=gen).to(dtype) for _ in range(2))
        kc, vc = (torch.randn(B, Hkv, slots, D, generator=gen).to(dtype) for _ in range(2))
        q_out = torch.empty(B, 1, H, D, dtype=dtype)
        want_k, want_v = kc.clone(), vc.clone()
        heads = qkv.view(B, 1, H + 2 * Hkv, D)
        q = apply_rotary(heads[:, :, :H], cos, sin, heads_dim=2)
        k = apply_rotary(heads[:, :, H : H + Hkv], cos, sin, heads_dim=2)
        position = torch.tensor([slot])
        want_k.index_copy_(2, position, k.transpose(1, 2))
        want_v.index_copy_(2, position, heads[:, :, H + Hkv :].transpose(1, 2))
        fn = rotation.decode_qkv_kernel(dtype)
        args = (cos.data_ptr(), sin.data_ptr(), q_out.data_ptr(), kc.data_ptr(), vc.data_ptr(), slots)
        assert fn(qkv.data_ptr(), qkv.shape[1], *args, slot, B, H, Hkv, D, rot) == 0
        assert torch.equal(q_out, q) and torch.equal(kc, want_k) and torch.equal(vc, want_v)
        assert fn(qkv.data_ptr(), qkv.shape[1], *args, slots, B, H, Hkv, D, rot) == 2  # past the cache


def _cache(model, rows=1, dtype=None):
    return StaticCache.for_model(
        model.config, batch_size=rows, max_cache_len=16, dtype=dtype or model.dtype, device="cpu"
    )


@pytest.mark.usefixtures("isa")
def test_the_step_is_planned_only_where_it_reproduces_the_modules():
    model = _model()
    if lean_step.LeanStep.build(model, _cache(model), 1) is None:
        pytest.skip("no stablelm kernel reproduces torch's bf16 linear on this level")
    assert lean_step.LeanStep.build(model, _cache(model, 2), 1) is None  # a cache of other rows
    assert lean_step.LeanStep.build(model, _cache(model, dtype=torch.float32), 1) is None  # fp32 cache
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    assert lean_step.LeanStep.build(model, _cache(model), 1) is None  # a hook must see its call
    handle.remove()
    model.train()
    assert lean_step.LeanStep.build(model, _cache(model), 1) is None  # dropout
    model.eval()
    model.model.layers[0].self_attn.o_proj.use_kernels = False
    assert lean_step.LeanStep.build(model, _cache(model), 1) is None  # torch's kernels asked for
    qk_norms = _model(qk_layernorm=True)
    assert lean_step.LeanStep.build(qk_norms, _cache(qk_norms), 1) is None
    step = lean_step.LeanStep.build(_model(), _cache(model), 1)
    token = torch.ones(1, 1, dtype=torch.long)
    with torch.no_grad():
        assert step.fits(_cache(model), token) and not step.fits(_cache(model), token.expand(2, 1))
    assert not step.fits(_cache(model), token)  # autograd on: the modules


@pytest.mark.usefixtures("isa")
def test_a_hook_added_between_generations_is_called_on_every_step(lean_calls):
    model = _model()
    ids = _prompts()[0][:1]
    _generate(model, ids, lean=True)
    seen = []
    model.model.layers[0].self_attn.register_forward_hook(lambda module, args, out: seen.append(1))
    lean_calls.clear()
    _generate(model, ids, lean=True)
    assert lean_calls == [] and len(seen) == 10  # the prompt's forward and each of 9 decode steps


def test_the_reference_pair_still_decodes_alike_with_kernels_off():
    # make_pair's models run torch's kernels: the planned step is not used, the modules' path is
    ours, ref = make_pair(tiny_config(max_position_embeddings=64))
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    ids = _prompts()[0][:1]
    assert lean_step.LeanStep.build(ours, _cache(ours), 1) is None
    kwargs = dict(max_new_tokens=8, do_sample=False)
    assert ours.generate(ids, **kwargs).tolist() == ref.generate(ids, **kwargs).tolist()


@pytest.mark.usefixtures("isa")
def test_generations_in_two_threads_on_one_model_keep_apart(lean_calls):
    # the plan's buffers are reused every step: each Python thread has its own plan
    import threading

    model = _model()
    ids = _prompts()[0]
    want = [_generate(model, ids[i : i + 1], lean=False, new=24)[1] for i in range(2)]
    got = [None, None]

    def run(i):
        for _ in range(3):
            got[i] = _generate(model, ids[i : i + 1], lean=True, new=24)[1]

    workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert lean_calls or lean_step.LeanStep.build(model, _cache(model), 1) is None


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("rows", [1, 3])
def test_a_planned_linear_call_equals_the_kernels_own(rows):
    gen = torch.Generator().manual_seed(0)
    ran = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        weights = [(torch.randn(n, 96, generator=gen) / 8).to(dtype) for n in (64, 32, 32)]
        biases = [torch.randn(n, generator=gen).to(dtype) for n in (64, 32, 32)]
        x = torch.randn(rows, 96, generator=gen).to(dtype)
        for kind in kernels.KINDS:
            fn = kernels.kernel(kind)
            if fn is None or kernels._DTYPES[kind] != dtype:
                continue
            if (kind == "bf16_dpbf16" and not kernels.has_dpbf16()) or (
                kind == "bf16_amx" and not {"amx_bf16", "amx_tile"} <= kernels.cpu_flags()
            ):
                continue  # compiled in, but not for this CPU (an AVX512-BF16 CPU without AMX, say)
            block = 32 if kind in ("bf16_amx", "bf16_dpbf16") else 0
            planned = lean_step._Kernel(fn, kind, weights, biases, block, rows, torch.get_num_threads())
            assert torch.equal(planned(x), kernels.run_linear(kind, x, weights, biases, block)), kind
            ran.append(kind)
    assert {"f32", "bf16_dot", "f16_dot"} <= set(ran)  # every level has these


@pytest.mark.usefixtures("isa")
def test_the_planned_step_follows_a_static_cache_that_grows(lean_calls):
    # past the model's context (16 positions here) the static cache grows as the generation goes on
    model = _model(max_position_embeddings=16)
    ids = _prompts()[0][:1]
    tokens, logits = _generate(model, ids, lean=True, new=20)
    ran = len(lean_calls)
    assert torch.equal(logits, _generate(model, ids, lean=False, new=20)[1])
    assert ran == 19 or lean_step.LeanStep.build(model, _cache(model), 1) is None


@pytest.mark.parametrize("variant", ["plain", "gqa-bias"])
@pytest.mark.usefixtures("isa")
def test_layers_no_kernel_serves_run_torchs_linear_inside_the_planned_step(variant, monkeypatch, lean_calls):
    # On a CPU where torch's kernel is as fast as ours for a shape (or none of ours gives its bits), the
    # plan keeps torch's F.linear for those layers and the rest of the step planned; it must not give up
    # the whole step (that cost ~3 ms a token on the 160M shape, 2 threads, AVX2 torch).
    model = _model(**VARIANTS[variant])
    ids, mask = _prompts()
    want = [
        _generate(model, prompt, padding, lean=False) for prompt, padding in [(ids[:1], None), (ids, mask)]
    ]
    mlp_in = model.config.intermediate_size
    real = lean_step.kernel_plan

    def no_kernel_for_some(dtype, k, n, bias, rows):  # the MLP's down projection and the head: torch's
        return None if k == mlp_in or n == model.config.vocab_size else real(dtype, k, n, bias, rows)

    monkeypatch.setattr(lean_step, "kernel_plan", no_kernel_for_some)
    if rotation.decode_qkv_kernel(torch.bfloat16) is None:
        pytest.skip("no planned step on this machine (no native kernels)")
    step = lean_step.LeanStep.build(model, _cache(model), 1)
    assert type(step.layers[0].down) is lean_step._TorchLinear and type(step.head) is lean_step._TorchLinear
    for (prompt, padding), (tokens, logits) in zip([(ids[:1], None), (ids, mask)], want, strict=True):
        lean_calls.clear()
        got_tokens, got_logits = _generate(model, prompt, padding, lean=True)
        assert len(lean_calls) == 9
        assert torch.equal(got_logits, logits) and torch.equal(got_tokens, tokens)
    monkeypatch.setattr(lean_step, "kernel_plan", lambda *args: None)  # no layer on a kernel at all
    step = lean_step.LeanStep.build(model, _cache(model), 1)
    assert all(type(c) is lean_step._TorchLinear for layer in step.layers for c in (layer.qkv, layer.gate_up))
    lean_calls.clear()
    got_tokens, got_logits = _generate(model, ids, mask, lean=True)
    assert (
        len(lean_calls) == 9 and torch.equal(got_logits, want[1][1]) and torch.equal(got_tokens, want[1][0])
    )
