"""Hostile or wrong config.json values are refused with a ValueError naming the field and the file.

Loose values that real checkpoints hold (eos_token_id lists, `rope_scaling: null`, torch_dtype strings,
unknown keys, `classifier_dropout: null`) keep loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, transformers

from stablelm import StableLmConfig

DEMO = Path(__file__).parents[2] / "stablelm" / "assets" / "demo"

# The published config.json files of four StableLM checkpoints.
STABLELM_3B_4E1T = {
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
STABLELM_ZEPHYR_3B = {**STABLELM_3B_4E1T, "attention_dropout": 0.0, "transformers_version": "4.38.2"}
STABLELM_2_1_6B = {
    **STABLELM_3B_4E1T,
    "bos_token_id": 100257,
    "eos_token_id": 100257,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 24,
    "torch_dtype": "float16",
    "use_qkv_bias": True,
    "vocab_size": 100352,
}
STABLELM_2_12B = {
    **STABLELM_2_1_6B,
    "attention_dropout": 0.0,
    "hidden_size": 5120,
    "initializer_range": 0.01,
    "intermediate_size": 13824,
    "num_hidden_layers": 40,
    "num_key_value_heads": 8,
    "qk_layernorm": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0",
    "use_parallel_residual": True,
    "use_qkv_bias": False,
}
BASE = {"model_type": "stablelm", **TINY}


def _write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "config.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# (the key and value written into config.json, the field the message must name)
HOSTILE = [
    ({"partial_rotary_factor": "0.25"}, "partial_rotary_factor"),
    ({"hidden_dropout": "0.1"}, "hidden_dropout"),
    ({"attention_dropout": 1.5}, "attention_dropout"),
    ({"classifier_dropout": "0.1"}, "classifier_dropout"),
    ({"initializer_range": "0.02"}, "initializer_range"),
    ({"rope_scaling": {"type": "linear", "factor": "2"}}, "rope_scaling['factor']"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling['factor']"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": -2.0}}, "rope_scaling['factor']"),
    ({"rope_scaling": {"rope_type": "linear", "factor": float("nan")}}, "rope_scaling['factor']"),
    ({"rope_scaling": {"rope_type": ["linear"], "factor": 2.0}}, "rope_scaling"),
    (
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": "8"}},
        "rope_scaling['original_max_position_embeddings']",
    ),
    (
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 4.0,
                "high_freq_factor": 1.0,
            }
        },
        "rope_scaling['high_freq_factor']",
    ),
    (
        {"rope_scaling": {"rope_type": "longrope", "short_factor": ["1"] * 4, "long_factor": [1.0] * 4}},
        "rope_scaling['short_factor']",
    ),
    ({"rope_parameters": "default"}, "rope_parameters"),
    (
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": "32"}},
        "rope_parameters['beta_fast']",
    ),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}}, "rope_theta"),
    ({"layer_norm_eps": float("nan")}, "layer_norm_eps"),
    ({"layer_norm_eps": "1e-5"}, "layer_norm_eps"),
    ({"rope_theta": float("inf")}, "rope_theta"),
    ({"eos_token_id": "0"}, "eos_token_id"),
    ({"eos_token_id": 128}, "eos_token_id"),  # TINY's vocabulary has 128 tokens
    ({"eos_token_id": [0, 500]}, "eos_token_id"),
    ({"bos_token_id": -1}, "bos_token_id"),
    ({"pad_token_id": True}, "pad_token_id"),
    ({"pad_token_id": [1, 2]}, "pad_token_id"),
    ({"use_cache": "false"}, "use_cache"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings"),
    ({"qk_layernorm": 1}, "qk_layernorm"),
    ({"use_parallel_residual": None}, "use_parallel_residual"),
    ({"use_qkv_bias": "true"}, "use_qkv_bias"),
    ({"vocab_size": True}, "vocab_size"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers"),
    ({"hidden_size": 128.0}, "hidden_size"),
    ({"hidden_act": ["silu"]}, "hidden_act"),
    ({"torch_dtype": 16}, "torch_dtype"),
    ({"num_labels": "2"}, "num_labels"),
    ({"id2label": ["neg", "pos"]}, "id2label"),
    ({"id2label": {"first": "neg"}}, "id2label"),
    ({"label2id": {"neg": [0]}}, "label2id"),
    ({"label2id": {"neg": "first"}}, "label2id"),
    ({"label2id": {"neg": -1}}, "label2id"),
    ({"original_max_position_embeddings": -1}, "original_max_position_embeddings"),
]


@pytest.mark.parametrize("change,field", HOSTILE, ids=[f"{f}-{i}" for i, (_, f) in enumerate(HOSTILE)])
def test_hostile_values_name_the_field_and_the_file(tmp_path, change, field):
    path = _write(tmp_path, {**BASE, **change})
    for load in (StableLmConfig.from_json_file, lambda p: StableLmConfig.from_pretrained(p.parent)):
        with pytest.raises(ValueError) as info:
            load(path)
        assert str(path) in str(info.value)
        assert field in str(info.value)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(partial_rotary_factor="0.25"), "partial_rotary_factor"),
        (dict(rope_scaling={"rope_type": "linear", "factor": "2"}), "rope_scaling['factor']"),
        (dict(tie_word_embeddings="no"), "tie_word_embeddings"),
        (dict(eos_token_id=50304), "eos_token_id"),
        (dict(layer_norm_eps=float("nan")), "layer_norm_eps"),
    ],
)
def test_python_api_gets_the_same_value_errors(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[")):
        StableLmConfig(**kwargs)


def test_string_booleans_are_not_taken_as_true(tmp_path):
    path = _write(tmp_path, {**BASE, "tie_word_embeddings": "false"})
    with pytest.raises(ValueError, match=r"tie_word_embeddings must be true or false .*'false' \(a str\)"):
        StableLmConfig.from_json_file(path)


def test_damaged_files_name_the_file(tmp_path):
    path = _write(tmp_path, "")
    path.write_bytes(b'{"vocab_size": "\xff\xfe"}')
    with pytest.raises(ValueError, match="is not UTF-8 text") as info:
        StableLmConfig.from_json_file(path)
    assert str(path) in str(info.value)
    _write(tmp_path, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="is not valid JSON") as info:
        StableLmConfig.from_pretrained(tmp_path)
    assert str(path) in str(info.value)
    _write(tmp_path, '{"vocab_size": 1' + "0" * 5000 + "}")  # past Python's limit on integer digits
    with pytest.raises(ValueError, match="is not valid JSON") as info:
        StableLmConfig.from_json_file(path)
    assert str(path) in str(info.value)


def test_a_self_key_is_kept_as_an_unknown_key(tmp_path):
    config = StableLmConfig.from_json_file(_write(tmp_path, {**BASE, "self": 1}))
    assert config.extra == {"self": 1}


@pytest.mark.parametrize(
    "data",
    [STABLELM_3B_4E1T, STABLELM_ZEPHYR_3B, STABLELM_2_1_6B, STABLELM_2_12B],
    ids=["stablelm-3b-4e1t", "stablelm-zephyr-3b", "stablelm-2-1_6b", "stablelm-2-12b"],
)
def test_real_checkpoint_configs_still_load(tmp_path, data):
    config = StableLmConfig.from_pretrained(_write(tmp_path, data).parent)
    for key, value in data.items():
        if key not in ("architectures", "transformers_version"):
            assert getattr(config, key) == value, key
    assert config.extra == {k: data[k] for k in ("architectures", "transformers_version")}
    assert StableLmConfig.from_dict(config.to_dict()) == config
    transformers.StableLmConfig.from_dict(data)  # the reference reads it too


def test_loose_values_of_real_files_still_load(tmp_path):
    loose = {
        **BASE,
        "eos_token_id": [0, 2],
        "bos_token_id": None,
        "rope_scaling": None,
        "classifier_dropout": None,
        "dtype": "bfloat16",
        "rope_theta": 10000,
        "layer_norm_eps": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000, "partial_rotary_factor": 0.5},
        "id2label": {"0": "neg", "1": "pos"},
        "some_future_key": {"nested": [1, 2]},
        "rope_pct": 0.25,
    }
    config = StableLmConfig.from_json_file(_write(tmp_path, loose))
    assert config.eos_token_id == [0, 2] and config.bos_token_id is None and config.torch_dtype == "bfloat16"
    assert config.rope_theta == 500000 and config.partial_rotary_factor == 0.5
    assert config.extra == {"some_future_key": {"nested": [1, 2]}, "rope_pct": 0.25}
    assert config.id2label == {0: "neg", 1: "pos"}
    assert StableLmConfig.from_pretrained(DEMO).vocab_size == 4096
