"""Logits processors and stopping criteria against the reference's, on the same random weights."""

from __future__ import annotations

import pytest
import torch
from conftest import transformers
from test_generation import CONFIGS, _left_padded, _prompts, peaked_pair

from stablelm import set_seed


@pytest.fixture(scope="module")
def pair():
    return peaked_pair(**CONFIGS["gqa"])


@pytest.fixture(scope="module")
def free(pair):
    """The prompts and what the reference generates from them unconstrained (greedy, no EOS)."""
    _, ref = pair
    ids = _prompts(3, 5, seed=7)
    return ids, ref.generate(ids, max_new_tokens=12, eos_token_id=None, pad_token_id=0)[:, 5:]


def _cases(new):
    """Settings that change what the free generation `new` (B, 12) would produce."""
    t = lambda r, i: int(new[r, i])  # noqa: E731
    return {
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
        "bad_words_ids": dict(bad_words_ids=[[t(0, 1)], [t(1, 2), t(1, 3)]]),
        "sequence_bias": dict(sequence_bias={(t(0, 1),): -8.0, (t(1, 2), t(1, 3)): -30.0, (t(2, 0),): -1.5}),
        "sequence_bias_list": dict(sequence_bias=[[[t(0, 1)], -8.0], [[t(1, 2), t(1, 3)], -30.0]]),
        "suppress_tokens": dict(suppress_tokens=[t(0, 0), t(1, 0), t(2, 3)]),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[t(0, 0), t(1, 0), t(2, 0)]),
        "forced_eos_token_id": dict(forced_eos_token_id=3),
        "exponential_decay_length_penalty": dict(exponential_decay_length_penalty=(2, 3.0), eos_token_id=5),
        "min_length": dict(min_length=12, eos_token_id=t(0, 2)),
        "min_new_tokens": dict(min_new_tokens=6, eos_token_id=[t(0, 2), t(1, 1)]),
        "repetition_penalty": dict(repetition_penalty=1.8),
        "remove_invalid_values+renormalize": dict(remove_invalid_values=True, renormalize_logits=True),
        "typical_p": dict(do_sample=True, typical_p=0.6),
        "epsilon_cutoff": dict(do_sample=True, epsilon_cutoff=0.05),
        "eta_cutoff": dict(do_sample=True, eta_cutoff=0.05),
        "renormalize sampling": dict(do_sample=True, top_k=8, renormalize_logits=True),
        "all": dict(
            do_sample=True,
            temperature=0.9,
            top_k=30,
            top_p=0.95,
            min_p=0.01,
            typical_p=0.95,
            epsilon_cutoff=0.001,
            eta_cutoff=0.001,
            repetition_penalty=1.2,
            no_repeat_ngram_size=3,
            suppress_tokens=[t(0, 0)],
        ),
    }


CASE_NAMES = list(_cases(torch.zeros(3, 12, dtype=torch.long)))


def _both(pair, ids, mask=None, seed=0, **kw):
    ours, ref = pair
    kw = dict(max_new_tokens=12, pad_token_id=0, return_dict_in_generate=True, output_scores=True, **kw)
    kw.setdefault("eos_token_id", None)
    set_seed(seed)
    a = ours.generate(ids, attention_mask=mask, **kw)
    set_seed(seed)
    b = ref.generate(ids, attention_mask=mask, **kw)
    return a, b


@pytest.mark.parametrize("name", CASE_NAMES)
def test_processor_matches_reference_scores_and_tokens(pair, free, name):
    ids, new = free
    setting = _cases(new)[name]
    for seed in (0, 1):
        a, b = _both(pair, ids, seed=seed, **setting)
        assert torch.equal(a.sequences, b.sequences)
        assert len(a.scores) == len(b.scores)
        assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores, strict=True))
    if name == "remove_invalid_values+renormalize":  # the scores are log-probabilities
        assert torch.allclose(a.scores[0].logsumexp(-1), torch.zeros(3), atol=1e-5)
    elif not setting.get("do_sample"):  # the setting did something
        assert not torch.equal(a.sequences[:, 5:], new[:, : a.sequences.shape[1] - 5])


@pytest.mark.parametrize(
    "name", ["no_repeat_ngram_size", "repetition_penalty", "begin_suppress_tokens", "all"]
)
def test_processor_on_a_left_padded_batch_matches_reference(pair, name):
    """The repetition penalty skips each row's padding, as the reference's does."""
    ids, mask = _left_padded([5, 3, 4], seed=2)
    setting = _cases(torch.randint(1, 100, (3, 12), generator=torch.Generator().manual_seed(0)))[name]
    a, b = _both(pair, ids, mask, **setting)
    assert torch.equal(a.sequences, b.sequences)
    # Padded batches: the model's logits agree to rounding (the mask path), the processors exactly.
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(a.scores, b.scores, strict=True))


def test_forced_bos_after_a_one_token_prompt_matches_reference(pair):
    ids = _prompts(2, 1, seed=3)
    a, b = _both(pair, ids, forced_bos_token_id=9, begin_suppress_tokens=[4])
    assert torch.equal(a.sequences, b.sequences) and a.sequences[:, 1].tolist() == [9, 9]


@pytest.mark.parametrize("beams", [1, 3])
def test_prefix_allowed_tokens_fn_matches_reference(pair, beams):
    ours, ref = pair
    ids = _prompts(2, 4, seed=5)
    seen = []

    def allowed(batch_id, row):
        seen.append(batch_id)
        return [int(row[-1]) % 50 + k for k in range(1 + batch_id, 12, 2)]

    kw = dict(max_new_tokens=6, eos_token_id=None, num_beams=beams, prefix_allowed_tokens_fn=allowed)
    a, b = ours.generate(ids, **kw), ref.generate(ids, **kw)
    assert a.tolist() == b.tolist()
    assert sorted(set(seen)) == [0, 1]
    for row in a.tolist():
        for prev, token in zip(row[3:-1], row[4:], strict=True):
            assert token in range(prev % 50 + 1, prev % 50 + 12)
    with pytest.raises(ValueError, match="returned no token for batch_id 0"):
        ours.generate(ids, max_new_tokens=2, prefix_allowed_tokens_fn=lambda b, r: [])


def test_the_references_own_processors_and_criteria_work_when_passed_in(pair, free):
    ids, new = free
    ours, ref = pair
    bad = transformers.NoBadWordsLogitsProcessor([[int(new[0, 1])]], eos_token_id=None)
    penalty = transformers.RepetitionPenaltyLogitsProcessor(1.6)  # takes the place of ours (1.2)
    kw = dict(
        max_new_tokens=10,
        eos_token_id=None,
        repetition_penalty=1.2,
        logits_processor=transformers.LogitsProcessorList([bad, penalty]),
        stopping_criteria=transformers.StoppingCriteriaList([transformers.MaxLengthCriteria(max_length=11)]),
    )
    a, b = ours.generate(ids, **kw), ref.generate(ids, **kw)
    assert a.tolist() == b.tolist() and a.shape == (3, 11)
    without = ours.generate(ids, max_new_tokens=6, eos_token_id=None, repetition_penalty=1.2)
    assert a.tolist() != without.tolist()  # the processors passed in did something


class StopAfter(transformers.StoppingCriteria if transformers else object):
    """Stops a row once its last token is `token` (a per-row bool tensor, as the reference's API)."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_custom_stopping_criteria_and_processors_match_reference(pair, free):
    ids, new = free
    ours, ref = pair
    stop = int(new[1, 3])

    def plain_bool(input_ids, scores):  # a plain function returning one bool
        return input_ids.shape[1] >= 14

    def halve(input_ids, scores):
        return scores / 2 + (input_ids.shape[1] % 3)

    for eos in (7, None):  # without EOS, a stopped row is not padded (as the reference)
        kw = dict(max_new_tokens=12, eos_token_id=eos, pad_token_id=0, logits_processor=[halve])
        for criteria in ([StopAfter(stop)], [plain_bool], [StopAfter(stop), plain_bool]):
            a = ours.generate(ids, stopping_criteria=criteria, **kw)
            b = ref.generate(ids, stopping_criteria=transformers.StoppingCriteriaList(criteria), **kw)
            assert a.tolist() == b.tolist()
        assert a.shape[1] <= 14


def test_stopping_criteria_see_the_scores_when_asked(pair):
    ours, ref = pair
    ids = _prompts(2, 4)
    seen = {"ours": [], "ref": []}

    def spy(key):
        def criterion(input_ids, scores):
            seen[key].append(None if scores is None else len(scores))
            return False

        return criterion

    for key, model in (("ours", ours), ("ref", ref)):
        model.generate(ids, max_new_tokens=3, stopping_criteria=[spy(key)], eos_token_id=None)
        model.generate(
            ids,
            max_new_tokens=3,
            stopping_criteria=[spy(key)],
            eos_token_id=None,
            return_dict_in_generate=True,
            output_scores=True,
        )
    assert seen["ours"] == seen["ref"] == [None, None, None, 1, 2, 3]


@pytest.mark.parametrize("words", [[[]], [[], "word"], ["word", []]])
def test_empty_bad_words_ban_nothing_as_the_reference(pair, free, words):
    """The reference takes `[]` among bad_words_ids and bans nothing for it; the other words still count."""
    ids, new = free
    words = [[int(new[0, 1])] if w == "word" else w for w in words]
    a, b = _both(pair, ids, bad_words_ids=words)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores, strict=True))
    assert torch.equal(a.sequences[:, 5:], new) == (words == [[]])  # only a real word changes the text


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(bad_words_ids=[1, 2]), ValueError, "bad_words_ids must be a non-empty list of lists"),
        (dict(bad_words_ids=[[1, -2]]), ValueError, "bad_words_ids must be at least 0"),
        (dict(sequence_bias={(1,): "x"}), ValueError, "sequence_bias must be a non-empty dict"),
        (dict(sequence_bias={(500,): 1.0}), ValueError, "sequence_bias names token ids outside"),
        (dict(no_repeat_ngram_size=1.5), TypeError, "no_repeat_ngram_size must be an integer"),
        (
            dict(exponential_decay_length_penalty=3),
            ValueError,
            "exponential_decay_length_penalty must be a pair",
        ),
        (dict(do_sample=True, typical_p=0.0), ValueError, r"typical_p must be a number in \(0, 1\)"),
        (dict(suppress_tokens=["a"]), TypeError, "suppress_tokens must be a token id"),
        (dict(logits_processor=lambda i, s: s), TypeError, "logits_processor must be a list of callables"),
        (dict(logits_processor=[3]), TypeError, r"logits_processor\[0\] is a int"),
        (dict(stopping_criteria=[None]), TypeError, r"stopping_criteria\[0\] is a NoneType"),
        (dict(guidance_scale=1.5), ValueError, "guidance_scale=1.5 is a setting of the reference's generate"),
        (dict(penalty_alpha=0.6, top_k=4), ValueError, "penalty_alpha=0.6"),
        (dict(diversity_penalty=1.0), ValueError, "diversity_penalty=1.0"),
        (dict(max_tokens=3), TypeError, "unexpected keyword argument 'max_tokens'"),
        (dict(negative_prompt_ids=torch.ones(1, 2, dtype=torch.long)), ValueError, "negative_prompt_ids="),
        (dict(synced_gpus=True), ValueError, "synced_gpus=True is a setting"),
        (dict(renormalize_logits="yes"), TypeError, "renormalize_logits must be True or False"),
    ],
)
def test_bad_or_unsupported_settings_get_clear_errors(pair, kwargs, error, message):
    ours, _ = pair
    with pytest.raises(error, match=message):
        ours.generate(_prompts(1, 4), max_new_tokens=3, **kwargs)


def test_settings_left_at_their_off_value_are_accepted(pair):
    """The reference's fields stablelm does not implement are refused only when switched on."""
    ours, ref = pair
    ids = _prompts(1, 4)
    kw = dict(max_new_tokens=4, num_beam_groups=1, diversity_penalty=0.0, guidance_scale=None, max_time=60.0)
    assert ours.generate(ids, **kw).tolist() == ref.generate(ids, **kw).tolist()


def test_settings_set_as_attributes_of_the_models_generation_config_are_not_ignored(pair):
    """`model.generation_config.X = ...`, as the reference's users write it: a setting stablelm does not
    implement is refused by name (it was dropped silently), one at its off value is accepted."""
    ours, ref = pair
    ids = _prompts(1, 4)
    ours.generation_config.num_assistant_tokens_schedule = "constant"
    assert ours.generation_config.num_assistant_tokens_schedule == "constant"
    assert ours.generate(ids, max_new_tokens=3).tolist() == ref.generate(ids, max_new_tokens=3).tolist()
    ours.generation_config.compile_config = transformers.CompileConfig()
    with pytest.raises(ValueError, match="compile_config=CompileConfig"):
        ours.generate(ids, max_new_tokens=3)
    with pytest.raises(AttributeError, match="no attribute 'no_such_setting'"):
        ours.generation_config.no_such_setting  # noqa: B018


def test_the_eos_mask_made_once_follows_the_scores_vocabulary():
    """min_new_tokens/min_length build their EOS mask once (not every step), anew for other scores."""
    from stablelm.generation.processors import MinNewTokensLengthLogitsProcessor

    processor = MinNewTokensLengthLogitsProcessor(2, 3, [1, 4], torch.device("cpu"))
    ids = torch.zeros(2, 3, dtype=torch.long)
    for vocab in (5, 7, 5):
        scores = torch.randn(2, vocab)
        want = scores.clone()
        want[:, [1, 4]] = -float("inf")
        assert torch.equal(processor(ids, scores), want)
    assert torch.equal(processor(torch.zeros(2, 5, dtype=torch.long), scores), scores)  # past the minimum


def test_the_suppress_tokens_mask_made_once_follows_the_scores_vocabulary():
    """suppress_tokens builds its mask once (not every step), anew for scores of another vocabulary."""
    from stablelm.generation.processors import SuppressTokensLogitsProcessor

    processor = SuppressTokensLogitsProcessor([0, 3, 6], torch.device("cpu"))
    ids = torch.zeros(2, 3, dtype=torch.long)
    for vocab in (5, 7, 5, 7):
        scores = torch.randn(2, vocab)
        want = scores.clone()
        want[:, [i for i in (0, 3, 6) if i < vocab]] = -float("inf")
        assert torch.equal(processor(ids, scores), want)


def test_the_masks_leave_the_scores_they_are_given_alone():
    """The processors return new scores: the logits they were given may be recorded (output_logits)."""
    from stablelm.generation.processors import (
        MinNewTokensLengthLogitsProcessor,
        SuppressTokensLogitsProcessor,
    )

    ids = torch.zeros(2, 3, dtype=torch.long)
    for processor in (
        MinNewTokensLengthLogitsProcessor(2, 3, [1, 4], torch.device("cpu")),
        SuppressTokensLogitsProcessor([0, 3], torch.device("cpu")),
    ):
        scores = torch.randn(2, 5)
        before = scores.clone()
        assert not torch.equal(processor(ids, scores), before)
        assert torch.equal(scores, before)
