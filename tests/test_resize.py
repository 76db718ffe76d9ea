"""resize_token_embeddings and the embedding accessors, against the reference's resize on the same weights."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_pair, reference_config, tiny_config, transformers

from stablelm import (
    StableLmForCausalLM,
    StableLmForSequenceClassification,
    StableLmForTokenClassification,
    StableLmModel,
)


def _resize_both(ours, ref, *args, seed=7, **kwargs):
    torch.manual_seed(seed)
    ref.resize_token_embeddings(*args, **kwargs)
    torch.manual_seed(seed)
    return ours.resize_token_embeddings(*args, **kwargs)


def _assert_same_weights(ours, ref):
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert set(ours_state) == set(ref_state)
    for name, tensor in ours_state.items():
        assert torch.equal(tensor, ref_state[name]), name


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("mean_resizing", [True, False])
@pytest.mark.parametrize("new_size", [150, 100])
def test_resize_matches_reference(tie, mean_resizing, new_size):
    ours, ref = make_pair(tiny_config(tie_word_embeddings=tie))
    old_ids = torch.randint(0, min(new_size, 128), (2, 9), generator=torch.Generator().manual_seed(1))
    before = ours(old_ids).logits
    embedding = _resize_both(ours, ref, new_size, mean_resizing=mean_resizing)

    assert embedding is ours.get_input_embeddings()
    assert ours.config.vocab_size == ref.config.vocab_size == new_size
    assert ours.get_input_embeddings().weight.shape == (new_size, 128)
    assert ours.get_output_embeddings().weight.shape == (new_size, 128)
    assert ours.get_output_embeddings().out_features == new_size
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
    _assert_same_weights(ours, ref)  # the new rows too: same seed, same draws
    after = ours(old_ids).logits
    assert torch.equal(after, ref(old_ids).logits)
    keep = min(new_size, 128)
    torch.testing.assert_close(after[..., :keep], before[..., :keep], rtol=0, atol=0)


def test_mean_resizing_samples_when_covariance_is_positive_definite():
    # More rows than dimensions: the covariance is positive definite and the reference samples around the mean.
    config = tiny_config(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    ours, ref = make_pair(config)
    _resize_both(ours, ref, 300)
    _assert_same_weights(ours, ref)
    new_rows = ours.model.embed_tokens.weight[256:]
    mean = ours.model.embed_tokens.weight[:256].float().mean(0)
    assert not torch.equal(new_rows[0], new_rows[1])  # drawn, not copied
    torch.testing.assert_close(new_rows, mean.expand_as(new_rows), rtol=0, atol=1e-4)


def test_pad_to_multiple_of_matches_reference():
    ours, ref = make_pair(tiny_config())
    _resize_both(ours, ref, 130, pad_to_multiple_of=64)
    assert ours.config.vocab_size == 192
    _assert_same_weights(ours, ref)
    _resize_both(ours, ref, None, pad_to_multiple_of=100)  # None keeps the size and only pads it
    assert ours.config.vocab_size == ref.config.vocab_size == 200


def test_none_leaves_the_model_unchanged():
    ours = StableLmForCausalLM(tiny_config())
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    assert ours.resize_token_embeddings() is ours.get_input_embeddings()
    assert ours.config.vocab_size == 128
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("tie", [False, True])
def test_resized_model_round_trips_through_save_and_load(tmp_path, tie):
    ours, _ = make_pair(tiny_config(tie_word_embeddings=tie))
    ours.resize_token_embeddings(160)
    ours.save_pretrained(tmp_path)
    ids = torch.tensor([[1, 150, 159, 20, 127]])
    expected = ours(ids).logits
    loaded = StableLmForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.vocab_size == 160
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    assert torch.equal(loaded(ids).logits, expected)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reference(ids).logits, expected)


@pytest.mark.parametrize(
    "cls, ref_name",
    [
        (StableLmModel, "StableLmModel"),
        (StableLmForSequenceClassification, "StableLmForSequenceClassification"),
        (StableLmForTokenClassification, "StableLmForTokenClassification"),
    ],
)
def test_every_model_class_resizes_like_the_reference(cls, ref_name):
    ours, ref = make_pair(tiny_config(pad_token_id=0), ours_cls=cls, ref_cls_name=ref_name)
    assert ours.get_output_embeddings() is None
    _resize_both(ours, ref, 140)
    assert ours.config.vocab_size == 140
    _assert_same_weights(ours, ref)
    ids = torch.tensor([[3, 139, 7]])
    out, expected = ours(ids), ref(ids)
    field = "last_hidden_state" if cls is StableLmModel else "logits"
    assert torch.equal(getattr(out, field), getattr(expected, field))


def test_padding_row_beyond_the_new_size_is_dropped(tmp_path):
    model = StableLmModel(tiny_config(pad_token_id=120))
    with pytest.warns(UserWarning, match="pad_token_id 120 lies outside the new vocabulary"):
        model.resize_token_embeddings(100)
    assert model.embed_tokens.padding_idx is None
    assert model.embed_tokens.num_embeddings == 100
    assert model.config.pad_token_id is None
    model.save_pretrained(tmp_path)  # a config naming an id past its vocabulary would be refused here
    assert StableLmModel.from_pretrained(tmp_path).config.pad_token_id is None


def test_requires_grad_is_kept():
    model = StableLmForCausalLM(tiny_config())
    model.lm_head.weight.requires_grad_(False)
    model.resize_token_embeddings(130)
    assert not model.lm_head.weight.requires_grad
    assert model.model.embed_tokens.weight.requires_grad


def test_set_input_and_output_embeddings():
    model = StableLmForCausalLM(tiny_config())
    embedding, head = torch.nn.Embedding(128, 128), torch.nn.Linear(128, 128, bias=False)
    model.set_input_embeddings(embedding)
    model.set_output_embeddings(head)
    assert model.get_input_embeddings() is embedding and model.model.embed_tokens is embedding
    assert model.get_output_embeddings() is head and model.lm_head is head
    with pytest.raises(AttributeError, match="no output embeddings"):
        StableLmModel(tiny_config()).set_output_embeddings(head)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_sizes_are_rejected(bad):
    model = StableLmForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="positive integer"):
        model.resize_token_embeddings(bad)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive integer or None"):
        model.resize_token_embeddings(200, pad_to_multiple_of=bad)


def test_a_pad_to_multiple_of_that_is_no_integer_is_refused_in_the_reference_words():
    ours, ref = make_pair(tiny_config())
    words = "Asking to pad the embedding matrix to a multiple of `1.3`, which is not and integer"
    for model in (ours, ref):
        with pytest.raises(ValueError, match=re.escape(words)):
            model.resize_token_embeddings(150, pad_to_multiple_of=1.3)
    assert ours.get_input_embeddings().num_embeddings == ref.get_input_embeddings().num_embeddings


def test_the_models_vocab_size_attribute_follows_a_resize_as_the_references():
    ours, ref = make_pair(tiny_config())
    assert ours.vocab_size == ref.vocab_size == 128
    for model in (ours, ref):
        model.resize_token_embeddings(150, pad_to_multiple_of=64)
    assert ours.vocab_size == ref.vocab_size == ours.config.vocab_size == 192
    assert ours.model.vocab_size == 192  # the backbone's too (the reference's keeps its old value there)
    classifier = StableLmForSequenceClassification(tiny_config())
    theirs = transformers.StableLmForSequenceClassification(reference_config(tiny_config()))
    for model in (classifier, theirs):
        model.resize_token_embeddings(130)
    assert classifier.vocab_size == theirs.vocab_size == 130


def test_a_quantized_lm_head_is_refused_before_anything_changes(tmp_path):
    """A head loaded with quantization_config="int8" holds integer rows: resizing it says to resize first, and
    leaves the model as it was; a head kept dense resizes as before."""
    from stablelm.quantization import QuantizationConfig

    StableLmForCausalLM(tiny_config()).save_pretrained(tmp_path)
    model = StableLmForCausalLM.from_pretrained(tmp_path, quantization_config="int8")
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    with pytest.raises(ValueError, match=r"LM head is quantized \(int8\).*Resize the unquantized model"):
        model.resize_token_embeddings(150)
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size == 128
    assert torch.equal(model(ids).logits, before)
    assert model.resize_token_embeddings(pad_to_multiple_of=64).weight.shape[0] == 128  # the same size
    dense_head = QuantizationConfig("int8", modules_to_not_convert=["lm_head"])
    model = StableLmForCausalLM.from_pretrained(tmp_path, quantization_config=dense_head)
    assert model.resize_token_embeddings(150).weight.shape[0] == model.lm_head.out_features == 150
