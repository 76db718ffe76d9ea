"""`model.fsdp_plan`: the reference's FSDP plan, which `stablelm.training.distributed.wrap` follows (its
units: `stablelm.training.fsdp_plan.units`); a plan set by hand is checked. The sharding itself runs in
tests/test_training_distributed.py (two processes)."""

from __future__ import annotations

import pytest
from conftest import reference_config, tiny_config, transformers

import stablelm
from stablelm.training.fsdp_plan import units


@pytest.mark.parametrize(
    "name",
    [
        "StableLmModel",
        "StableLmForCausalLM",
        "StableLmForSequenceClassification",
        "StableLmForTokenClassification",
    ],
)
@pytest.mark.parametrize("tied", [False, True])
def test_the_plan_is_the_references(name, tied):
    config = tiny_config(tie_word_embeddings=tied)
    ours = getattr(stablelm, name)(config)
    ref = getattr(transformers, name)(reference_config(config))
    assert ours.fsdp_plan == ref.fsdp_plan and ours._fsdp_plan == ref._fsdp_plan
    assert type(config).base_model_fsdp_plan == type(reference_config(config)).base_model_fsdp_plan
    assert "base_model_fsdp_plan" not in config.to_dict()  # a class setting, not written to config.json


def test_the_units_wrap_shards_before_the_root():
    model = stablelm.StableLmForCausalLM(tiny_config(num_hidden_layers=3))
    layers = [f"model.layers.{i}" for i in range(3)]
    assert [(name, reshard) for name, _, reshard in units(model)] == [
        ("model.embed_tokens", True), *[(name, True) for name in layers], ("model.norm", False),
    ]  # fmt: skip
    assert all(module is model.get_submodule(name) for name, module, _ in units(model))
    # a head that shares the embedding's weight: the embedding stays with it in the root unit
    tied = stablelm.StableLmForCausalLM(tiny_config(num_hidden_layers=3, tie_word_embeddings=True))
    assert [name for name, _, _ in units(tied)] == [*layers, "model.norm"]


def test_a_plan_set_by_hand_is_followed_and_checked():
    model = stablelm.StableLmForCausalLM(tiny_config(num_hidden_layers=2))
    model.fsdp_plan = {"model.layers.*": "keep_full_weight", "lm_head": "free_full_weight"}
    assert [(name, reshard) for name, _, reshard in units(model)] == [
        ("model.layers.0", False), ("model.layers.1", False), ("lm_head", True),
    ]  # fmt: skip
    assert model._fsdp_plan == model.fsdp_plan
    # a pattern that names a module and one inside it: the outer one is the unit
    model.fsdp_plan = {"model.layers.*": "free_full_weight", "model.layers.*.mlp": "free_full_weight"}
    assert [name for name, _, _ in units(model)] == ["model.layers.0", "model.layers.1"]
    model.fsdp_plan = None  # no units: the whole model shards as one
    assert model.fsdp_plan == {} and units(model) == []
    with pytest.raises(
        ValueError, match=r"fsdp_plan\['model.norm'\] = 'shard' .* free_full_weight, keep_full_weight"
    ):
        model.fsdp_plan = {"model.norm": "shard"}
    with pytest.raises(ValueError, match="'model.decoder.\\*', which matches no module"):
        model.fsdp_plan = {"model.decoder.*": "free_full_weight"}
    with pytest.raises(ValueError, match="fsdp_plan must be a dict"):
        model.fsdp_plan = ["model.norm"]
    assert model.fsdp_plan == {}  # refused plans leave the one before
