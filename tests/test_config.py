"""StableLmConfig: fields and defaults, both config.json layouts, round trips and validation messages."""

from __future__ import annotations

import json

import pytest
from conftest import reference_config, tiny_config, transformers

from stablelm import StableLmConfig

# stablelm-3b-4e1t's config.json as published (the older, top-level rope layout).
STABLELM_3B = {
    "architectures": ["StableLmForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "silu",
    "hidden_dropout": 0.0,
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 6912,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 4096,
    "model_type": "stablelm",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "partial_rotary_factor": 0.25,
    "rope_scaling": None,
    "rope_theta": 10000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.38.0",
    "use_cache": True,
    "use_qkv_bias": False,
    "vocab_size": 50304,
}
# stablelm-2-12b's shape, in the newer layout that transformers 5 writes.
STABLELM_2_12B = {
    "model_type": "stablelm",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 40,
    "vocab_size": 100352,
    "qk_layernorm": True,
    "use_parallel_residual": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.25},
    "dtype": "bfloat16",
}


def test_defaults_are_stablelm_3b_4e1t():
    c = StableLmConfig()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (50304, 2560, 6912, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.hidden_act, c.max_position_embeddings) == (
        32,
        32,
        "silu",
        4096,
    )
    assert (c.initializer_range, c.layer_norm_eps, c.use_cache, c.tie_word_embeddings) == (
        0.02,
        1e-5,
        True,
        False,
    )
    assert (c.rope_theta, c.rope_scaling, c.partial_rotary_factor) == (10000, None, 0.25)
    assert (c.use_qkv_bias, c.qk_layernorm, c.use_parallel_residual) == (False, False, False)
    assert (c.hidden_dropout, c.attention_dropout, c.bos_token_id, c.eos_token_id) == (0.0, 0.0, 0, 0)
    assert (c.pad_token_id, c.classifier_dropout, c.problem_type, c.torch_dtype, c.num_labels) == (
        None,
        None,
        None,
        None,
        2,
    )
    assert (c.head_dim, c.rotary_dim, c.num_kv_groups) == (80, 20, 1)


def test_defaults_equal_the_reference_defaults():
    ours, ref = StableLmConfig(), transformers.StableLmConfig()
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "max_position_embeddings",
        "initializer_range",
        "layer_norm_eps",
        "use_cache",
        "tie_word_embeddings",
        "use_qkv_bias",
        "qk_layernorm",
        "use_parallel_residual",
        "hidden_dropout",
        "attention_dropout",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.rope_parameters == {**ref.rope_parameters}


def test_derived_properties_are_read_only():
    c = StableLmConfig.from_dict(STABLELM_2_12B)
    assert (c.head_dim, c.rotary_dim, c.num_kv_groups) == (160, 40, 4)
    with pytest.raises(AttributeError):
        c.head_dim = 3


def test_reads_the_older_layout_and_keeps_unknown_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(STABLELM_3B))
    c = StableLmConfig.from_pretrained(tmp_path)
    assert c.torch_dtype == "bfloat16" and c.rope_theta == 10000 and c.partial_rotary_factor == 0.25
    assert c.extra == {"architectures": ["StableLmForCausalLM"], "transformers_version": "4.38.0"}
    c.save_pretrained(tmp_path / "out")
    again = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in STABLELM_3B.items():
        assert again[key] == value, key
    assert StableLmConfig.from_pretrained(tmp_path / "out") == c


def test_reads_the_newer_rope_parameters_layout():
    c = StableLmConfig.from_dict(STABLELM_2_12B)
    assert c.qk_layernorm and c.use_parallel_residual and c.torch_dtype == "bfloat16"
    assert c.rope_scaling is None and c.partial_rotary_factor == 0.25
    scaled = StableLmConfig.from_dict(
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": 500.0,
                "partial_rotary_factor": 0.5,
            }
        }
    )
    assert scaled.rope_theta == 500.0 and scaled.partial_rotary_factor == 0.5
    assert scaled.rope_scaling == {"rope_type": "yarn", "factor": 4.0}


def test_legacy_type_key_in_rope_scaling():
    c = StableLmConfig.from_dict({**STABLELM_3B, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0} and c.rope_type == "linear"


@pytest.mark.parametrize(
    "data",
    [STABLELM_3B, STABLELM_2_12B, {**STABLELM_3B, "rope_scaling": {"type": "dynamic", "factor": 2.0}}],
    ids=["3b-old-layout", "12b-new-layout", "legacy-dynamic"],
)
def test_reference_reads_what_we_write_and_we_read_what_it_writes(data):
    ours = StableLmConfig.from_dict(data)
    ref = transformers.StableLmConfig.from_dict(ours.to_dict())
    assert ref.rope_parameters == ours.rope_parameters
    assert (ref.num_key_value_heads, ref.qk_layernorm, ref.use_parallel_residual) == (
        ours.num_key_value_heads,
        ours.qk_layernorm,
        ours.use_parallel_residual,
    )
    back = StableLmConfig.from_dict(json.loads(ref.to_json_string()))
    assert back.rope_parameters == ours.rope_parameters and back.hidden_size == ours.hidden_size


def test_labels():
    c = StableLmConfig(num_labels=3)
    assert c.num_labels == 3 and c.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    named = StableLmConfig.from_dict({"id2label": {"0": "neg", "1": "pos"}})
    assert named.label2id == {"neg": 0, "pos": 1} and named.num_labels == 2
    assert StableLmConfig.from_dict(named.to_dict()).id2label == {0: "neg", 1: "pos"}
    assert reference_config(named).id2label == {0: "neg", 1: "pos"}


def test_label2id_indices_may_be_strings_kept_as_given_as_the_reference(tmp_path):
    labels = {"id2label": {0: "label"}, "label2id": {"label": "0"}}  # the reference's own test config
    ours = StableLmConfig(**labels)
    ref = transformers.StableLmConfig(**labels)
    assert ours.label2id == ref.label2id == {"label": "0"} and ours.id2label == ref.id2label
    ours.save_pretrained(tmp_path)
    assert StableLmConfig.from_pretrained(tmp_path).label2id == {"label": "0"}
    assert transformers.StableLmConfig.from_pretrained(tmp_path).label2id == {"label": "0"}
    mixed = StableLmConfig(id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": "1"})
    assert mixed.label2id == {"a": 0, "b": "1"}


@pytest.mark.parametrize("label2id", [{"neg": [0]}, {"neg": "first"}, {"neg": "-1"}, {"neg": 0.5}, {1: 0}])
def test_label2id_refuses_what_is_no_index(label2id):
    with pytest.raises(ValueError, match='label2id must map label names to indices, such as {"NEGATIVE": 0}'):
        StableLmConfig(label2id=label2id)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(hidden_size=100, num_attention_heads=3),
            r"hidden_size \(100\) must be divisible by num_attention_heads \(3\)",
        ),
        (
            dict(num_attention_heads=32, num_key_value_heads=5),
            r"must be divisible by num_key_value_heads \(5\)",
        ),
        (dict(partial_rotary_factor=0.0), r"partial_rotary_factor must be in \(0, 1\]"),
        (dict(partial_rotary_factor=1.5), r"partial_rotary_factor must be in \(0, 1\]"),
        (dict(partial_rotary_factor=0.3125), r"gives rotary dimension 25 .* must be even"),
        (dict(hidden_size=96, num_attention_heads=32, partial_rotary_factor=0.25), "rotary dimension 0"),
        (dict(rope_scaling={"rope_type": "magic", "factor": 2.0}), "Unknown rope type 'magic'"),
        (dict(rope_scaling={"rope_type": "linear"}), r"missing factor; add \"factor\": \.\.\."),
        (
            dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
            "missing low_freq_factor, high_freq_factor",
        ),
        (
            dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}),
            "needs rotary_dim / 2 = 10",
        ),
        (dict(rope_scaling="linear"), "rope_scaling must be a dict"),
        (dict(hidden_act="swishy"), "hidden_act 'swishy' is not supported"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(num_hidden_layers=-1), "num_hidden_layers must be a positive integer"),
        (dict(intermediate_size=2.5), "intermediate_size must be a positive integer"),
        (dict(layer_norm_eps=0), "layer_norm_eps must be a positive number"),
        (dict(rope_theta=-1), "rope_theta must be a positive number"),
        (dict(hidden_dropout=1.0), r"hidden_dropout must be in \[0, 1\)"),
        (dict(problem_type="ranking"), "problem_type must be one of"),
        (dict(attn_implementation="flash"), "attn_implementation must be"),
        (dict(num_labels=0), "num_labels must be a positive integer"),
        (dict(model_type="llama"), "model_type 'llama'.*implements 'stablelm' only"),
    ],
)
def test_validation_messages_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StableLmConfig(**kwargs)


def test_from_json_file_errors(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        StableLmConfig.from_json_file(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list"):
        StableLmConfig.from_json_file(bad)
    bad.write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        StableLmConfig.from_json_file(bad)


def test_from_pretrained_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="No config.json"):
        StableLmConfig.from_pretrained(tmp_path)


def test_from_pretrained_unknown_name_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        FileNotFoundError, match="Cannot find model 'no-such-org/no-such-model'.*local folder"
    ):
        StableLmConfig.from_pretrained("no-such-org/no-such-model")


def test_from_pretrained_overrides(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    assert StableLmConfig.from_pretrained(tmp_path, num_hidden_layers=1).num_hidden_layers == 1


def test_torch_dtype_objects_are_written_as_strings():
    import torch

    assert StableLmConfig(torch_dtype=torch.float16).to_dict()["torch_dtype"] == "float16"


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/folder", "a/b/c", "~/nothing-here"])
def test_a_missing_local_path_is_named_as_such(name):
    with pytest.raises(FileNotFoundError, match="No folder at"):
        StableLmConfig.from_pretrained(name)


def test_coerce_converts_the_references_config_and_refuses_other_objects(tmp_path):
    theirs = reference_config(
        tiny_config(qk_layernorm=True, rope_scaling={"rope_type": "linear", "factor": 2.0})
    )
    theirs.save_pretrained(tmp_path)
    theirs = transformers.AutoConfig.from_pretrained(tmp_path, attn_implementation="eager")
    ours = StableLmConfig.coerce(theirs)
    assert ours.to_diff_dict() == StableLmConfig.from_pretrained(tmp_path).to_diff_dict()
    assert (ours.attn_implementation, ours.name_or_path) == ("eager", str(tmp_path))
    assert "chunk_size_feed_forward" not in ours.to_dict()  # the reference's base defaults stay out
    assert StableLmConfig.coerce(ours) is ours
    with pytest.raises(TypeError, match=r"config must be a stablelm\.StableLmConfig, got builtins\.dict"):
        StableLmConfig.coerce({"vocab_size": 8})
    with pytest.raises(ValueError, match="model_type 'llama'"):
        StableLmConfig.coerce(transformers.LlamaConfig())


def test_a_model_built_from_the_references_config_says_how_to_convert_it():
    from stablelm import StableLmForCausalLM

    theirs = reference_config(tiny_config())
    with pytest.raises(
        TypeError,
        match=r"got transformers\..*StableLmConfig; .*StableLmConfig\.from_dict\(config\.to_dict\(\)\)",
    ):
        StableLmForCausalLM(theirs)
    model = StableLmForCausalLM.from_config(theirs)  # from_config takes it as it is, as the reference's
    assert isinstance(model.config, StableLmConfig) and model.config.vocab_size == theirs.vocab_size
