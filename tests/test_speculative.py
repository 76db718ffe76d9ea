"""Speculative decoding: the tokens of plain decoding at greedy (ours and the reference's, also the
reference's own prompt lookup and assisted generation), the model's distribution when sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import make_pair, reference_config, tiny_config

import stablelm
from stablelm import StableLmForCausalLM, set_seed
from stablelm.generation import StopStringChecker, generate, resolve_config
from stablelm.generation.drafts import MAX_SKIP, AssistantDraft, PromptLookup
from stablelm.generation.speculative import Draft, Drafter, Tokens

VOCAB = 128
CONFIGS = {
    "mha": dict(),
    "gqa": dict(num_key_value_heads=2),
    "qkln-parallel": dict(num_key_value_heads=2, qk_layernorm=True, use_parallel_residual=True),
}


def peaked_pair(scale=8.0, seed=0, **kw):
    """Ours and the reference on the same random weights, the LM head scaled so that no two logits are
    within rounding of each other (see test_generation.peaked_pair)."""
    ours, ref = make_pair(tiny_config(max_position_embeddings=128, **kw), seed=seed)
    with torch.no_grad():
        ours.lm_head.weight.mul_(scale)
        ref.lm_head.weight.mul_(scale)
    return ours, ref


def truncated(model, layers: int):
    """A copy of `model` with only its first `layers` decoder layers (the final norm and head kept)."""
    config = tiny_config(**{**model.config.to_dict(), "num_hidden_layers": layers})
    small = type(model)(config).eval()
    wanted = small.state_dict().keys()
    small.load_state_dict({k: v for k, v in model.state_dict().items() if k in wanted}, strict=True)
    return small


def _prompt(length=12, seed=0, vocab=VOCAB):
    return torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def _random_model(dtype=torch.bfloat16, **kw):
    """A tiny model of random weights (128 positions) in `dtype`, in eval mode."""
    from conftest import randomize_

    model = StableLmForCausalLM(tiny_config(max_position_embeddings=128, **kw)).eval()
    randomize_(model)
    return model.to(dtype)


def _prefilled(model, ids, length, slots=128):
    """A static cache of `slots` holding the model's keys and values of ids[:, :length]."""
    from stablelm.cache import StaticCache

    dtype = model.model.embed_tokens.weight.dtype  # (the head's may be quantized)
    cache = StaticCache.for_model(model.config, batch_size=1, max_cache_len=slots, dtype=dtype, device="cpu")
    model(ids[:, :length], past_key_values=cache)
    return cache


def _decoded_one_by_one(model, ids, start, end, slots=128):
    """The logits (end - start, V) of decoding ids[:, start:end] one token at a time after the rest."""
    steps = _prefilled(model, ids, start, slots)
    return torch.cat([model(ids[:, i : i + 1], past_key_values=steps).logits[0] for i in range(start, end)])


class Oracle(Drafter):
    """Drafts plain decoding's own continuation (of `truth`, given the sequence so far), with one wrong
    token at a position that moves each round (also past the draft: all kept) unless not `corrupt`, so
    every number of kept tokens and every rollback length occurs."""

    overshoot = 6

    def __init__(self, truth: list[int], prompt_length: int, sizes=(0, 1, 3, 6, 4, 2, 5), corrupt=True):
        super().__init__()
        self.truth, self.prompt_length, self.sizes, self.round = truth, prompt_length, sizes, 0
        self.corrupt = corrupt

    def propose(self, seq, limit, plan, generator):
        size = self.sizes[self.round % len(self.sizes)] if limit > 0 else 0
        wrong = self.round % (size + 2) if self.corrupt else size  # >= size: nothing wrong
        self.round += 1
        done = seq.length - self.prompt_length
        tokens = list(self.truth[done : done + size])
        if wrong < len(tokens):
            tokens[wrong] = (tokens[wrong] + 1) % VOCAB
        return Draft(torch.tensor(tokens, dtype=torch.long), None)


# ---- greedy: the tokens of plain decoding ----------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_prompt_lookup_greedy_gives_plain_greedy_and_the_references_tokens(name, cache):
    ours, ref = peaked_pair(**CONFIGS[name])
    ids = _prompt()
    kw = dict(max_new_tokens=40, eos_token_id=None)
    plain = ours.generate(ids, **kw)
    fast = ours.generate(ids, prompt_lookup_num_tokens=5, cache_implementation=cache, **kw)
    assert fast.tolist() == plain.tolist() == ref.generate(ids, **kw).tolist()
    assert fast.tolist() == ref.generate(ids, prompt_lookup_num_tokens=5, **kw).tolist()
    draft = PromptLookup(num_tokens=5)
    generate(ours, ids, config=resolve_config(ours, None, **kw), draft=draft)
    assert draft.stats.accepted > 5 and draft.stats.passes < 40  # the drafts were used, not only checked


def _lookup_rounds(greedy: bool, kept: list[int]) -> list[int]:
    """Draft lengths of a PromptLookup(num_tokens=6) over a sequence whose every 2-gram recurs, the model
    keeping kept[i] tokens of round i's draft (capped at its length)."""
    from types import SimpleNamespace

    plan = SimpleNamespace(params=SimpleNamespace(greedy=greedy), eos=None)
    ids = torch.tensor(list(range(1, 9)) * 8)
    seq = Tokens(ids, 18, 0, None)
    draft = PromptLookup(num_tokens=6)
    draft.start(plan, seq)
    lengths = []
    for keep in kept:
        k = len(draft.propose(seq, 100, plan, None).tokens)
        lengths.append(k)
        draft.observe(k, min(k, keep))
    return lengths


def test_greedy_prompt_lookup_shortens_and_skips_drafts_that_fail():
    # a draft kept whole grows the next by 2 (to num_tokens); one kept in part caps the next at twice
    # its kept part plus one; drafts that keep nothing also skip 1, 2, ... (at most MAX_SKIP) rounds
    assert _lookup_rounds(True, [9, 9, 2, 9, 0, 9, 0, 9, 9, 0, 9, 9, 9, 9, 9, 9]) == [
        6, 6, 6, 5, 6, 0, 1, 0, 0, 1, 0, 0, 0, 1, 3, 5,
    ]  # fmt: skip
    many = _lookup_rounds(True, [0] * 200)
    assert max(len(run) for run in "".join(map(str, many)).split("1")) == MAX_SKIP
    # sampling drafts as the reference does (its random draws follow the drafts' lengths)
    assert _lookup_rounds(False, [0, 0, 2, 6, 0]) == [6] * 5


def test_greedy_prompt_lookup_on_a_model_that_does_not_copy_drafts_little():
    ours, _ = peaked_pair(**CONFIGS["gqa"])
    ids = torch.tensor([[5, 6, 7, 8] * 6])  # every 2-gram recurs: a draft every round unless skipped
    config = resolve_config(ours, None, max_new_tokens=60, eos_token_id=None)
    plain = generate(ours, ids, config=config)
    adaptive, fixed = PromptLookup(num_tokens=8), _FixedLookup(num_tokens=8)
    for draft in (adaptive, fixed):
        assert generate(ours, ids, config=config, draft=draft).tolist() == plain.tolist()
    # the reference's schedule drafts up to 8 tokens a round, the model keeping few of them
    assert fixed.stats.drafted > 3 * fixed.stats.passes and fixed.stats.acceptance < 0.2
    assert adaptive.stats.drafted * 3 < fixed.stats.drafted
    assert adaptive.stats.acceptance > fixed.stats.acceptance


def test_rounds_without_a_draft_pick_their_token_from_the_heads_screen(monkeypatch):
    """Greedy prompt lookup's rounds that draft nothing run the one-token step with the head's int8 screen
    (`stablelm.greedy_head`), as plain greedy decoding does: the same tokens, with a banning processor
    (min_new_tokens) too; rounds with a draft, and generations that keep scores, compute every logit."""
    from stablelm import greedy_head

    monkeypatch.setattr(greedy_head, "FORCE", True)  # screen this small head (no timing)
    picks = []
    choose = greedy_head.GreedyHead.choose

    def counted(self, x, banned):
        token = choose(self, x, banned)
        picks.append((token, None if banned is None else banned.tolist()))
        return token

    monkeypatch.setattr(greedy_head.GreedyHead, "choose", counted)
    ours = _random_model(num_key_value_heads=2)  # bfloat16: the screen serves bfloat16 heads
    ids = torch.tensor([[5, 6, 7, 8] * 6])
    kw = dict(max_new_tokens=40, min_new_tokens=30, eos_token_id=3, pad_token_id=0)
    plain = ours.generate(ids, **kw)
    picks.clear()
    draft = PromptLookup(num_tokens=8)
    out = generate(ours, ids, config=resolve_config(ours, None, **kw), draft=draft)
    assert out.tolist() == plain.tolist()
    assert picks and all(token is not None for token, _ in picks)  # the screen decided those rounds
    assert any(banned == [3] for _, banned in picks)  # EOS banned before min_new_tokens
    assert len(picks) < draft.stats.passes - 1  # rounds with a draft (and the prompt's) did not use it
    picks.clear()
    kept = generate(
        ours, ids, config=resolve_config(ours, None, return_dict_in_generate=True, output_scores=True, **kw),
        draft=PromptLookup(num_tokens=8),
    )  # fmt: skip
    assert kept.sequences.tolist() == plain.tolist() and not picks  # scores kept: every logit computed


class _FixedLookup(PromptLookup):
    """Prompt lookup on the reference's schedule: every draft num_tokens long, none skipped."""

    def start(self, plan, seq):
        super().start(plan, seq)
        self.adaptive = False


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_every_rollback_length_gives_plain_greedy(cache):
    ours, _ = peaked_pair(**CONFIGS["gqa"])
    ids = _prompt()
    config = resolve_config(ours, None, max_new_tokens=45, eos_token_id=None, cache_implementation=cache)
    plain = generate(ours, ids, config=config)
    oracle = Oracle(plain[0, ids.shape[1] :].tolist(), ids.shape[1])
    assert generate(ours, ids, config=config, draft=oracle).tolist() == plain.tolist()
    assert 0 < oracle.stats.accepted < oracle.stats.drafted and oracle.stats.passes < 30


def test_assistant_greedy_gives_plain_greedy_and_the_references_assisted_tokens():
    ours, ref = peaked_pair(**CONFIGS["gqa"], num_hidden_layers=3)
    ours_small = truncated(ours, 1)
    ref_small = type(ref)._from_config(reference_config(ours_small.config), attn_implementation="sdpa").eval()
    ref_small.load_state_dict(ours_small.state_dict())
    ids = _prompt()
    kw = dict(max_new_tokens=30, eos_token_id=None)
    plain = ours.generate(ids, **kw)
    fast = ours.generate(ids, assistant_model=ours_small, **kw)
    assert fast.tolist() == plain.tolist() == ref.generate(ids, **kw).tolist()
    assert fast.tolist() == ref.generate(ids, assistant_model=ref_small, **kw).tolist()
    for confidence in (0.0, 0.4):
        draft = AssistantDraft(ours_small, num_tokens=4, confidence=confidence)
        assert (
            generate(ours, ids, config=resolve_config(ours, None, **kw), draft=draft).tolist()
            == plain.tolist()
        )
        assert 0 < draft.stats.accepted < draft.stats.drafted
    # The model as its own assistant: every draft token is kept.
    itself = AssistantDraft(ours, num_tokens=4, confidence=0.0)
    generate(ours, ids, config=resolve_config(ours, None, **kw), draft=itself)
    assert itself.stats.accepted == itself.stats.drafted > 20


# ---- stopping and streaming, token by token as plain decoding ---------------------------------------------


def test_eos_min_new_tokens_and_max_new_tokens_cut_a_kept_draft():
    ours, ref = peaked_pair(**CONFIGS["mha"])
    ids = _prompt(seed=2)
    free = generate(ours, ids, config=resolve_config(ours, None, max_new_tokens=30, eos_token_id=None))
    truth = free[0, ids.shape[1] :].tolist()
    eos = truth[7]  # reached inside a kept draft (held back by min_new_tokens in the second case)
    for kw in (
        dict(max_new_tokens=30, eos_token_id=eos),
        dict(max_new_tokens=30, eos_token_id=eos, min_new_tokens=truth.index(eos) + 1),
        dict(max_new_tokens=11, eos_token_id=None),
        dict(max_new_tokens=1, eos_token_id=None),
        dict(max_new_tokens=30, eos_token_id=[VOCAB - 1, eos], repetition_penalty=1.2),
    ):
        config = resolve_config(ours, None, **kw)
        plain = generate(ours, ids, config=config)
        truth = generate(ours, ids, config=config.updated(eos_token_id=None))[0, 12:].tolist()
        oracle = Oracle(truth, 12, sizes=(6,), corrupt=False)
        spec = generate(ours, ids, config=config, draft=oracle)
        assert spec.tolist() == plain.tolist() == ref.generate(ids, **kw).tolist(), kw
        assert ours.generate(ids, prompt_lookup_num_tokens=3, **kw).tolist() == plain.tolist(), kw


def test_stop_strings_end_inside_a_kept_draft():
    from pathlib import Path

    from stablelm import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(__file__).parent / "fixtures" / "gpt-neox-20b")
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
    ids = torch.tensor([tok.encode("The weather is")])
    config = resolve_config(model, None, max_new_tokens=16, eos_token_id=None)
    truth = generate(model, ids, config=config)[0, ids.shape[1] :].tolist()
    stop = tok.decode(truth[:6])[-3:]
    plain = model.generate(ids, max_new_tokens=16, eos_token_id=None, stop_strings=stop, tokenizer=tok)
    assert plain.shape[1] < ids.shape[1] + 16
    oracle = Oracle(truth, ids.shape[1], sizes=(8,), corrupt=False)
    spec = generate(model, ids, config=config, draft=oracle, stop_checker=StopStringChecker(tok, stop, 1))
    assert spec.tolist() == plain.tolist() and oracle.stats.accepted >= 5


def test_streamer_gets_each_token_in_order():
    ours, _ = peaked_pair()
    ids = _prompt()
    puts = []

    class Recorder:
        def put(self, value):
            puts.append(value.tolist())

        def end(self):
            puts.append("end")

    out = ours.generate(
        ids, max_new_tokens=30, eos_token_id=None, prompt_lookup_num_tokens=4, streamer=Recorder()
    )
    assert puts[0] == ids.tolist() and puts[-1] == "end"
    assert [p[0] for p in puts[1:-1]] == out[0, ids.shape[1] :].tolist()


def test_padded_single_prompt_gives_plain_tokens():
    ours, _ = peaked_pair()
    ids = _prompt()
    mask = torch.ones_like(ids)
    mask[:, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=30, eos_token_id=None)
    plain = ours.generate(ids, **kw)
    assert ours.generate(ids, prompt_lookup_num_tokens=4, **kw).tolist() == plain.tolist()
    assert ours.generate(ids, assistant_model=truncated(ours, 1), **kw).tolist() == plain.tolist()


# ---- sampling: the model's own distribution --------------------------------------------------------------


def test_prompt_lookup_sampling_draws_the_references_tokens_with_the_same_seed():
    """The reference samples every position of a checked draft at once, as we do: same draws, same text.
    (Not with top_p < 1: the reference also cuts a draft at the first token its processors forbid on
    uniform scores, which top_p does to some tokens; the distribution is the same, the draws are not.)"""
    ours, ref = peaked_pair(scale=3.0, vocab_size=16)
    ids = _prompt(vocab=16)
    for kw in (dict(), dict(temperature=0.7, top_k=5), dict(repetition_penalty=1.3, min_p=0.1)):
        kw = dict(max_new_tokens=25, eos_token_id=None, do_sample=True, prompt_lookup_num_tokens=4, **kw)
        for seed in (0, 1):
            set_seed(seed)
            a = ours.generate(ids, **kw)
            set_seed(seed)
            assert a.tolist() == ref.generate(ids, **kw).tolist(), (kw, seed)


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of `counts` against `probs` (cells of expected count < 5 pooled)."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double), stat / 2))


def _exact_first_two(model, ids, vocab, **sampling) -> torch.Tensor:
    """The model's own probabilities (vocab * vocab,) of the first two sampled tokens, from its logits."""
    from stablelm.sampling import SamplingParams, process_logits

    params = SamplingParams(do_sample=True, **sampling)
    with torch.no_grad():
        first = torch.softmax(process_logits(ours_logits(model, ids), ids, params), -1)[0]  # (V,)
        both = torch.cat([ids.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        second = torch.softmax(process_logits(ours_logits(model, both), both, params), -1)  # (V, V)
    return (first[:, None] * second).flatten()


def ours_logits(model, ids):
    return model(ids).logits[:, -1].float()


def test_speculative_sampling_follows_the_models_distribution():
    vocab = 6
    model, _ = peaked_pair(scale=3.0, vocab_size=vocab)
    assistant, _ = peaked_pair(scale=3.0, vocab_size=vocab, seed=1)
    ids = _prompt(length=5, vocab=vocab)
    sampling = dict(temperature=0.8, top_k=4)  # the processors shape both p and q
    exact = _exact_first_two(model, ids, vocab, **sampling)
    drafts = _exact_first_two(assistant, ids, vocab, **sampling)
    assert 0.5 * (exact - drafts).abs().sum() > 0.2  # the assistant's drafts are often refused
    config = resolve_config(model, None, max_new_tokens=3, eos_token_id=None, do_sample=True, **sampling)
    gen = torch.Generator().manual_seed(0)
    n = 1500
    draft = AssistantDraft(assistant, num_tokens=2, confidence=0.0)
    counts = torch.zeros(vocab * vocab)
    refused = 0
    for _ in range(n):
        out = generate(model, ids, config=config, generator=gen, draft=draft)[0, ids.shape[1] :]
        counts[out[0] * vocab + out[1]] += 1
        refused += draft.stats.drafted - draft.stats.accepted
    assert refused > n // 4  # the residual distribution was drawn from, often
    assert _chi_square_p(counts, exact) > 1e-3
    # The test can fail: keeping every draft token gives the assistant's distribution, which it rejects.
    naive = torch.bincount(torch.multinomial(drafts, n, replacement=True, generator=gen), minlength=vocab**2)
    assert _chi_square_p(naive, exact) < 1e-6


# ---- clear errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(prompt_lookup_num_tokens=0), ValueError, "prompt_lookup_num_tokens must be at least 1"),
        (dict(prompt_lookup_num_tokens="3"), TypeError, "prompt_lookup_num_tokens must be an integer"),
        (dict(prompt_lookup_num_tokens=3, max_matching_ngram_size=0), ValueError, "max_matching_ngram_size"),
        (
            dict(prompt_lookup_num_tokens=3, num_return_sequences=2, do_sample=True),
            ValueError,
            "one sequence",
        ),
        (dict(prompt_lookup_num_tokens=3, compile=True), ValueError, "compile=True"),
        (dict(assistant_model="small"), TypeError, "assistant_model must be a causal language model"),
        (dict(assistant_model="same", num_assistant_tokens=0), ValueError, "num_assistant_tokens"),
        (
            dict(assistant_model="same", assistant_confidence_threshold=1.5),
            ValueError,
            "confidence_threshold",
        ),
        (dict(assistant_model="same", prompt_lookup_num_tokens=3), ValueError, "Pass one of"),
        (dict(assistant_model="other-vocab"), ValueError, "assistant_model has a vocabulary of 64 tokens"),
    ],
)
def test_bad_settings_get_clear_errors(kwargs, error, message):
    ours, _ = peaked_pair()
    if kwargs.get("assistant_model") == "same":
        kwargs["assistant_model"] = ours
    elif kwargs.get("assistant_model") == "other-vocab":
        kwargs["assistant_model"] = StableLmForCausalLM(tiny_config(vocab_size=64)).eval()
    with pytest.raises(error, match=message):
        ours.generate(_prompt(), max_new_tokens=4, **kwargs)


def test_an_assistant_that_is_not_a_stablelm_causal_lm_is_refused_before_drafting():
    """transformers' model (whose forward cannot take stablelm's cache) and the bare backbone (no logits)
    are refused with what to pass instead, not with an AttributeError inside the drafting."""
    ours, ref = peaked_pair()
    for assistant, kind in (
        (ref, r"transformers\.models\..*StableLmForCausalLM"),
        (ours.model, "StableLmModel"),
    ):
        with pytest.raises(TypeError, match=f"causal language model of stablelm.*{kind}.*from_pretrained"):
            ours.generate(_prompt(), max_new_tokens=4, assistant_model=assistant)


def test_a_stablelm_assistant_under_peft_still_drafts():
    peft = pytest.importorskip("peft")
    ours, _ = peaked_pair()
    wrapped = peft.get_peft_model(truncated(ours, 1), peft.LoraConfig(r=2, target_modules=["q_proj"])).eval()
    kw = dict(max_new_tokens=12, eos_token_id=None)
    assert (
        ours.generate(_prompt(), assistant_model=wrapped, **kw).tolist()
        == ours.generate(_prompt(), **kw).tolist()
    )


def test_batches_and_embeddings_are_refused_clearly():
    ours, _ = peaked_pair()
    with pytest.raises(ValueError, match="one sequence at a time.*got 2 rows"):
        ours.generate(torch.cat([_prompt(), _prompt(seed=1)]), max_new_tokens=4, prompt_lookup_num_tokens=3)
    embeds = ours.model.embed_tokens(_prompt()).detach()
    with pytest.raises(ValueError, match="pass input_ids, not inputs_embeds"):
        ours.generate(inputs_embeds=embeds, max_new_tokens=4, assistant_model=ours)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_checking_a_draft_gives_the_decode_steps_logits(dtype):
    """One pass over several tokens, each row what decoding them one at a time gives: bit for bit in half
    precision, so that greedy speculative decoding makes plain decoding's tokens there too (one many-query
    attention call rounds differently, which parted the demo model's text from plain greedy's); within
    float32 rounding in float32, where a matrix product over several rows rounds differently from one row."""
    from stablelm.generation.speculative import Tokens, verify_logits

    model = _random_model(dtype, num_attention_heads=2, num_key_value_heads=2)
    ids = _prompt(length=100)
    with torch.no_grad():
        one_by_one = _decoded_one_by_one(model, ids, 90, 100)
        checked = verify_logits(
            model, _prefilled(model, ids, 90), Tokens(ids[0], 100, 0, None), 90, 100, plan=None
        )
    if dtype == torch.bfloat16:
        assert torch.equal(checked, one_by_one.float())
        # (whether one many-query pass would round otherwise depends on the CPU's kernels: it did on an AMX
        # Xeon, which is what the query-by-query attention is for; on an AVX2 EPYC it happened not to)
    else:
        torch.testing.assert_close(checked, one_by_one, rtol=0, atol=1e-5)


CHECKED = {
    **CONFIGS,
    "parallel": dict(use_parallel_residual=True),
    # K = 2560 (stablelm-3b-4e1t's width): torch's bf16 product over 4+ rows rounds otherwise than over one
    # on an AVX512-BF16 Zen 4 (oneDNN), which the planned check does not follow
    "wide": dict(hidden_size=2560, intermediate_size=256, num_attention_heads=20, num_key_value_heads=4,
                 num_hidden_layers=1),
    # ... and the modules' check (q/k layer norms: no planned step) at that width
    "wide-qkln": dict(hidden_size=2560, intermediate_size=256, num_attention_heads=20, num_key_value_heads=4,
                      num_hidden_layers=1, qk_layernorm=True),
}  # fmt: skip


@pytest.mark.parametrize("name", CHECKED)
def test_the_planned_check_gives_the_decode_steps_logits(name):
    """Speculative decoding's check on the planned step (`LeanStep.check_hidden`) where it serves the
    model: each row bit for bit what decoding the tokens one at a time gives (one row's kernels over all
    the rows, torch's product row by row where no kernel serves); q/k layer norms have no planned step
    (the modules' check runs, its linear layers on one row's plans too: `layers.one_row_bits`)."""
    from stablelm.generation.speculative import Tokens, verify_logits

    model = _random_model(**CHECKED[name])
    ids = _prompt(length=100)
    with torch.no_grad():
        one_by_one = _decoded_one_by_one(model, ids, 90, 100)
        seq = Tokens(ids[0], 100, 0, None)
        plans: dict = {}
        checked = _prefilled(model, ids, 90)
        planned = verify_logits(model, checked, seq, 90, 100, plan=None, lean=plans)
        with torch.enable_grad():  # autograd on: the modules run (torch's kernels, a graph)
            assert verify_logits(
                model, _prefilled(model, ids, 90), seq, 90, 100, plan=None, lean=plans
            ).requires_grad
    assert (plans[10] is None) == ("qkln" in name)
    assert torch.equal(planned, one_by_one.float())
    assert checked.get_seq_length() == 100
    if plans[10] is not None:
        with pytest.raises(ValueError, match="a check of 10 tokens of one sequence"):
            plans[10].check_hidden(checked, ids[0, :9], 90)
        with pytest.raises(ValueError, match="a check of 10 tokens from slot 120 needs 130 slots, not 128"):
            plans[10].check_hidden(checked, ids[0, 90:100], 120)


def _int4_modes() -> list[int]:
    """The int4 kernel modes this CPU runs (bits of `int4_mode`), each alone and together."""
    from stablelm.quantization import modes

    full = modes.int4_mode(torch.bfloat16)
    return [mode for mode in range(4) if not mode & ~full]


@pytest.mark.parametrize("shape", ["tiny", "wide", "wide-no-kernels"])
@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_the_check_of_a_quantized_model_gives_the_decode_steps_logits(qtype, shape):
    """Quantized layers in the check: each row bit for bit what the one-token step's kernel of one row
    gives it (the kernels of 2-8 rows sum otherwise, but for int4's VNNI ones; beyond 8 rows the layer
    would dequantize its weight for torch's product): on the planned step and on the modules, 3 rows
    and 11, every int4 kernel mode this CPU runs; without the kernels (ARM64, `use_kernels` off) the
    dequantized weight's product row by row."""
    from stablelm.generation.speculative import Tokens, verify_logits
    from stablelm.quantization import QuantizationConfig
    from stablelm.quantization import linear as qlinear
    from stablelm.quantization import modes as qmodes

    kw = CHECKED["wide"] if shape.startswith("wide") else dict(intermediate_size=128)  # K = 2560: the 3B's
    model = stablelm.quantize(_random_model(**kw), QuantizationConfig(qtype, group_size=64))
    kernels = shape != "wide-no-kernels"
    for module in model.modules():
        if type(module) is qlinear.QuantizedLinear:
            module.use_kernels = kernels
    layers = model.config.num_hidden_layers
    assert sum(type(m) is qlinear.QuantizedLinear for m in model.modules()) == 7 * layers + 1  # the head too
    ids = _prompt(length=100)
    for mode in _int4_modes() if qtype == "int4" else [None]:
        qmodes.FORCE_INT4_MODE = mode
        try:
            with torch.no_grad():
                for rows in (3, 11):
                    start, seq = 100 - rows, Tokens(ids[0], 100, 0, None)
                    one_by_one = _decoded_one_by_one(model, ids, start, 100).float()
                    for lean in ({}, None):  # the planned check, the modules' check
                        cache = _prefilled(model, ids, start)
                        checked = verify_logits(model, cache, seq, start, 100, plan=None, lean=lean)
                        assert torch.equal(checked, one_by_one), (mode, rows, lean)
                        if lean is not None:  # the planned step served the check where the kernels do
                            assert (lean[rows] is not None) == kernels
        finally:
            qmodes.FORCE_INT4_MODE = None


def test_the_planned_check_runs_torchs_attention_where_no_native_kernel_serves(monkeypatch):
    """Without the native attention kernel (no plan on this CPU), each of the check's queries runs torch's
    SDPA over the keys up to its own position, as the one-token step then does."""
    from stablelm.generation.speculative import Tokens, verify_logits
    from stablelm.kernels import attention as native_attention

    monkeypatch.setattr(native_attention, "plan", lambda *args: None)  # the step's and the modules' SDPA
    model = _random_model(num_key_value_heads=2)
    ids = _prompt(length=60)
    plans: dict = {}
    with torch.no_grad():
        one_by_one = _decoded_one_by_one(model, ids, 50, 60)
        planned = verify_logits(
            model, _prefilled(model, ids, 50), Tokens(ids[0], 60, 0, None), 50, 60, plan=None, lean=plans
        )
    assert plans[10] is not None and plans[10].attn is None
    assert torch.equal(planned, one_by_one.float())


def test_one_row_bits_gives_each_row_a_lone_rows_product():
    """`layers.one_row_bits`: a Linear's rows each get what a call on that row alone gives, also where no
    kernel serves (torch's product row by row); outside it (and with autograd on) the call is unchanged."""
    from stablelm.layers import _ONE_ROW, Linear, one_row_bits

    torch.manual_seed(0)
    layer = Linear(2560, 64, bias=True).to(torch.bfloat16)
    layer.use_kernels = False  # torch's product: the row-by-row path
    x = torch.randn(2, 6, 2560).to(torch.bfloat16)
    alone = torch.stack([torch.cat([layer(x[b, r : r + 1]) for r in range(6)]) for b in range(2)])
    with torch.no_grad(), one_row_bits():
        inside = layer(x)
        kernels = Linear(2560, 64, bias=False).to(torch.bfloat16)
        kernels.weight.copy_(layer.weight)
        by_kernel = kernels(x)  # the plan for one row (a kernel where one serves), over all 12 rows
        one = torch.stack([torch.cat([kernels(x[b, r : r + 1]) for r in range(6)]) for b in range(2)])
    assert torch.equal(inside, alone.detach()) and inside.shape == (2, 6, 64)
    assert torch.equal(by_kernel, one)
    assert _ONE_ROW.get() is False  # reset on leaving
    with one_row_bits():
        assert layer(x).requires_grad  # autograd on: torch's product over all rows, as always


def test_the_planned_check_runs_torchs_product_row_by_row_where_no_kernel_serves(monkeypatch):
    """Without a native kernel for a layer, the check calls torch's F.linear one row at a time (its
    product over several rows may round otherwise), and still gives the decode step's logits."""
    from stablelm import lean_step
    from stablelm.generation.speculative import Tokens, verify_logits

    monkeypatch.setattr(lean_step, "kernel_plan", lambda *args: None)  # torch's product for every layer
    calls = []
    real = lean_step.F.linear
    monkeypatch.setattr(lean_step.F, "linear", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    model = _random_model()
    ids = _prompt(length=40)
    with torch.no_grad():
        c = _prefilled(model, ids, 35, slots=64)
        calls.clear()
        planned = verify_logits(model, c, Tokens(ids[0], 40, 0, None), 35, 40, plan=None, lean={})
        assert calls and set(calls) == {1}
        monkeypatch.setattr(lean_step.F, "linear", real)
        one_by_one = _decoded_one_by_one(model, ids, 35, 40, slots=64)
    assert torch.equal(planned, one_by_one.float())


# ---- the rest of generate's interface ---------------------------------------------------------------------


def test_processors_and_stopping_criteria_as_plain_decoding():
    """The settings' processors, the caller's logits_processor (ours and the reference's objects) and
    stopping_criteria apply at each draft position as at that step of plain decoding."""
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor

    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids = _prompt()
    truth = ours.generate(ids, max_new_tokens=40, eos_token_id=None)[0, 12:].tolist()

    def length_ban(input_ids, scores):  # depends on how many tokens precede the position
        scores = scores.clone()
        scores[:, input_ids.shape[1] % VOCAB] = -float("inf")
        return scores

    def stop_at(input_ids, scores):
        return input_ids[:, -1] == truth[9]

    for kw in (
        dict(no_repeat_ngram_size=2, bad_words_ids=[[truth[3]]]),
        dict(logits_processor=[length_ban]),
        dict(logits_processor=LogitsProcessorList([NoRepeatNGramLogitsProcessor(3)])),
        dict(stopping_criteria=[stop_at]),
        dict(sequence_bias={(truth[5],): -50.0}, min_length=20, eos_token_id=truth[2]),
    ):
        kw = {"max_new_tokens": 40, "eos_token_id": None, **kw}
        plain = ours.generate(ids, **kw)
        if "stopping_criteria" in kw:
            # the criterion stops plain decoding at the stop token's first occurrence, not at the first step
            assert plain.shape[1] == 12 + truth.index(truth[9]) + 1 > 12 + 3
        else:
            assert plain.tolist() == ref.generate(ids, **kw).tolist(), kw
        assert ours.generate(ids, prompt_lookup_num_tokens=5, **kw).tolist() == plain.tolist(), kw
        small = truncated(ours, 1)
        assert ours.generate(ids, assistant_model=small, **kw).tolist() == plain.tolist(), kw
    # max_time: every row stops once the time is up, after the first token as in plain decoding.
    kw = dict(max_new_tokens=40, eos_token_id=None, max_time=0.0)
    assert ours.generate(ids, prompt_lookup_num_tokens=5, **kw).tolist() == ours.generate(ids, **kw).tolist()


def test_return_dict_in_generate_gives_plain_decodings_scores_logits_and_cache():
    ours, _ = peaked_pair(**CONFIGS["gqa"])
    ids = _prompt()
    kw = dict(
        max_new_tokens=30,
        eos_token_id=None,
        repetition_penalty=1.3,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    plain = ours.generate(ids, **kw)
    for spec in (
        ours.generate(ids, prompt_lookup_num_tokens=5, **kw),
        ours.generate(ids, assistant_model=truncated(ours, 1), **kw),
    ):
        assert spec.sequences.tolist() == plain.sequences.tolist()
        assert len(spec.scores) == len(spec.logits) == 30
        torch.testing.assert_close(torch.cat(spec.scores), torch.cat(plain.scores), rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.cat(spec.logits), torch.cat(plain.logits), rtol=0, atol=1e-4)
        assert spec.past_key_values.get_seq_length() == plain.past_key_values.get_seq_length() == 12 + 29
        # The returned cache holds the sequence's keys: continuing from it gives plain decoding's next token.
        nxt = ours.generate(spec.sequences, past_key_values=spec.past_key_values, max_new_tokens=1)
        assert nxt.tolist() == ours.generate(plain.sequences, max_new_tokens=1).tolist()


def test_speculative_fields_are_generation_config_fields():
    """Set in a generation config (ours, the reference's, a dict), not refused as unimplemented settings."""
    import transformers

    from stablelm.generation import GenerationConfig
    from stablelm.generation.config import UNSUPPORTED

    assert not {"prompt_lookup_num_tokens", "assistant_model", "num_assistant_tokens"} & set(UNSUPPORTED)
    ours, ref = peaked_pair()
    ids = _prompt()
    expected = ours.generate(ids, max_new_tokens=30, eos_token_id=None).tolist()
    for config in (
        GenerationConfig(prompt_lookup_num_tokens=4, max_matching_ngram_size=3, max_new_tokens=30),
        {"prompt_lookup_num_tokens": 4, "max_new_tokens": 30},
        transformers.GenerationConfig(prompt_lookup_num_tokens=4, max_new_tokens=30),
    ):
        out = ours.generate(ids, generation_config=config, eos_token_id=None)
        assert out.tolist() == expected
    saved = GenerationConfig(num_assistant_tokens=5, assistant_confidence_threshold=0.2).to_dict()
    assert saved == {"num_assistant_tokens": 5, "assistant_confidence_threshold": 0.2}
    ours.generation_config = GenerationConfig.from_dict({**saved, "prompt_lookup_num_tokens": 0})
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens must be at least 1"):
        ours.generate(ids, max_new_tokens=4)  # the model's own generation config is read too


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_beams=2), "num_beams=2"),
        (dict(use_cache=False), "use_cache=False"),
        (dict(compile=True), "compile=True"),
        (dict(past_key_values="cache"), "past_key_values"),
    ],
)
@pytest.mark.parametrize("drafting", ["prompt_lookup_num_tokens", "assistant_model"])
def test_settings_that_do_not_combine_with_drafting_are_refused_by_both_names(kwargs, message, drafting):
    from stablelm.cache import DynamicCache

    ours, _ = peaked_pair()
    ids = _prompt()
    if kwargs.get("past_key_values") == "cache":
        cache = DynamicCache()
        ours(ids[:, :5], past_key_values=cache)
        kwargs = dict(past_key_values=cache)
    draft = (
        {"prompt_lookup_num_tokens": 3}
        if drafting == "prompt_lookup_num_tokens"
        else {"assistant_model": ours}
    )
    with pytest.raises(ValueError, match=rf"{drafting} \(speculative decoding\) cannot .*{message}"):
        ours.generate(ids, max_new_tokens=4, **draft, **kwargs)
