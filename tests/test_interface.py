"""The reference's interface beyond logits: forward's arguments, output records, model and config methods
that tools (Trainer, peft, pipelines, lm-evaluation-harness) call. Each is checked against the reference
on the same weights."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from conftest import make_pair, reference_config, tiny_config, transformers

import stablelm
from stablelm import StableLmConfig, StableLmForCausalLM, StableLmForSequenceClassification, StableLmModel


def _ids(batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- forward ---------------------------------------------------------------------------------------------
def test_return_dict_false_gives_the_references_tuple():
    ours, ref = make_pair(tiny_config())
    ids = _ids()
    mine = ours(ids, labels=ids, return_dict=False)
    theirs = ref(ids, labels=ids, return_dict=False)
    assert isinstance(mine, tuple) and isinstance(theirs, tuple)
    assert len(mine) == len(theirs) == 3  # loss, logits, cache
    torch.testing.assert_close(mine[0], theirs[0], rtol=0, atol=0)
    torch.testing.assert_close(mine[1], theirs[1], rtol=0, atol=0)


def test_config_return_dict_false_is_honoured():
    config = tiny_config(return_dict=False, use_cache=False)
    out = StableLmForCausalLM(config)(_ids())
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == (2, 6, 128)


def test_output_attentions_equal_the_references_eager_weights():
    ours, ref = make_pair(tiny_config(), attn="eager")
    ours.config.attn_implementation = "sdpa"  # ours switches to the eager path when asked for weights
    ids = _ids()
    mask = torch.ones_like(ids)
    mine = ours(ids, attention_mask=mask, output_attentions=True)
    theirs = ref(ids, attention_mask=mask, output_attentions=True)
    assert len(mine.attentions) == len(theirs.attentions) == 2
    for a, b in zip(mine.attentions, theirs.attentions, strict=True):
        assert a.shape == (2, 8, 6, 6)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(mine.logits, theirs.logits)


def test_output_hidden_states_from_config_is_honoured():
    config = tiny_config(output_hidden_states=True)
    ours, ref = make_pair(config)
    ref.config.output_hidden_states = True
    ids = _ids()
    mine, theirs = ours(ids), ref(ids)
    assert len(mine.hidden_states) == len(theirs.hidden_states) == 3
    for a, b in zip(mine.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cache_keyword_and_cache_position_and_token_type_ids_as_the_reference():
    ours, ref = make_pair(tiny_config())
    ids = _ids(length=7)
    mine = ours(ids[:, :5], use_cache=True)
    theirs = ref(ids[:, :5], use_cache=True)
    step = dict(cache_position=torch.arange(5, 7), token_type_ids=torch.zeros(2, 2, dtype=torch.long))
    mine = ours(ids[:, 5:], cache=mine.cache, **step)
    theirs = ref(ids[:, 5:], cache=theirs.cache, **step)
    torch.testing.assert_close(mine.logits, theirs.logits, rtol=0, atol=0)
    assert mine.cache.get_seq_length() == theirs.cache.get_seq_length() == 7
    with pytest.raises(ValueError, match="cache=... or as past_key_values"):
        ours(ids, cache=mine.cache, past_key_values=mine.cache)


def test_token_type_ids_from_the_tokenizer_pass_straight_in():
    ours, ref = make_pair(tiny_config())
    inputs = {"input_ids": _ids(), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    inputs["token_type_ids"] = torch.zeros(2, 6, dtype=torch.long)
    torch.testing.assert_close(ours(**inputs).logits, ref(**inputs).logits, rtol=0, atol=0)


def test_num_items_in_batch_and_shift_labels_give_the_references_loss():
    ours, ref = make_pair(tiny_config())
    ids = _ids()
    labels = ids.clone()
    labels[0, :2] = -100
    count = torch.tensor(9)
    torch.testing.assert_close(
        ours(ids, labels=labels, num_items_in_batch=count).loss,
        ref(ids, labels=labels, num_items_in_batch=count).loss,
        rtol=0,
        atol=0,
    )
    shifted = torch.roll(labels, -1, dims=1)
    torch.testing.assert_close(
        ours(ids, labels=labels, shift_labels=shifted).loss,
        ref(ids, labels=labels, shift_labels=shifted).loss,
        rtol=0,
        atol=0,
    )
    assert StableLmForCausalLM.accepts_loss_kwargs  # so the reference's Trainer passes num_items_in_batch


# ---- output records -----------------------------------------------------------------------------------
def test_outputs_behave_as_the_references_model_output():
    ours, ref = make_pair(tiny_config())
    ids = _ids()
    mine, theirs = ours(ids, labels=ids), ref(ids, labels=ids)
    assert list(mine.keys()) == list(theirs.keys()) == ["loss", "logits", "cache"]
    assert list(mine) == list(theirs)  # iteration yields the keys
    assert [k for k, _ in mine.items()] == [k for k, _ in theirs.items()]
    assert mine.cache is mine["cache"] is mine.past_key_values is mine["past_key_values"]
    assert "past_key_values" in mine and "attentions" not in mine
    torch.testing.assert_close(mine[1], theirs[1], rtol=0, atol=0)
    assert len(mine.to_tuple()) == len(theirs.to_tuple()) == 3
    assert mine[:2][0] is mine.loss
    assert mine.get("hidden_states") is None and mine.attentions is None


# ---- model methods --------------------------------------------------------------------------------------
def test_from_config_and_auto_from_config():
    config = tiny_config()
    model = stablelm.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert isinstance(model, StableLmForCausalLM) and model.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32
    eager = StableLmModel.from_config(config, attn_implementation="eager")
    assert eager.config.attn_implementation == "eager" and config.attn_implementation is None


def test_model_attributes_tools_read():
    model = StableLmForCausalLM(tiny_config())
    ref = transformers.StableLmForCausalLM(reference_config(tiny_config()))
    assert model.can_generate() is ref.can_generate() is True
    assert StableLmModel.can_generate() is transformers.StableLmModel.can_generate() is False
    assert model.main_input_name == ref.main_input_name == "input_ids"
    assert model.name_or_path == ref.name_or_path == ""
    assert model.base_model is model.model and model.get_decoder() is model.model
    # The parameters' bytes (the buffers differ: the reference keeps a second copy of the rotary table).
    assert model.get_memory_footprint(return_buffers=False) == ref.get_memory_footprint(return_buffers=False)
    assert model.config.is_encoder_decoder is ref.config.is_encoder_decoder is False
    assert model.config.get_text_config() is model.config
    # The generation interface comes from a mixin of the reference's name, on the causal LM only.
    for ours_class in (StableLmForCausalLM, StableLmModel, StableLmForSequenceClassification):
        ref_class = getattr(transformers, ours_class.__name__)
        mixed = ["GenerationMixin" in str(cls.__bases__) for cls in (ours_class, ref_class)]
        assert mixed[0] is mixed[1] is (ours_class is StableLmForCausalLM)


def test_name_or_path_after_loading(tmp_path):
    StableLmForCausalLM(tiny_config()).save_pretrained(tmp_path)
    model = StableLmForCausalLM.from_pretrained(pretrained_model_name_or_path=tmp_path)
    assert model.name_or_path == str(tmp_path)
    with pytest.raises(TypeError, match="once"):
        StableLmForCausalLM.from_pretrained(tmp_path, pretrained_model_name_or_path=tmp_path)


def test_loading_info_and_ignore_mismatched_sizes(tmp_path):
    classifier = StableLmForSequenceClassification(tiny_config(num_labels=3, pad_token_id=0))
    classifier.save_pretrained(tmp_path)
    model, info = StableLmForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert info == {
        "missing_keys": set(),
        "unexpected_keys": set(),
        "mismatched_keys": set(),
        "error_msgs": [],
    }
    with pytest.raises(stablelm.CheckpointError):
        StableLmForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    options = dict(num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True)
    model, info = StableLmForSequenceClassification.from_pretrained(tmp_path, **options)
    _, theirs = transformers.StableLmForSequenceClassification.from_pretrained(tmp_path, **options)
    assert info == theirs and info["mismatched_keys"] == {("score.weight", (3, 128), (5, 128))}
    assert model.score.weight.shape == (5, 128)
    torch.testing.assert_close(model.model.embed_tokens.weight, classifier.model.embed_tokens.weight)


def test_prepare_inputs_for_generation_as_the_reference():
    ours, ref = make_pair(tiny_config())
    ids = _ids()
    mask = torch.ones_like(ids)
    cache = ours(ids[:, :4], use_cache=True).cache
    mine = ours.prepare_inputs_for_generation(
        ids, next_sequence_length=2, cache=cache, attention_mask=mask, use_cache=True, labels=ids
    )
    theirs = ref.prepare_inputs_for_generation(
        ids, next_sequence_length=2, cache=cache, attention_mask=mask, use_cache=True, labels=ids
    )
    assert set(mine) == set(theirs)
    assert torch.equal(mine["input_ids"], theirs["input_ids"]) and mine["cache"] is cache


def test_input_require_grads_and_checkpointing_kwargs_let_gradients_reach_adapters():
    model = StableLmForCausalLM(tiny_config()).train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert model.is_gradient_checkpointing and model.is_activation_checkpointing
    model(_ids(), labels=_ids()).loss.backward()
    # Reentrant checkpointing passes gradients to the layer's weights only when its input requires grad.
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    model.disable_input_require_grads()
    model.activation_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="every_n_layers"):
        model.activation_checkpointing_enable(every_n_layers=2)


def test_set_attn_implementation():
    model = StableLmModel(tiny_config())
    model.set_attn_implementation("eager")
    assert model.config.attn_implementation == model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match='Specified `attn_implementation="magic"` is not supported'):
        model.set_attn_implementation("magic")  # the reference's words
    assert model.config.attn_implementation == "eager"


# ---- config ---------------------------------------------------------------------------------------------
def test_config_signature_has_the_references_parameters_and_defaults():
    ours = inspect.signature(StableLmConfig.__init__).parameters
    theirs = inspect.signature(transformers.StableLmConfig.__init__).parameters
    model_fields = [name for name, p in theirs.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for name in model_fields:
        assert name in ours, name
        if name != "rope_parameters":
            assert ours[name].default == theirs[name].default, name
    for name in ("output_hidden_states", "return_dict", "id2label", "label2id", "problem_type"):
        assert ours[name].default == theirs[name].default, name


def test_config_setters_as_the_reference():
    ours, theirs = tiny_config(), reference_config(tiny_config())
    for config in (ours, theirs):
        config.num_labels = 3
    assert ours.id2label == theirs.id2label and ours.label2id == theirs.label2id
    new = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0, "partial_rotary_factor": 0.5}
    ours.rope_parameters = dict(new)
    theirs.rope_parameters = dict(new)
    assert ours.rope_parameters == theirs.rope_parameters
    ours.rope_parameters.update({"factor": 4.0})  # changed in place, as the reference's stored dict
    assert ours.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    ours.rope_scaling = {"type": "dynamic", "factor": 2.0}  # the legacy spelling
    assert ours.rope_type == "dynamic"
    with pytest.raises(ValueError, match="rope_parameters"):
        ours.rope_parameters = "linear"
    with pytest.raises(ValueError, match="num_labels"):
        ours.num_labels = 0


def test_config_use_return_dict_and_json_file(tmp_path):
    config = tiny_config(return_dict=False, architectures=["StableLmForCausalLM"])
    assert config.use_return_dict is False and config.architectures == ["StableLmForCausalLM"]
    config.to_json_file(tmp_path / "c.json")
    again = StableLmConfig.from_json_file(tmp_path / "c.json")
    assert again == config and again.return_dict is False
    ref = transformers.StableLmConfig.from_json_file(tmp_path / "c.json")
    assert ref.return_dict is False and ref.hidden_size == config.hidden_size
    assert "return_dict" not in json.loads(tiny_config().to_json_string())  # written only when changed


def test_custom_4d_attention_mask_as_the_reference():
    """A shared prefix with three endings that do not see each other, in one row (the reference's case)."""
    ours, ref = make_pair(tiny_config())
    ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    allowed = torch.tensor(
        [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0]]
        + [[1, 1, 1, 0, 0, 1]]
    ).bool()[None, None]
    additive = (~allowed).float() * torch.finfo(torch.float32).min
    positions = torch.tensor([[0, 1, 2, 3, 3, 3]])
    theirs = ref(ids, attention_mask=additive, position_ids=positions).logits
    for mask in (additive, allowed):
        mine = ours(ids, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(mine, theirs)
    separate = ours(torch.tensor([[10, 11, 12, 15]])).logits[0, -1]
    torch.testing.assert_close(mine[0, -1], separate)  # the last ending saw only the prefix
    with pytest.raises(ValueError, match="soft biases"):
        ours(ids, attention_mask=additive * 1e-38 - 0.5, position_ids=positions)
    with pytest.raises(ValueError, match=r"shape \(batch, 1, 6, 6\)"):
        ours(ids, attention_mask=additive[..., :5])


def test_from_pretrained_with_a_state_dict_and_no_checkpoint():
    config = tiny_config()
    model = StableLmForCausalLM(config)
    again = StableLmForCausalLM.from_pretrained(None, config=config, state_dict=model.state_dict())
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="config="):
        StableLmForCausalLM.from_pretrained(None, state_dict=model.state_dict())


def test_from_pretrained_under_a_meta_device_context_is_refused_clearly(tmp_path):
    StableLmForCausalLM(tiny_config()).save_pretrained(tmp_path)
    with torch.device("meta"), pytest.raises(RuntimeError, match="meta device context manager"):
        StableLmForCausalLM.from_pretrained(tmp_path)
    assert StableLmForCausalLM.from_pretrained(tmp_path).device.type == "cpu"


def test_error_paths_name_what_to_change(tmp_path):
    with pytest.raises(TypeError, match="needs the model"):
        StableLmForCausalLM.from_pretrained()
    model = StableLmForCausalLM(tiny_config())
    ids = torch.tensor([[10, 11, 12]])
    with pytest.raises(ValueError, match="bool or floating point"):
        model(ids, attention_mask=torch.ones(1, 1, 3, 3, dtype=torch.long))
    from stablelm.attention import attention, build_mask

    mask = build_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), past=0, new=3, slots=3, device=ids.device)
    q = torch.zeros(1, 8, 3, 16)
    with pytest.raises(ValueError, match="use sdpa for a 4-D mask"):
        attention(q, q, q, mask, implementation="flash_attention_2", scale=1.0)


def test_config_from_a_subfolder(tmp_path):
    config = tiny_config(hidden_size=64)
    config.save_pretrained(tmp_path / "text")
    assert StableLmConfig.from_pretrained(tmp_path, subfolder="text") == config
    ref = transformers.StableLmConfig.from_pretrained(tmp_path, subfolder="text")
    assert ref.hidden_size == 64
    with pytest.raises(FileNotFoundError):
        StableLmConfig.from_pretrained(tmp_path, subfolder="missing")


def test_generation_config_json_is_written_for_models_that_generate_as_the_reference(tmp_path):
    config = tiny_config(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    for ours_class, ref_class in (
        (StableLmForCausalLM, transformers.StableLmForCausalLM),
        (StableLmForSequenceClassification, transformers.StableLmForSequenceClassification),
        (StableLmModel, transformers.StableLmModel),
    ):
        ours, ref = ours_class(config), ref_class(reference_config(config))
        ours.save_pretrained(tmp_path / ours_class.__name__ / "ours")
        ref.save_pretrained(tmp_path / ours_class.__name__ / "ref")
        files = [tmp_path / ours_class.__name__ / who / "generation_config.json" for who in ("ours", "ref")]
        assert files[0].exists() is files[1].exists() is ours.can_generate()
        if ours.can_generate():
            mine, theirs = (json.loads(f.read_text()) for f in files)
            special = ("bos_token_id", "eos_token_id", "pad_token_id")
            assert {k: mine[k] for k in special} == {k: theirs[k] for k in special} == {
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0
            }  # fmt: skip
            again = StableLmForCausalLM.from_pretrained(files[1].parent)  # the reference's file reads back
            assert again.generation_config.eos_token_id == 2


def test_gradient_checkpointing_in_the_config_turns_it_on_as_the_reference(tmp_path):
    config, ref_config = tiny_config(), reference_config(tiny_config())
    config.gradient_checkpointing = ref_config.gradient_checkpointing = True  # set before building
    ours, ref = StableLmForCausalLM(config), transformers.StableLmForCausalLM(ref_config)
    assert ours.is_gradient_checkpointing is ref.is_gradient_checkpointing is True
    assert not hasattr(config, "gradient_checkpointing") and not hasattr(ref_config, "gradient_checkpointing")
    ours.save_pretrained(tmp_path / "a")
    assert "gradient_checkpointing" not in json.loads((tmp_path / "a" / "config.json").read_text())
    # An older config.json that holds the key
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**saved, "gradient_checkpointing": True}))
    loaded = StableLmForCausalLM.from_pretrained(tmp_path / "a")
    theirs = transformers.StableLmForCausalLM.from_pretrained(tmp_path / "a")
    assert loaded.is_gradient_checkpointing is theirs.is_gradient_checkpointing is True
    assert "gradient_checkpointing" not in loaded.config.to_dict()
    assert StableLmForCausalLM(tiny_config()).is_gradient_checkpointing is False


def test_tensor_parallel_plan_is_empty():
    # The reference's tools read `tp_plan` to shard a model over devices; stablelm shards nothing.
    assert StableLmForCausalLM(tiny_config()).tp_plan == {} and StableLmModel(tiny_config()).tp_plan == {}
