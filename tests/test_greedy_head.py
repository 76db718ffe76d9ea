"""Greedy steps that pick their token from the head's int8 screen (`stablelm.greedy_head`) give torch's
argmax of the whole processed scores: the bound holds for every row, the choice equals `torch.argmax`
over `F.linear`'s logits (ties, banned ids, a partial last block, extreme scales), generations keep their
tokens, and the screen steps aside where it cannot serve."""

from __future__ import annotations

import copy
import math
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_, tiny_config
from test_kernels import (
    LEVELS,
    _run_isolated,
    isa,  # noqa: F401 - the fixture: each level this CPU has, forced
)

from stablelm import StableLmForCausalLM, greedy_head
from stablelm.decode import DecodeStep
from stablelm.greedy_head import GreedyHead
from stablelm.kernels import linear, quant_library, run_linear

pytestmark = pytest.mark.skipif(not LEVELS, reason="needs x86-64 Linux with AVX2 and FMA, and a C compiler")


@pytest.fixture(autouse=True)
def _kernels_as_planned(monkeypatch):
    # tiny heads: a kernel that reproduces torch is used even where torch's is as fast, so there is one
    monkeypatch.setattr(linear, "SPEED_CHECK", False)
    monkeypatch.setattr(linear, "_PLANS", {})


@pytest.fixture
def choices(monkeypatch):
    """Every decision of GreedyHead.choose: the token, or None where it left the step to the logits."""
    made = []
    choose = GreedyHead.choose

    def counting(self, x, banned):
        token = choose(self, x, banned)
        made.append(None if token is None else int(token))
        return token

    monkeypatch.setattr(GreedyHead, "choose", counting)
    return made


def _head(weight: torch.Tensor) -> GreedyHead:
    n, k = weight.shape
    found = linear.plan(torch.bfloat16, k, n, False, 1)
    if found is None or quant_library() is None:
        pytest.skip("no native bf16 kernel reproduces torch's linear here")
    return GreedyHead(weight.contiguous(), *found)


def _torch_choice(x: torch.Tensor, weight: torch.Tensor, banned=()) -> int:
    scores = F.linear(x, weight).float()[0]
    ids = [i for i in banned if 0 <= i < weight.shape[0]]
    if ids:
        scores[ids] = -math.inf
    return int(torch.argmax(scores))


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, k, generator=gen) * torch.exp2(torch.randint(-3, 4, (n, 1), generator=gen).float())
    return rows.to(torch.bfloat16)


def _cases(k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    yield torch.randn(1, k, generator=gen).bfloat16()
    yield (torch.randn(1, k, generator=gen) * 300).bfloat16()
    yield (torch.randn(1, k, generator=gen) * 1e-3).bfloat16()
    sparse = torch.zeros(1, k)
    sparse[0, torch.randint(0, k, (3,), generator=gen)] = torch.randn(3, generator=gen)
    yield sparse.bfloat16()


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("n, k", [(1000, 64), (4099, 160), (48, 96), (7, 64)])
def test_the_choice_is_torchs_argmax_and_the_bound_holds_for_every_row(n, k):
    weight = _weights(n, k, seed=n)
    weight[n // 3] = weight[n // 2]  # an exact tie between two rows far apart
    weight[n - 1] = weight[0]  # and one across the partial last block
    head = _head(weight)
    decided = 0
    for i, x in enumerate(_cases(k, seed=k)):
        logits = F.linear(x, weight).double()[0]
        for banned in (None, torch.tensor([int(torch.argmax(logits)), n + 5, -1])):
            ids = [] if banned is None else banned.tolist()
            token = head.choose(x, banned)
            if token is not None:
                decided += 1
                assert int(token) == _torch_choice(x, weight, ids), (i, ids)
            # the bound itself: every logit torch computes lies within e of the screen's score
            nx = float(x.double().norm()) * (1 + 1e-6)
            a = head._buffers()[0].double()
            e = 1.01 * (head.bound.double() * nx + head.tiny + head.tiny_per_x * nx) + a.abs() / 128
            finite = a != -math.inf
            assert bool(((logits - a).abs() <= e)[finite].all()), float(
                ((logits - a).abs() / e)[finite].max()
            )
    assert decided >= 6  # the ordinary cases are decided by the screen, not left to the logits


@pytest.mark.usefixtures("isa")
def test_ties_and_denormal_sized_inputs_keep_torchs_first_index():
    weight = _weights(64, 64, seed=1)
    weight[40:] = weight[8]  # 24 rows tie with row 8 (in four blocks)
    weight[8] *= 4  # now row 8 is far ahead where x favours it...
    weight[9] = weight[8]  # ...tied with row 9: the first of them, 8, is torch's answer
    x = weight[8:9].float().sign().bfloat16()
    head = _head(weight)
    assert int(head.choose(x, None)) == _torch_choice(x, weight) == 8
    assert int(head.choose(x, torch.tensor([8]))) == _torch_choice(x, weight, [8]) == 9
    # denormal bfloat16 inputs, which the AVX512-BF16 instruction (and oneDNN's kernel on large layers)
    # flushes to zero: the choice is the head kernel's argmax (on this tiny layer torch's own kernel does
    # not flush; the model's logits are the head kernel's either way)
    tiny = (x.float() * 2.0**-130).bfloat16()
    token = head.choose(tiny, None)
    full = run_linear(head.kind, tiny, [weight], [None], head.block).float()
    assert token is None or int(token) == int(torch.argmax(full))


@pytest.mark.usefixtures("isa")
def test_a_flat_head_or_an_input_not_finite_is_left_to_the_logits():
    weight = torch.ones(1024, 64, dtype=torch.bfloat16)  # every logit ties: all 64 blocks are candidates
    head = _head(weight)
    x = torch.ones(1, 64, dtype=torch.bfloat16)
    assert head.choose(x, None) is None
    one_row = _head(_weights(256, 64, seed=2))
    assert one_row.choose(torch.full((1, 64), math.inf).bfloat16(), None) is None
    assert one_row.choose(torch.full((1, 64), math.nan).bfloat16(), None) is None
    assert one_row.choose(torch.ones(1, 64), None) is None  # float32: not the head's dtype
    assert one_row.choose(torch.ones(2, 64, dtype=torch.bfloat16), None) is None  # two rows


def test_a_head_whose_weights_are_not_finite_gets_no_screen():
    weight = _weights(512, 64, seed=3)
    weight[7, 3] = math.inf
    found = linear.plan(torch.bfloat16, 64, 512, False, 1)
    if found is None or quant_library() is None:
        pytest.skip("no native bf16 kernel reproduces torch's linear here")
    with pytest.raises(ValueError, match="not finite"):
        GreedyHead(weight, *found)
    holder: dict = {}
    greedy_head.FORCE = True
    try:
        assert greedy_head.screen_for(holder, weight, *found) is None
        assert holder.get("refused") is not None  # not tried again for this weight
    finally:
        greedy_head.FORCE = None


def _model(vocab=1000, **config) -> StableLmForCausalLM:
    torch.manual_seed(0)
    model = StableLmForCausalLM(tiny_config(vocab_size=vocab, max_position_embeddings=96, **config))
    randomize_(model)
    return model.to(torch.bfloat16).eval()


def _greedy(model, ids, *, screen, **settings):
    greedy_head.FORCE = screen
    try:
        return model.generate(ids, max_new_tokens=12, do_sample=False, **settings)
    finally:
        greedy_head.FORCE = None


def _prompt(vocab=1000, length=9, seed=4):
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize(
    "settings",
    [
        dict(min_new_tokens=12),
        dict(suppress_tokens=None),  # filled below: the tokens greedy decoding writes
        dict(begin_suppress_tokens=None),
        dict(min_length=15, eos_token_id=[5, 6]),
    ],
    ids=["min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "min_length"],
)
def test_generations_keep_their_tokens_with_the_screen(settings, choices):
    model = _model()
    with torch.no_grad():  # the end token often wins: min_new_tokens and min_length must ban it
        model.lm_head.weight[5] = model.lm_head.weight[:40].float().mean(0).mul(6).bfloat16()
    ids = _prompt()
    plain = _greedy(model, ids, screen=False, eos_token_id=5)
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        if name in settings:
            settings = {name: plain[0, 9:13].tolist()}
    settings = {"eos_token_id": 5, **settings}
    expected = _greedy(model, ids, screen=False, **settings)
    assert choices == []
    got = _greedy(model, ids, screen=True, **settings)
    assert torch.equal(got, expected)
    assert len(choices) >= 1 and all(c is not None for c in choices)
    # and the modules' own step (no planned step, no screen) agrees
    DecodeStep.for_model(model, compile=False).lean = False
    try:
        assert torch.equal(_greedy(model, ids, screen=None, **settings), expected)
    finally:
        DecodeStep.for_model(model, compile=False).lean = True


@pytest.mark.usefixtures("isa")
def test_the_screen_serves_only_greedy_single_rows_that_keep_no_scores(choices):
    model = _model()
    ids = _prompt()
    greedy_head.FORCE = True
    try:
        model.generate(ids, max_new_tokens=4, do_sample=True, top_k=5)
        model.generate(
            ids, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        model.generate(torch.cat([ids, ids]), max_new_tokens=4, do_sample=False)
        model.generate(ids, max_new_tokens=4, do_sample=False, repetition_penalty=1.3)
        model.generate(ids, max_new_tokens=4, do_sample=False, logits_processor=[lambda i, s: s])
        assert choices == []
        model.generate(ids, max_new_tokens=4, do_sample=False)
        assert len(choices) == 3  # the first token comes from the prompt's forward
    finally:
        greedy_head.FORCE = None


@pytest.mark.usefixtures("isa")
def test_the_screen_steps_aside_where_it_does_not_pay(monkeypatch, choices):
    model = _model()
    ids = _prompt()
    monkeypatch.setattr(greedy_head, "PAYS", 0.0)  # the timing says no
    monkeypatch.setattr(greedy_head, "MIN_HEAD_BYTES", 0)
    expected = _greedy(model, ids, screen=False)
    assert torch.equal(_greedy(model, ids, screen=None), expected)
    assert choices == []
    monkeypatch.setattr(greedy_head, "PAYS", 1e9)  # and yes (a new model: timed afresh)
    fresh = copy.deepcopy(model)
    assert torch.equal(_greedy(fresh, ids, screen=None), expected)
    assert len(choices) == 11
    monkeypatch.setattr(greedy_head, "MIN_HEAD_BYTES", 1 << 40)  # a small head: never screened
    choices.clear()
    assert torch.equal(_greedy(copy.deepcopy(model), ids, screen=None), expected)
    assert choices == []


def _negate_in_place(weight):
    with torch.no_grad():
        weight.mul_(-1)  # same storage, a new version


def _scale_through_data(weight):
    weight.data[:, :8].mul_(-3)  # `.data` writes without counting a version: the digest sees them


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("edit", [_negate_in_place, _scale_through_data], ids=["in-place", "through-data"])
def test_a_changed_head_is_screened_afresh(edit, choices):
    model = _model()
    ids = _prompt()
    first = _greedy(model, ids, screen=True)
    holder = DecodeStep.for_model(model, compile=False)._screen
    before = holder["screen"]
    edit(model.lm_head.weight)
    expected = _greedy(model, ids, screen=False)
    assert not torch.equal(first, expected)
    assert torch.equal(_greedy(model, ids, screen=True), expected)
    assert holder["screen"] is not before
    again = holder["screen"]
    assert torch.equal(_greedy(model, ids, screen=True), expected)
    assert holder["screen"] is again  # unchanged values: the same screen


@pytest.mark.usefixtures("isa")
def test_copies_of_a_model_carry_no_screen_and_decode_alike(choices):
    model = _model()
    ids = _prompt()
    expected = _greedy(model, ids, screen=True)
    assert DecodeStep.for_model(model, compile=False)._screen.get("screen") is not None
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        steps = other.__dict__["_stablelm_decode_steps"]
        assert all(step._screen == {} for step in steps.values())
        assert torch.equal(_greedy(other, ids, screen=True), expected)


@pytest.mark.usefixtures("isa")
def test_a_screen_made_under_inference_mode_serves_outside_it(choices):
    model = _model()
    ids = _prompt()
    expected = _greedy(model, ids, screen=False)
    with torch.inference_mode():
        assert torch.equal(_greedy(model, ids, screen=True), expected)
    assert torch.equal(_greedy(model, ids, screen=True), expected)
    assert len(choices) == 22 and all(c is not None for c in choices)


@pytest.mark.usefixtures("isa")
def test_generations_in_two_threads_on_one_model_keep_apart(choices):
    model = _model()
    prompts = [_prompt(seed=s) for s in (5, 6)]
    expected = [_greedy(model, p, screen=False) for p in prompts]
    greedy_head.FORCE = True
    try:
        results: dict = {}

        def run(i):
            results[i] = [model.generate(prompts[i], max_new_tokens=12, do_sample=False) for _ in range(4)]

        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        greedy_head.FORCE = None
    for i in (0, 1):
        assert all(torch.equal(out, expected[i]) for out in results[i])
    assert len(choices) == 2 * 4 * 11


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_heads_not_in_bfloat16_are_not_screened(dtype, choices):
    model = _model().to(dtype)
    _greedy(model, _prompt(), screen=True)
    assert choices == []


_AVX2_MACHINE = """
import torch
from stablelm import StableLmConfig, StableLmForCausalLM, greedy_head, kernels
from stablelm.greedy_head import GreedyHead
from stablelm.kernels import linear
linear.SPEED_CHECK = False
assert kernels.selected_isa() == "avx2", kernels.selected_isa()
torch.manual_seed(0)
config = StableLmConfig(vocab_size=1000, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
model = StableLmForCausalLM(config).to(torch.bfloat16).eval()
ids = torch.randint(0, 1000, (1, 7))
made = []
choose = GreedyHead.choose
GreedyHead.choose = lambda self, x, b: made.append(1) or choose(self, x, b)
outs = []
for force in (False, True):
    greedy_head.FORCE = force
    outs.append(model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False))
print("screened", len(made))
assert torch.equal(outs[0], outs[1])
print("same tokens")
"""


@pytest.mark.skipif("avx2" not in LEVELS, reason="needs an x86-64 CPU with AVX2 and FMA, and a C compiler")
def test_on_an_avx2_machine_greedy_steps_are_screened_with_the_same_tokens():
    # torch as it runs on an AVX2-only CPU: its bf16 linear is ATen's, which bf16_dot reproduces
    env = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "STABLELM_ISA": "avx2"}
    out = _run_isolated(_AVX2_MACHINE, env)
    assert "screened 7" in out and "same tokens" in out, out
