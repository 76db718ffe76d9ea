"""What `generate` takes as its prompt, against the reference on the same random weights: input_ids and
inputs_embeds together, neither (the BOS token), embeddings under beam search, the caller's position_ids,
logits_to_keep, and a pad token outside the vocabulary (-1) where it is never fed."""

from __future__ import annotations

import pytest
import torch
from test_generation import CONFIGS, _left_padded, _prompts, peaked_pair
from test_generation_outputs import _same_cache

DICT = dict(return_dict_in_generate=True, output_scores=True, do_sample=False)


def _embeds(model, ids):
    return model.model.embed_tokens(ids).detach()


def _close(x, y):
    """Within the reference's own tolerance for these tests (`assert_similar_generate_outputs`): padded
    prompts and beam reordering round differently in the last bits."""
    torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def _same_outputs(a, b):
    assert a.sequences.tolist() == b.sequences.tolist()
    assert len(a.scores) == len(b.scores)
    for x, y in zip(a.scores, b.scores, strict=True):
        _close(x, y)


def _close_caches(ours, ref_cache, mask):
    """The keys and values of the real positions (`mask` (B, T) of the prompt, then every new one); those of
    padding are never attended to, and a fully masked padding row is computed differently by each."""
    n = ours.get_seq_length()
    assert n == ref_cache.get_seq_length()
    real = torch.nn.functional.pad(mask, (0, n - mask.shape[1]), value=1).bool()
    for i, layer in enumerate(ref_cache.layers):
        for a, b in ((ours.keys[i], layer.keys), (ours.values[i], layer.values)):
            _close(a[:, :, :n].transpose(1, 2)[real], b.transpose(1, 2)[real])


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_input_ids_with_inputs_embeds_match_reference(use_cache, padded):
    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids, mask = _left_padded([6, 4]) if padded else (_prompts(2, 6, seed=3), None)
    embeds = _embeds(ours, ids)
    kw = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, use_cache=use_cache, **DICT)
    a = ours.generate(ids, inputs_embeds=embeds, **kw)
    b = ref.generate(ids, inputs_embeds=embeds, **kw)
    _same_outputs(a, b)
    # The embeddings are the prompt the model reads, the ids come first in the sequences (as from ids alone).
    assert a.sequences.shape == (2, 11) and a.sequences[:, :6].tolist() == ids.tolist()
    assert a.sequences.tolist() == ours.generate(ids, **kw).sequences.tolist()
    other = ours.generate(ids, inputs_embeds=torch.rand_like(embeds), **kw)
    assert not any(torch.allclose(x, y) for x, y in zip(a.scores, other.scores, strict=True))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("with_embeds", [False, True])
def test_pad_tokens_without_a_mask_are_masked_as_the_reference(batch, with_embeds):
    """Without an attention_mask the reference masks the ids equal to pad_token_id (when it is no EOS id),
    wherever they are, from the ids also when the model reads embeddings."""
    ours, ref = peaked_pair()
    ids = _prompts(batch, 6, seed=8)
    ids[0, 2] = ids[-1, 0] = 0
    kw = dict(max_new_tokens=5, pad_token_id=0, eos_token_id=None, **DICT)
    if with_embeds:
        kw["inputs_embeds"] = _embeds(ours, ids)
    a, b = ours.generate(ids, **kw), ref.generate(ids, **kw)
    _same_outputs(a, b)
    # The mask inferred is the one stablelm uses when given (a pad id that is an EOS id is no padding).
    same = ours.generate(ids, attention_mask=(ids != 0).long(), **kw)
    assert a.sequences.tolist() == same.sequences.tolist()
    as_eos = dict(kw, eos_token_id=0)
    assert ours.generate(ids, **as_eos).sequences.tolist() == ref.generate(ids, **as_eos).sequences.tolist()


def test_input_ids_and_inputs_embeds_of_different_lengths_are_refused():
    ours, _ = peaked_pair()
    ids = _prompts(2, 5)
    with pytest.raises(
        ValueError, match=r"input_ids \(2, 3\) and inputs_embeds \(2, 5, 128\) must cover the same"
    ):
        ours.generate(ids[:, :3], inputs_embeds=_embeds(ours, ids), max_new_tokens=2)
    with pytest.raises(ValueError, match="must cover the same"):
        ours.generate(ids[:1], inputs_embeds=_embeds(ours, ids), max_new_tokens=2)


@pytest.mark.parametrize("batch_from", [None, "attention_mask", "position_ids"])
def test_no_prompt_starts_from_bos_as_the_reference(batch_from):
    ours, ref = peaked_pair()
    for m in (ours, ref):
        m.generation_config.bos_token_id = 7
    kw = dict(max_new_tokens=4, do_sample=False, remove_invalid_values=True)
    if batch_from == "attention_mask":
        kw["attention_mask"] = torch.ones(3, 1, dtype=torch.long)
    elif batch_from == "position_ids":
        kw["position_ids"] = torch.zeros(3, 1, dtype=torch.long)
    a, b = ours.generate(**kw), ref.generate(**kw)
    assert a.tolist() == b.tolist()
    assert a.shape == (1 if batch_from is None else 3, 5) and set(a[:, 0].tolist()) == {7}


def test_no_prompt_without_a_usable_bos_is_refused():
    ours, _ = peaked_pair()
    ours.generation_config.bos_token_id = None
    with pytest.raises(ValueError, match=r"needs input_ids \(or inputs_embeds\) when no bos_token_id is set"):
        ours.generate(max_new_tokens=2)
    with pytest.raises(ValueError, match=r"bos_token_id \(500\) starts the prompt"):
        ours.generate(max_new_tokens=2, bos_token_id=500)
    # The reference also takes a longer mask with no prompt (and reads its rows only); stablelm wants the
    # mask of the one BOS position.
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(3, 1\)"):
        ours.generate(attention_mask=torch.ones(3, 2, dtype=torch.long), max_new_tokens=2, bos_token_id=7)


@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("beams", [dict(num_beams=2), dict(num_beams=3, num_return_sequences=2)])
def test_beam_search_from_inputs_embeds_matches_reference(with_ids, beams):
    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids, mask = _left_padded([6, 4])
    embeds = _embeds(ours, ids)
    kw = dict(attention_mask=mask, max_new_tokens=5, **beams, **DICT)
    first = dict(input_ids=ids) if with_ids else {}
    a = ours.generate(**first, inputs_embeds=embeds, **kw)
    b = ref.generate(**first, inputs_embeds=embeds, **kw)
    _same_outputs(a, b)
    _close(a.sequences_scores, b.sequences_scores)
    assert a.beam_indices.tolist() == b.beam_indices.tolist()
    # Only the new tokens without ids (as the reference returns them), the same ones as from the ids.
    from_ids = ours.generate(ids, **kw).sequences
    assert a.sequences.tolist() == (from_ids if with_ids else from_ids[:, 6:]).tolist()


# Rotary positions that skip and differ per row: the reference continues from each row's last one.
GAPPED = torch.tensor([[0, 1, 2, 6, 7], [3, 4, 9, 10, 11]])


@pytest.mark.parametrize(
    "setting",
    [
        dict(),
        dict(cache_implementation="dynamic"),
        dict(use_cache=False),
        dict(num_beams=2),
        dict(do_sample=True, num_return_sequences=2),
        dict(embeds=True),
    ],
    ids=["static", "dynamic", "no-cache", "beams", "sampled-twice", "embeds"],
)
def test_position_ids_match_reference(setting):
    ours, ref = peaked_pair(**CONFIGS["qkln-parallel"])
    ids = _prompts(2, 5, seed=2)
    setting = dict(setting)
    prompt = dict(inputs_embeds=_embeds(ours, ids)) if setting.pop("embeds", False) else dict(input_ids=ids)
    out = []
    for m in (ours, ref):
        torch.manual_seed(0)
        out.append(m.generate(**prompt, position_ids=GAPPED, max_new_tokens=6, eos_token_id=None, **setting))
    assert out[0].tolist() == out[1].tolist()
    if not setting.get("do_sample"):  # the positions are used: the tokens differ from the default ones
        assert (
            out[0].tolist()
            != ours.generate(**prompt, max_new_tokens=6, eos_token_id=None, **setting).tolist()
        )


def test_position_ids_continue_over_past_key_values_as_the_reference():
    ours, ref = peaked_pair()
    ids, positions = _prompts(2, 5, seed=3), GAPPED
    kw = dict(eos_token_id=None, return_dict_in_generate=True)
    out = []
    for m in (ours, ref):
        first = m.generate(ids, position_ids=positions, max_new_tokens=3, **kw)
        longer = torch.cat([positions, positions[:, -1:] + torch.arange(1, 4)], dim=1)
        cache = first.past_key_values
        out.append(
            m.generate(first.sequences, position_ids=longer, past_key_values=cache, max_new_tokens=3, **kw)
        )
    assert out[0].sequences.tolist() == out[1].sequences.tolist()


def test_position_ids_from_the_mask_equal_none_as_the_reference_test():
    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids, mask = _left_padded([6, 3])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, max_new_tokens=5, eos_token_id=None)
    a = ours.generate(ids, position_ids=positions, **kw)
    assert (
        a.tolist()
        == ours.generate(ids, **kw).tolist()
        == ref.generate(ids, position_ids=positions, **kw).tolist()
    )


@pytest.mark.parametrize(
    "position_ids, error, message",
    [
        ([[0, 1, 2, 3]], TypeError, "position_ids must be a torch.Tensor"),
        (torch.zeros(1, 4), TypeError, "integer positions"),
        (torch.zeros(1, 3, dtype=torch.long), ValueError, r"shape \(2, 4\) \(or \(1, 4\)\)"),
        (torch.zeros(3, 4, dtype=torch.long), ValueError, r"got shape \(3, 4\)"),
    ],
)
def test_bad_position_ids_are_refused(position_ids, error, message):
    ours, _ = peaked_pair()
    with pytest.raises(error, match=message):
        ours.generate(_prompts(2, 4), position_ids=position_ids, max_new_tokens=2)


def test_position_ids_with_speculative_decoding_are_refused():
    ours, _ = peaked_pair()
    ids = _prompts(1, 6)
    with pytest.raises(ValueError, match="does not take position_ids"):
        ours.generate(ids, position_ids=torch.arange(6)[None], prompt_lookup_num_tokens=2, max_new_tokens=3)


@pytest.mark.parametrize("keep", [0, 1, 3])
def test_logits_to_keep_leaves_the_tokens_as_the_reference(keep):
    ours, ref = peaked_pair()
    ids = _prompts(2, 5, seed=6)
    kw = dict(max_new_tokens=6, return_dict_in_generate=True, output_logits=True)
    a, b = ours.generate(ids, logits_to_keep=keep, **kw), ref.generate(ids, logits_to_keep=keep, **kw)
    assert a.sequences.tolist() == b.sequences.tolist() == ours.generate(ids, max_new_tokens=6).tolist()
    for x, y in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize(
    "keep", [-1, 1.5, True, torch.tensor([4])], ids=["negative", "float", "bool", "tensor"]
)
def test_logits_to_keep_that_the_reference_fails_on_is_refused(keep):
    ours, _ = peaked_pair()
    with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
        ours.generate(_prompts(1, 4), logits_to_keep=keep, max_new_tokens=2)


def test_negative_pad_and_eos_generate_to_the_full_length_as_the_reference():
    """The reference's tests set pad_token_id = eos_token_id = -1: no row ever ends, the pad is never fed."""
    ours, ref = peaked_pair()
    ids = _prompts(3, 5, seed=1)
    kw = dict(max_new_tokens=6, eos_token_id=-1, pad_token_id=-1, min_new_tokens=2)
    a = ours.generate(ids, **kw)
    assert a.tolist() == ref.generate(ids, **kw).tolist() and a.shape == (3, 11) and bool((a >= 0).all())
    # Beam search never feeds the pad (finished beams leave the running ones): a reachable EOS is fine there.
    eos = int(a[0, 7])
    beams = dict(max_new_tokens=6, eos_token_id=eos, pad_token_id=-1, num_beams=2)
    assert ours.generate(ids, **beams).tolist() == ref.generate(ids, **beams).tolist()


def test_negative_pad_that_would_be_fed_is_refused():
    """A row that ends before the others is fed the pad: the reference fails there with an IndexError from
    its embedding (or, on a GPU, a device assert); stablelm refuses before any work, naming the pad."""
    ours, ref = peaked_pair()
    ids = _prompts(2, 5, seed=1)
    eos = int(ref.generate(ids, max_new_tokens=3, eos_token_id=None)[0, 6])
    with pytest.raises(IndexError):
        ref.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=-1)
    message = r"pad_token_id \(-1\) is outside the model's vocabulary of 128 tokens: rows that finish early"
    for kw in (
        dict(eos_token_id=eos, pad_token_id=-1),
        dict(eos_token_id=[-1, eos], pad_token_id=-1),
        dict(eos_token_id=-1, pad_token_id=-1, stopping_criteria=[lambda seq, scores: seq[:, -1] == eos]),
        dict(eos_token_id=[200, eos], pad_token_id=None),  # the pad defaults to the first EOS
    ):
        with pytest.raises(
            ValueError, match=message if kw.get("pad_token_id") else r"pad_token_id \(200, the"
        ):
            ours.generate(ids, max_new_tokens=6, **kw)


def test_continue_from_past_key_values_with_negative_pad_as_the_reference_test():
    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids, mask = _left_padded([6, 4])
    kw = dict(pad_token_id=-1, eos_token_id=-1, use_cache=True, **DICT)
    full = [m.generate(ids, attention_mask=mask, max_new_tokens=4, **kw) for m in (ours, ref)]
    for m, whole in zip((ours, ref), full, strict=True):
        first = m.generate(ids, attention_mask=mask, max_new_tokens=3, **kw)
        longer = torch.nn.functional.pad(mask, (0, 3), value=1)
        rest = m.generate(
            first.sequences,
            attention_mask=longer,
            past_key_values=first.past_key_values,
            max_new_tokens=1,
            **kw,
        )
        assert rest.sequences.tolist() == whole.sequences.tolist()
        for x, y in zip(first.scores + rest.scores, whole.scores, strict=True):
            torch.testing.assert_close(x, y)  # the same model: bit for bit
    _same_outputs(full[0], full[1])
    _close_caches(full[0].past_key_values, full[1].past_key_values, mask)


def test_continue_from_inputs_embeds_as_the_reference_test():
    ours, ref = peaked_pair(**CONFIGS["gqa"])
    ids = _prompts(2, 5, seed=4)
    embeds = _embeds(ours, ids)
    for m in (ours, ref):
        m.generation_config.pad_token_id = m.generation_config.eos_token_id = -1
    kw = dict(return_dict_in_generate=True, do_sample=False)
    results = []
    for m in (ours, ref):
        whole = m.generate(inputs_embeds=embeds, max_new_tokens=4, **kw)
        first = m.generate(inputs_embeds=embeds, max_new_tokens=3, **kw)
        more = torch.cat([embeds, _embeds(ours, first.sequences)], dim=1)
        rest = m.generate(inputs_embeds=more, max_new_tokens=1, past_key_values=first.past_key_values, **kw)
        assert torch.cat([first.sequences, rest.sequences], dim=1).tolist() == whole.sequences.tolist()
        results.append((whole, rest))
    assert results[0][0].sequences.tolist() == results[1][0].sequences.tolist()
    _same_cache(results[0][0].past_key_values, results[1][0].past_key_values)
    _same_cache(results[0][1].past_key_values, results[1][1].past_key_values)
