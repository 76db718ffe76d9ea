"""The server's forward (`stablelm.serve.forward`) and engine, in this process, without HTTP: a row's
numbers are the same bit for bit alone and in any batch, and the forward computes what the model's own
forward computes, for every config variant."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import randomize_, rope_scaling_for, tiny_config

import stablelm
from stablelm.cache import DynamicCache
from stablelm.fast import optimize_for_inference
from stablelm.quantization.linear import QuantizedLinear
from stablelm.serve import Engine, Event, Job, SamplingOptions
from stablelm.serve.forward import RowForward, _RowLinear

pytestmark = pytest.mark.usefixtures("plans_of_the_session")  # see conftest

DTYPES = [torch.float32, torch.bfloat16]
VARIANTS = {
    "default": {},
    "parallel_residual": {"use_parallel_residual": True},
    "qk_layernorm": {"qk_layernorm": True},
    "qkv_bias": {"use_qkv_bias": True},
    "rotary_half_gqa": {"partial_rotary_factor": 0.5, "num_key_value_heads": 2},
    "gelu": {"hidden_act": "gelu"},
    **{
        f"rope_{kind}": {"rope_scaling": rope_scaling_for(kind, 4)}
        for kind in ("linear", "dynamic", "yarn", "longrope", "llama3")
    },
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a shared machine, OpenMP's spinning threads make tiny products 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(dtype: torch.dtype, **overrides) -> stablelm.StableLmForCausalLM:
    config = tiny_config(max_position_embeddings=64, **overrides)
    torch.manual_seed(0)
    model = stablelm.StableLmForCausalLM(config)
    randomize_(model, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(4)  # logits of a few units: greedy picks away from ties
    return optimize_for_inference(model.to(dtype))


def prefilled(forward: RowForward, prompt: list[int], chunk: int = 5):
    cache = forward.new_cache(forward.context)
    for start in range(0, len(prompt), chunk):
        hidden = forward.prefill(cache, prompt[start : start + chunk], prompt_length=len(prompt))
    return cache, hidden


PROMPTS = [
    [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46],
    [26, 43],
    [38, 32, 79, 50, 28, 84, 19],
    [71],
    [69, 39, 93, 75, 10, 58, 20, 97, 49, 44, 59, 23, 7],
    [81, 64, 6, 28],
    [62, 8, 99, 86, 28, 3],
    [48, 25, 34, 21, 17],
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(96, 128, False), (37, 70, True), (128, 300, False)])
def test_row_linear_gives_each_row_the_same_bits_for_any_row_count(dtype, shape):
    n, k, bias = shape
    torch.manual_seed(0)
    layers = tuple(stablelm.layers.Linear(k, n, bias=bias).to(dtype) for _ in range(3))
    group = _RowLinear(layers)
    assert group.calls is not None  # a batched kernel serves (no call per row)
    x = torch.randn(20, k).to(dtype)
    with torch.inference_mode():
        alone = torch.cat([group(x[r : r + 1]) for r in range(20)])
        for rows in (2, 3, 5, 8, 16, 17, 20):
            assert torch.equal(group(x[:rows]), alone[:rows]), rows
        # and the same products as torch's, within rounding
        reference = torch.cat(
            [
                torch.nn.functional.linear(
                    x.float(), m.weight.float(), None if m.bias is None else m.bias.float()
                )
                for m in layers
            ],
            -1,
        )
        assert torch.allclose(
            alone.float(),
            reference,
            rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
            atol=1e-2 if dtype == torch.bfloat16 else 1e-5,
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_logits_are_bit_identical_alone_and_in_any_batch(variant, dtype):
    model = tiny_model(dtype, **VARIANTS[variant])
    with torch.inference_mode():
        forward = RowForward(model)
        assert forward.invariant_kernels
        assert_rows_alone_equal_rows_in_batches(forward)


def assert_rows_alone_equal_rows_in_batches(forward: RowForward) -> list[list[torch.Tensor]]:
    """Each prompt alone, then three decode steps; the same rows in batches of 2..8 (rows of different
    lengths, so at different positions) give the same logits bit for bit. Returns the lone rows' logits."""
    alone = []
    for prompt in PROMPTS:
        cache, _ = prefilled(forward, prompt)
        assert cache.dtype == forward.dtype
        alone.append([forward.decode([cache], [t])[0] for t in (5, 6, 7)])
    for size in (2, 3, 5, 8):
        for first in range(0, len(PROMPTS), size):
            group = list(range(first, min(first + size, len(PROMPTS))))
            caches = [prefilled(forward, PROMPTS[i])[0] for i in group]
            for step, token in enumerate((5, 6, 7)):
                logits = forward.decode(caches, [token] * len(group))
                for row, i in enumerate(group):
                    assert torch.equal(logits[row], alone[i][step]), (size, i, step)
    return alone


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_the_models_own_forward(variant, dtype):
    """A prompt prefilled in one chunk, then decoded a token at a time, gives the logits of the model's own
    forward over a cache (bit for bit in bfloat16, where the kernels are torch's; float32 products run on
    stablelm's `f32` kernel here, within rounding of torch's); prefilled in chunks, those of one forward
    over the whole sequence, within rounding."""
    model = tiny_model(dtype, **VARIANTS[variant])
    prompt, extra = PROMPTS[4], [5, 6, 7, 8]
    with torch.inference_mode():
        forward = RowForward(model)
        cache, hidden = prefilled(forward, prompt, chunk=len(prompt))
        stepped = [forward.logits(hidden)[0]] + [forward.decode([cache], [t])[0] for t in extra]
        past = DynamicCache()
        own = [model(torch.tensor([prompt]), past_key_values=past, logits_to_keep=1).logits[0, -1].float()]
        own += [model(torch.tensor([[t]]), past_key_values=past).logits[0, -1].float() for t in extra]
        for i, (ours, theirs) in enumerate(zip(stepped, own, strict=True)):
            if dtype == torch.bfloat16:
                assert torch.equal(ours, theirs), (i, (ours - theirs).abs().max())
            else:
                assert torch.allclose(ours, theirs, atol=2e-5, rtol=0), (i, (ours - theirs).abs().max())
        full = model(torch.tensor([prompt + extra])).logits[0].float()
        cache, hidden = prefilled(forward, prompt, chunk=4)
        chunked = [forward.logits(hidden)[0]] + [forward.decode([cache], [t])[0] for t in extra]
    tolerance = 0.25 if dtype == torch.bfloat16 else 1e-4  # bf16: a few units in the last place of ~5
    for i, logits in enumerate(chunked):
        expected = full[len(prompt) - 1 + i]
        assert torch.allclose(logits, expected, atol=tolerance, rtol=0), (i, (logits - expected).abs().max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_equal_generate_in_float32(variant):
    model = tiny_model(torch.float32, **VARIANTS[variant])
    prompt = PROMPTS[0]
    with torch.inference_mode():
        expected = model.generate(
            torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None
        )
        forward = RowForward(model)
        cache, hidden = prefilled(forward, prompt, chunk=4)
        logits, tokens = forward.logits(hidden)[0], []
        for _ in range(30):
            tokens.append(int(logits.argmax()))
            logits = forward.decode([cache], [tokens[-1]])[0]
    assert tokens == expected[0, len(prompt) :].tolist()


def assert_planned_step_gives_the_modules_bits(forward: RowForward) -> None:
    """The planned decode step (`stablelm.serve.planned`) and the modules' step, from copies of the same
    caches (prompts of different lengths), give the same logits and write the same keys and values, bit
    for bit, for a row alone and in batches."""
    planned = forward.planned
    assert planned is not None
    for group in ([0], [4, 1, 3], list(range(len(PROMPTS)))):
        caches = [prefilled(forward, PROMPTS[i])[0] for i in group]
        copies = [cache.copy() for cache in caches]
        for token in (5, 6, 7):
            forward.planned = planned
            ours = forward.decode(caches, [token] * len(group))
            forward.planned = None
            theirs = forward.decode(copies, [token] * len(group))
            assert torch.equal(ours, theirs), (group, token)
        forward.planned = planned
        for cache, copy in zip(caches, copies, strict=True):
            assert cache.length == copy.length
            for a, b in zip(cache.keys + cache.values, copy.keys + copy.values, strict=True):
                assert torch.equal(a[:, :, : cache.length], b[:, :, : cache.length])


PLANNED_VARIANTS = [v for v in VARIANTS if v != "qk_layernorm"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", PLANNED_VARIANTS)
def test_the_planned_decode_step_gives_the_modules_bits(variant, dtype):
    model = tiny_model(dtype, **VARIANTS[variant])
    with torch.inference_mode():
        assert_planned_step_gives_the_modules_bits(RowForward(model))


def test_the_planned_step_runs_the_native_attention_kernel_where_it_is_planned(monkeypatch):
    """Where the native attention kernel reproduces SDPA (AVX2 and AMD CPUs) both steps run it; forced
    here (on a CPU where it is not planned both run SDPA), the two still agree bit for bit."""
    from stablelm.kernels import attention as native

    if native.kernel() is None:
        pytest.skip("no native attention kernel on this machine (no C compiler or no AVX2)")
    calls = []

    def plan(*args):
        calls.append(args)
        return native.kernel()

    monkeypatch.setattr(native, "plan", plan)
    model = tiny_model(torch.bfloat16, num_key_value_heads=2)
    with torch.inference_mode():
        assert_planned_step_gives_the_modules_bits(RowForward(model))
    assert calls


def test_the_planned_step_is_made_only_where_it_reproduces_the_modules():
    with torch.inference_mode():
        assert RowForward(tiny_model(torch.bfloat16)).planned is not None
        assert RowForward(tiny_model(torch.bfloat16, qk_layernorm=True)).planned is None
        eager = tiny_model(torch.bfloat16)
        eager.config.attn_implementation = "eager"
        assert RowForward(eager).planned is None
        hooked = tiny_model(torch.bfloat16)
        seen = []
        hooked.model.layers[1].mlp.register_forward_hook(lambda *args: seen.append(1))
        forward = RowForward(hooked)
        assert forward.planned is None
        cache, _ = prefilled(forward, PROMPTS[0])
        forward.decode([cache], [5])
        assert seen  # the hook ran: the modules' step


QUANT_TYPES = ["int8", "int4"]


def quantized_model(dtype: torch.dtype, quant_type: str) -> stablelm.StableLmForCausalLM:
    """The tiny model with its own head (quantized too, as a 3B checkpoint's is), weight-only quantized."""
    model = tiny_model(dtype, intermediate_size=128, tie_word_embeddings=False)
    return stablelm.quantize(model, {"quant_type": quant_type, "group_size": 64})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantized_layers_give_each_row_the_same_bits_for_any_row_count(quant_type, dtype):
    """Quantized layers are batched on their kernels of 2-8 rows (not a call per row), a lone row beside a
    copy of itself, and every row comes out the same for any row count, within the format's rounding of
    the dequantized weights' products."""
    torch.manual_seed(0)
    layers = tuple(
        QuantizedLinear.from_dense(torch.randn(n, 128).to(dtype), None, quant_type=quant_type, group_size=64)
        for n in (96, 64)
    )
    group = _RowLinear(layers)
    assert group.quantized
    x = torch.randn(20, 128).to(dtype)
    with torch.inference_mode():
        alone = torch.cat([group(x[r : r + 1]) for r in range(20)])
        for rows in (2, 3, 5, 8, 9, 16, 17, 20):
            assert torch.equal(group(x[:rows]), alone[:rows]), rows
        reference = torch.cat([x.float() @ m.dequantized(torch.float32).T for m in layers], -1)
    assert torch.allclose(alone.float(), reference, rtol=2e-2, atol=5e-2 if dtype == torch.bfloat16 else 1e-4)


def test_quantized_layers_whose_kernels_were_switched_off_after_planning_are_refused_not_mixed():
    """A row must not silently change kernels mid-server (its bits would change): a clear error instead."""
    torch.manual_seed(0)
    layer = QuantizedLinear.from_dense(torch.randn(64, 128), None, quant_type="int8")
    group = _RowLinear((layer,))
    assert group.quantized
    layer.use_kernels = False
    with torch.inference_mode(), pytest.raises(RuntimeError, match="quantized kernels refused"):
        group(torch.randn(3, 128))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_a_quantized_models_rows_are_bit_identical_alone_and_in_any_batch(quant_type, dtype):
    """`serve --quantize`: every layer batched (a lone row too), the cache in the model's dtype (not the
    quantized head's), a row's logits the same alone and in batches of 2-8, and the model's own forward's
    within rounding (its one-row kernels sum in another order)."""
    model = quantized_model(dtype, quant_type)
    with torch.inference_mode():
        forward = RowForward(model)
        assert forward.invariant_kernels and forward.dtype == dtype
        alone = assert_rows_alone_equal_rows_in_batches(forward)
        assert_planned_step_gives_the_modules_bits(forward)
        prompt = PROMPTS[0]
        past = DynamicCache()
        own = model(torch.tensor([prompt]), past_key_values=past, logits_to_keep=1).logits[0, -1].float()
        own_next = model(torch.tensor([[5]]), past_key_values=past).logits[0, -1].float()
    tolerance = 0.25 if dtype == torch.bfloat16 else 1e-3
    cache_logits = alone[0][0]
    assert torch.allclose(cache_logits, own_next, atol=tolerance, rtol=0), (
        (cache_logits - own_next).abs().max()
    )
    assert own.isfinite().all()


# --- the engine: scheduling does not change a request's tokens or logprobs --------------------------------


class _Tokenizer:
    """Enough of a tokenizer for the engine: every id decodes to one letter."""

    eos_token_id = None

    class backend_tokenizer:  # noqa: N801 - the attribute the streaming detokenizer reads
        @staticmethod
        def decode(ids, skip_special_tokens=False):  # noqa: ANN001, ANN205
            return "".join(chr(97 + i % 26) for i in ids)

    @staticmethod
    def _cleans_up(value):  # noqa: ANN001, ANN205
        return False


def run_engine(model, jobs_spec, *, max_batch=8, stagger=False):
    """Run jobs (prompt, options) through an engine; return each job's events."""
    engine = Engine(
        lambda: SimpleNamespace(model=model, tokenizer=_Tokenizer()),
        max_batch=max_batch,
        max_queue=64,
        prefill_chunk=4,
    )
    engine.start()
    while engine.state == "loading":
        threading.Event().wait(0.01)
    results, done = [[] for _ in jobs_spec], threading.Semaphore(0)

    def sink_for(i, n):
        def sink(event):
            results[i].append(event)
            if (
                isinstance(event, Event)
                and event.finish_reason
                and sum(e.finish_reason is not None for e in results[i]) == n
            ):
                done.release()

        return sink

    for i, (prompt, options) in enumerate(jobs_spec):
        engine.submit([Job(prompt, 1, options, frozenset(), sink_for(i, 1))])
        if stagger:  # arrive while the others are decoding
            while not results[i]:
                threading.Event().wait(0.005)
    for _ in jobs_spec:
        assert done.acquire(timeout=60)
    engine.stop()
    engine.join(10)
    return results


def summary(events):
    return [
        (e.tokens, [(lp.token, lp.logprob, lp.top) for lp in e.logprobs or []], e.finish_reason)
        for e in events
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_engine_gives_a_request_the_same_tokens_and_logprobs_alone_and_among_others(dtype):
    model = tiny_model(dtype)
    greedy = SamplingOptions(max_tokens=12, temperature=0.0, logprobs=3)
    seeded = SamplingOptions(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, logprobs=2)
    alone = [run_engine(model, [(PROMPTS[0], o)])[0] for o in (greedy, seeded)]
    others = [
        (p, SamplingOptions(max_tokens=3 + 2 * i, temperature=0.0 if i % 2 else 1.0))
        for i, p in enumerate(PROMPTS[1:])
    ]
    for stagger in (False, True):
        mixed = run_engine(
            model,
            [others[0], (PROMPTS[0], greedy), *others[1:4], (PROMPTS[0], seeded), *others[4:]],
            stagger=stagger,
        )
        assert summary(mixed[1]) == summary(alone[0][:]) and summary(mixed[5]) == summary(alone[1]), stagger
    assert len(alone[0]) == 12 and alone[0][-1].finish_reason == "length"


def test_a_short_last_piece_of_a_prompt_joins_the_chunk_before_it(monkeypatch):
    # prefill_chunk=4: a last piece of at most 1 token (a quarter) is not a step of its own, which would
    # cost every running row a decode step for one prompt token
    chunks = []
    real = RowForward.prefill

    def prefill(self, cache, chunk, **kwargs):
        chunks.append(len(chunk))
        return real(self, cache, chunk, **kwargs)

    monkeypatch.setattr(RowForward, "prefill", prefill)
    model = tiny_model(torch.float32)
    options = SamplingOptions(max_tokens=1, temperature=0.0)
    for length, expected in ((4, [4]), (5, [5]), (6, [4, 2]), (9, [4, 5]), (10, [4, 4, 2])):
        chunks.clear()
        run_engine(model, [(list(range(1, length + 1)), options)])
        assert chunks == expected, length
