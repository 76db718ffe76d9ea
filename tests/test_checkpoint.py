"""Checkpoints: round trips with the reference, formats, dtypes, hub resolution, and every bad input."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_pair, rope_scaling_for, tiny_config, transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import stablelm
from stablelm import (
    StableLmConfig,
    StableLmForCausalLM,
    StableLmForSequenceClassification,
    StableLmForTokenClassification,
    StableLmModel,
)
from stablelm.checkpoint import CheckpointError
from stablelm.checkpoint import fill as fill_module
from stablelm.checkpoint import load as load_module
from stablelm.checkpoint.save import parse_size

SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96)
# float32 logits of a model loaded by from_pretrained (stablelm's kernels, another summation order than
# MKL's: within rounding) against the reference's; a wrong or misplaced weight is off by far more.
FP32_TOL = 1e-5


def small_config(**overrides) -> StableLmConfig:
    return tiny_config(**{**SMALL, **overrides})


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def pair():
    """Our causal LM and the reference with the same random fp32 weights (untied)."""
    return make_pair(small_config())


@pytest.fixture(scope="module")
def ref_dir(pair, tmp_path_factory) -> Path:
    """The reference model saved by the reference (one model.safetensors)."""
    folder = tmp_path_factory.mktemp("ref")
    pair[1].save_pretrained(folder)
    return folder


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def rewrite_weights(folder: Path, edit) -> None:
    """Apply `edit` to the tensors of folder/model.safetensors and write them back."""
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# ---- round trips with the reference ----------------------------------------------------------------------
def test_saved_by_the_reference_loads_exactly(pair, ref_dir):
    _, ref = pair
    model = StableLmForCausalLM.from_pretrained(ref_dir)
    assert not model.training and model.dtype == torch.float32
    assert set(model.state_dict()) == set(ref.state_dict())
    with torch.no_grad():
        assert max_diff(model(ids()).logits, ref(ids()).logits) <= FP32_TOL


def test_saved_by_us_loads_in_the_reference(pair, tmp_path):
    ours, ref = pair
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["torch_dtype"]) == (
        "stablelm",
        ["StableLmForCausalLM"],
        "float32",
    )
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        metadata = f.metadata()  # the reference's, and the id config files switch with (save_journal)
        assert metadata.pop("format") == "pt" and list(metadata) == ["stablelm_save_id"]
    loaded = transformers.StableLmForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert max_diff(loaded(ids()).logits, ref(ids()).logits) <= FP32_TOL
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_sharded_saved_by_the_reference_loads_exactly(pair, tmp_path):
    _, ref = pair
    ref.save_pretrained(tmp_path, max_shard_size="30KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    model = StableLmForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert max_diff(model(ids()).logits, ref(ids()).logits) <= FP32_TOL


def test_sharded_saved_by_us_loads_in_the_reference_and_here(pair, tmp_path):
    ours, ref = pair
    ours.save_pretrained(tmp_path, max_shard_size="30KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(ours.state_dict())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in ours.state_dict().values())
    for shard in shards:  # only a tensor larger than the limit gets a shard above it
        with safe_open(shard, framework="pt") as f:
            assert shard.stat().st_size <= 30_000 + 1_000 or len(f.keys()) == 1
    for model in (
        transformers.StableLmForCausalLM.from_pretrained(tmp_path).eval(),
        StableLmForCausalLM.from_pretrained(tmp_path),
    ):
        with torch.no_grad():
            assert max_diff(model(ids()).logits, ref(ids()).logits) <= FP32_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_keep_their_dtype_with_auto(pair, tmp_path, dtype):
    _, ref = pair
    ref.save_pretrained(tmp_path / "fp32")
    half = transformers.StableLmForCausalLM.from_pretrained(tmp_path / "fp32", dtype=dtype)
    half.save_pretrained(tmp_path / "half")
    model = StableLmForCausalLM.from_pretrained(tmp_path / "half", dtype="auto")
    assert model.dtype == dtype and model.config.torch_dtype == str(dtype).removeprefix("torch.")
    assert all(p.dtype == dtype for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    for name, tensor in half.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with torch.no_grad():
        assert max_diff(model(ids()).logits, half.eval()(ids()).logits) <= 0.05


@pytest.mark.parametrize(
    "kwargs", [{"dtype": torch.bfloat16}, {"dtype": "bfloat16"}, {"torch_dtype": "torch.bfloat16"}]
)
def test_fp32_checkpoint_converts_on_load(pair, ref_dir, kwargs):
    _, ref = pair
    model = StableLmForCausalLM.from_pretrained(ref_dir, **kwargs)
    assert model.dtype == torch.bfloat16
    for name, tensor in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor.to(torch.bfloat16)), name


def test_dtype_none_and_auto_follow_the_checkpoint_as_the_reference(pair, ref_dir, tmp_path):
    """transformers 5 defaults to dtype="auto": a bf16 checkpoint loads as bf16 unless asked otherwise."""
    assert StableLmForCausalLM.from_pretrained(ref_dir).dtype == torch.float32
    _, ref = pair
    transformers.StableLmForCausalLM.from_pretrained(ref_dir, dtype=torch.bfloat16).save_pretrained(
        tmp_path / "bf16"
    )
    assert StableLmForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert transformers.StableLmForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    rewrite_weights(folder, lambda t: t.update({k: v.to(torch.float16) for k, v in t.items()}))
    assert (
        StableLmForCausalLM.from_pretrained(folder, dtype="auto").dtype == torch.float16
    )  # from the weights
    assert StableLmForCausalLM.from_pretrained(folder).dtype == torch.float16


def test_dtype_arguments_that_are_wrong_say_what_to_pass(ref_dir):
    with pytest.raises(ValueError, match="not a floating-point torch dtype"):
        StableLmForCausalLM.from_pretrained(ref_dir, dtype="int8")
    with pytest.raises(ValueError, match="pass only dtype"):
        StableLmForCausalLM.from_pretrained(ref_dir, dtype="float16", torch_dtype="bfloat16")


def test_device_arguments(ref_dir):
    assert StableLmForCausalLM.from_pretrained(ref_dir, device="auto").device.type == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    assert StableLmForCausalLM.from_pretrained(ref_dir, device_map="cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="one device"):
        StableLmForCausalLM.from_pretrained(ref_dir, device_map={"model": 0})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            StableLmForCausalLM.from_pretrained(ref_dir, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loads_straight_onto_the_gpu(pair, ref_dir):
    _, ref = pair
    model = StableLmForCausalLM.from_pretrained(ref_dir, device="cuda", dtype="bfloat16")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert model.model.rotary_emb.inv_freq.device.type == "cuda"
    for name, tensor in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name].cpu(), tensor.to(torch.bfloat16)), name


def test_moving_after_load_keeps_the_logits(pair, ref_dir):
    _, ref = pair
    model = StableLmForCausalLM.from_pretrained(ref_dir).to("cpu").to(torch.float64)
    with torch.no_grad():
        assert max_diff(model(ids()).logits, ref(ids()).logits) <= 1e-5


def test_attn_implementation_and_config_overrides(ref_dir):
    model = StableLmForCausalLM.from_pretrained(ref_dir, attn_implementation="eager", pad_token_id=5)
    assert model.config.attn_implementation == "eager" and model.config.pad_token_id == 5
    with pytest.raises(TypeError, match="config fields"):
        StableLmForCausalLM.from_pretrained(ref_dir, num_lables=3)


def test_an_explicit_config_is_used_and_left_unchanged(ref_dir):
    config = StableLmConfig.from_pretrained(ref_dir)
    model = StableLmForCausalLM.from_pretrained(ref_dir, config=config, dtype="bfloat16")
    assert model.config is not config and config.torch_dtype == "float32"


@pytest.mark.parametrize("rope", ["linear", "dynamic", "yarn", "longrope", "llama3"])
def test_every_rope_type_loads_exactly(tmp_path, rope):
    config = small_config(rope_scaling=rope_scaling_for(rope, small_config().rotary_dim))
    _, ref = make_pair(config)
    ref.save_pretrained(tmp_path)
    model = StableLmForCausalLM.from_pretrained(tmp_path)
    long_ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))  # past 16 positions
    with torch.no_grad():
        assert max_diff(model(long_ids).logits, ref(long_ids).logits) <= FP32_TOL


@pytest.mark.parametrize("safe", [True, False])
def test_updating_loaded_weights_never_writes_the_checkpoint(pair, tmp_path, safe):
    pair[0].save_pretrained(tmp_path, safe_serialization=safe)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = StableLmForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert torch.equal(model.model.norm.weight, pair[0].model.norm.weight + 1)


def test_saving_over_the_loaded_folder_keeps_both_intact(pair, tmp_path):
    ours, ref = pair
    ours.save_pretrained(tmp_path)
    model = StableLmForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    model.save_pretrained(tmp_path)
    again = StableLmForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again.model.norm.weight, 2.0 * ref.model.norm.weight)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, ref.model.layers[1].mlp.up_proj.weight)


# ---- tied embeddings, heads and the bare model -----------------------------------------------------------
def test_tied_checkpoints_omit_the_head_both_ways(tmp_path):
    ours, ref = make_pair(small_config(tie_word_embeddings=True))
    ref.save_pretrained(tmp_path / "ref")
    assert "lm_head.weight" not in load_file(tmp_path / "ref" / "model.safetensors")
    model = StableLmForCausalLM.from_pretrained(tmp_path / "ref")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert max_diff(model(ids()).logits, ref(ids()).logits) <= FP32_TOL
    model.save_pretrained(tmp_path / "ours")
    assert "lm_head.weight" not in load_file(tmp_path / "ours" / "model.safetensors")
    again = transformers.StableLmForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert max_diff(again(ids()).logits, ref(ids()).logits) <= FP32_TOL


def test_a_tied_checkpoint_that_keeps_the_head_loads(tmp_path):
    ours, ref = make_pair(small_config(tie_word_embeddings=True))
    ref.save_pretrained(tmp_path)
    rewrite_weights(tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model = StableLmForCausalLM.from_pretrained(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def _load_both(folder: Path, ours_cls=StableLmForCausalLM, **options):
    """Load `folder` with ours and the reference's class: (ours, theirs, our info, their info, our warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours, info = ours_cls.from_pretrained(folder, output_loading_info=True, **options)
    ref_cls = getattr(transformers, ours_cls.__name__)
    theirs, their_info = ref_cls.from_pretrained(folder, output_loading_info=True, **options)
    return ours, theirs, info, their_info, [str(w.message) for w in caught if w.category is UserWarning]


def _assert_loaded_as_stored(model, folder: Path, skip: set[str]) -> None:
    stored = load_file(folder / "model.safetensors")
    for key, tensor in model.state_dict().items():
        if key not in skip and key in stored:
            assert torch.equal(tensor, stored[key]), key


def test_an_untied_checkpoint_without_the_head_loads_with_a_new_head_and_says_so(ref_dir, tmp_path):
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    rewrite_weights(folder, lambda t: t.pop("lm_head.weight"))
    ours, theirs, info, their_info, said = _load_both(folder)
    assert info == their_info and info["missing_keys"] == {"lm_head.weight"}
    assert len(said) == 1 and str(folder / "model.safetensors") in said[0] and "lm_head.weight" in said[0]
    assert '"tie_word_embeddings": true' in said[0]  # what to change if the head should be the embedding
    _assert_loaded_as_stored(ours, folder, skip={"lm_head.weight"})
    std = ours.config.initializer_range  # initialised as the reference initialises it: N(0, std)
    assert abs(ours.lm_head.weight.std().item() - std) < 0.2 * std
    assert abs(theirs.lm_head.weight.std().item() - std) < 0.2 * std


def test_output_flags_given_to_from_pretrained_reach_the_forward(ref_dir):
    """output_hidden_states / output_attentions / return_dict, which config.json does not carry, set as the
    reference's from_pretrained sets them."""
    model = StableLmForCausalLM.from_pretrained(ref_dir, output_hidden_states=True, output_attentions=True)
    ref = transformers.StableLmForCausalLM.from_pretrained(
        ref_dir, output_hidden_states=True, output_attentions=True, attn_implementation="eager"
    )
    with torch.no_grad():
        ours, theirs = model(ids()), ref(ids())
    assert len(ours.hidden_states) == len(theirs.hidden_states) and len(ours.attentions) == len(
        theirs.attentions
    )
    assert max_diff(ours.attentions[-1], theirs.attentions[-1]) <= FP32_TOL
    plain = StableLmForCausalLM.from_pretrained(ref_dir, return_dict=False)
    with torch.no_grad():
        out = plain(ids())
    assert isinstance(out, tuple) and max_diff(out[0], theirs.logits) <= FP32_TOL


@pytest.mark.parametrize(
    "ours_cls, ref_name", [(StableLmForSequenceClassification, "StableLmForSequenceClassification"),
                           (StableLmForTokenClassification, "StableLmForTokenClassification")]
)  # fmt: skip
def test_classifiers_load_a_causal_backbone_and_initialise_their_head(pair, ref_dir, ours_cls, ref_name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ours_cls.from_pretrained(ref_dir, num_labels=3)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "newly initialised" in message and "score.weight" in message and "lm_head.weight" in message
    assert caught[0].filename == __file__  # points at the caller
    score = model.score
    assert score.weight.shape == (3, 64) and score.weight.requires_grad and not score.weight.is_meta
    assert 0.005 < score.weight.std().item() < 0.05  # normal(0, initializer_range=0.02)
    if score.bias is not None:
        assert torch.equal(score.bias, torch.zeros(3))
    ref = getattr(transformers, ref_name).from_pretrained(ref_dir, num_labels=3).eval()
    with torch.no_grad():
        ours_hidden = model.model(ids()).last_hidden_state
        assert max_diff(ours_hidden, ref.model(ids()).last_hidden_state) <= FP32_TOL


def test_a_classifier_round_trips_its_head(pair, tmp_path):
    ours, ref = make_pair(small_config(num_labels=3, pad_token_id=1), ours_cls=StableLmForSequenceClassification,
                          ref_cls_name="StableLmForSequenceClassification")  # fmt: skip
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = StableLmForSequenceClassification.from_pretrained(tmp_path)
    loaded_ref = transformers.StableLmForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert max_diff(model(ids()).logits, ref(ids()).logits) <= FP32_TOL
        assert max_diff(loaded_ref(ids()).logits, ref(ids()).logits) <= FP32_TOL


def test_the_bare_model_loads_a_causal_checkpoint_and_back(pair, ref_dir, tmp_path):
    _, ref = pair
    with pytest.warns(UserWarning, match="not used.*lm_head.weight"):
        base = StableLmModel.from_pretrained(ref_dir)
    with torch.no_grad():
        assert max_diff(base(ids()).last_hidden_state, ref.model(ids()).last_hidden_state) <= FP32_TOL
    base.save_pretrained(tmp_path)
    assert "embed_tokens.weight" in load_file(tmp_path / "model.safetensors")
    tied = StableLmForCausalLM.from_pretrained(tmp_path, tie_word_embeddings=True)  # adds the `model.` prefix
    assert torch.equal(tied.model.norm.weight, ref.model.norm.weight)


def test_rotary_frequencies_of_old_checkpoints_are_ignored(pair, ref_dir, tmp_path):
    _, ref = pair
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    old = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(2) for i in range(2)}
    rewrite_weights(folder, lambda t: t.update(old))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = StableLmForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert max_diff(model(ids()).logits, ref(ids()).logits) <= FP32_TOL


# ---- legacy .bin -----------------------------------------------------------------------------------------
def test_legacy_bin_loads_exactly(pair, ref_dir, tmp_path):
    _, ref = pair
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_bytes((ref_dir / "config.json").read_bytes())
    state = dict(ref.state_dict())
    state["model.rotary_emb.inv_freq"] = torch.ones(2)
    torch.save(state, folder / "pytorch_model.bin")
    model = StableLmForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert max_diff(model(ids()).logits, ref(ids()).logits) <= FP32_TOL


def test_sharded_bin_written_by_us_loads(pair, tmp_path):
    ours, ref = pair
    ours.save_pretrained(tmp_path, max_shard_size="30KB", safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin.index.json").is_file() and not list(tmp_path.glob("*.safetensors"))
    model = StableLmForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert max_diff(model(ids()).logits, ref(ids()).logits) <= FP32_TOL


def test_safetensors_are_preferred_over_bin(pair, ref_dir, tmp_path):
    _, ref = pair
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    torch.save({k: torch.zeros_like(v) for k, v in ref.state_dict().items()}, folder / "pytorch_model.bin")
    model = StableLmForCausalLM.from_pretrained(folder)
    assert torch.equal(model.model.norm.weight, ref.model.norm.weight)


# ---- the reference's options: variant, use_safetensors, subfolder, and those that change nothing -----------
def _same_weights(model, ref) -> None:
    ours_state = model.state_dict()
    for name, tensor in ref.state_dict().items():
        assert torch.equal(ours_state[name], tensor), name


@pytest.mark.parametrize("max_shard_size", [None, "30KB"])
def test_a_variant_saved_by_the_reference_loads_under_its_name(pair, tmp_path, max_shard_size):
    _, ref = pair
    ref.save_pretrained(
        tmp_path, variant="fp16", **({"max_shard_size": max_shard_size} if max_shard_size else {})
    )
    single = (tmp_path / "model.fp16.safetensors").is_file()
    assert single == (max_shard_size is None)
    assert single or (tmp_path / "model.safetensors.index.fp16.json").is_file()
    model = StableLmForCausalLM.from_pretrained(tmp_path, variant="fp16")
    theirs = transformers.StableLmForCausalLM.from_pretrained(tmp_path, variant="fp16")
    _same_weights(model, theirs)
    with pytest.raises(FileNotFoundError, match="holds weights of the variant 'fp16': pass it as variant="):
        StableLmForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(OSError):  # the reference refuses it too
        transformers.StableLmForCausalLM.from_pretrained(tmp_path)


def test_a_variant_names_the_bin_files_too_and_its_absence_is_explained(pair, ref_dir, tmp_path):
    _, ref = pair
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    torch.save({k: v * 2 for k, v in ref.state_dict().items()}, folder / "pytorch_model.v2.bin")
    model = StableLmForCausalLM.from_pretrained(folder, variant="v2")
    theirs = transformers.StableLmForCausalLM.from_pretrained(folder, variant="v2")
    _same_weights(model, theirs)
    assert torch.equal(model.model.norm.weight, ref.model.norm.weight * 2)
    with pytest.raises(
        FileNotFoundError, match="expected model.fp16.safetensors, .*without a variant: pass variant=None"
    ):
        StableLmForCausalLM.from_pretrained(ref_dir, variant="fp16")
    for bad in ("", "a/b", 16):
        with pytest.raises(ValueError, match="variant must be a name such as 'fp16'"):
            StableLmForCausalLM.from_pretrained(ref_dir, variant=bad)


def test_use_safetensors_keeps_to_one_format_as_the_reference(pair, ref_dir, tmp_path):
    _, ref = pair
    both = copy_checkpoint(ref_dir, tmp_path / "both")
    torch.save({k: v * 2 for k, v in ref.state_dict().items()}, both / "pytorch_model.bin")
    for use_safetensors in (None, True, False):
        model = StableLmForCausalLM.from_pretrained(both, use_safetensors=use_safetensors)
        theirs = transformers.StableLmForCausalLM.from_pretrained(both, use_safetensors=use_safetensors)
        _same_weights(model, theirs)
        factor = 2 if use_safetensors is False else 1
        assert torch.equal(model.model.norm.weight, ref.model.norm.weight * factor), use_safetensors
    only_bin = copy_checkpoint(both, tmp_path / "bin")
    (only_bin / "model.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match="holds pytorch_model.bin, which use_safetensors=True does not read"
    ):
        StableLmForCausalLM.from_pretrained(only_bin, use_safetensors=True)
    with pytest.raises(OSError):
        transformers.StableLmForCausalLM.from_pretrained(only_bin, use_safetensors=True)
    with pytest.raises(
        FileNotFoundError, match="holds model.safetensors, which use_safetensors=False does not"
    ):
        StableLmForCausalLM.from_pretrained(ref_dir, use_safetensors=False)
    with pytest.raises(OSError):
        transformers.StableLmForCausalLM.from_pretrained(ref_dir, use_safetensors=False)
    with pytest.raises(TypeError, match="use_safetensors must be True, False or None, got 1"):
        StableLmForCausalLM.from_pretrained(ref_dir, use_safetensors=1)


def test_subfolder_finds_every_file_under_the_folder(pair, ref_dir, tmp_path):
    _, ref = pair
    copy_checkpoint(ref_dir, tmp_path / "repo" / "text")
    (tmp_path / "repo" / "text" / "generation_config.json").write_text('{"max_new_tokens": 7}')
    model = StableLmForCausalLM.from_pretrained(tmp_path / "repo", subfolder="text")
    theirs = transformers.StableLmForCausalLM.from_pretrained(tmp_path / "repo", subfolder="text")
    _same_weights(model, theirs)
    assert model.generation_config.max_new_tokens == theirs.generation_config.max_new_tokens == 7
    with pytest.raises(FileNotFoundError, match="has no subfolder 'other'"):
        StableLmForCausalLM.from_pretrained(tmp_path / "repo", subfolder="other")
    (tmp_path / "repo" / "out").symlink_to(ref_dir, target_is_directory=True)
    with pytest.raises(CheckpointError, match="outside the model folder"):
        StableLmForCausalLM.from_pretrained(tmp_path / "repo", subfolder="out")


def test_options_for_memory_and_offloading_are_accepted_and_change_nothing(pair, ref_dir, tmp_path):
    """low_cpu_mem_usage and offload_state_dict (ignored by the reference too), offload_folder and
    offload_buffers (the whole model goes on one device): the same weights as a plain load."""
    _, ref = pair
    options = dict(
        low_cpu_mem_usage=True, offload_folder=tmp_path / "off", offload_state_dict=True, offload_buffers=True
    )
    model = StableLmForCausalLM.from_pretrained(ref_dir, **options)
    _same_weights(model, transformers.StableLmForCausalLM.from_pretrained(ref_dir, **options))
    _same_weights(model, ref)
    assert not (tmp_path / "off").exists()
    with pytest.raises(ValueError, match="device 'disk' offloads the weights to offload_folder"):
        StableLmForCausalLM.from_pretrained(ref_dir, device_map="disk", offload_folder=tmp_path / "off")


def test_a_transformers_config_is_taken_as_the_reference_takes_its_own(pair, ref_dir):
    _, ref = pair
    config = transformers.AutoConfig.from_pretrained(ref_dir, attn_implementation="eager")
    model = StableLmForCausalLM.from_pretrained(ref_dir, config=config)
    assert isinstance(model.config, StableLmConfig) and model.config.attn_implementation == "eager"
    with torch.no_grad():
        assert max_diff(model(ids()).logits, ref(ids()).logits) <= FP32_TOL
    model = StableLmForCausalLM.from_pretrained(None, config=config, state_dict=ref.state_dict())
    _same_weights(model, ref)


class _Planted:
    """Unpickling this would create a marker file: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_bin_that_would_run_code_is_refused_without_running_it(ref_dir, tmp_path):
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    torch.save(
        {"model.norm.weight": torch.ones(64), "payload": _Planted(marker)}, folder / "pytorch_model.bin"
    )
    with pytest.raises(CheckpointError, match="refusing to unpickle") as err:
        StableLmForCausalLM.from_pretrained(folder)
    assert str(folder / "pytorch_model.bin") in str(err.value) and "weights_only` set to `False" not in str(
        err.value
    )
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Planted(marker)))  # the plant works: plain unpickling does create it
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_a_bin_that_is_not_a_torch_file_is_called_corrupt(ref_dir, tmp_path, legacy):
    """Garbage (or a file torch's legacy writer made, cut short) is not taken for a pickle holding objects,
    and no message passes on torch's advice to turn weights_only off."""
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    (folder / "model.safetensors").unlink()
    if legacy:
        torch.save(
            {"model.norm.weight": torch.ones(64)}, folder / "x.bin", _use_new_zipfile_serialization=False
        )
        (folder / "pytorch_model.bin").write_bytes((folder / "x.bin").read_bytes()[:40])
        (folder / "x.bin").unlink()
    else:
        (folder / "pytorch_model.bin").write_bytes(b"garbage\n")
    with pytest.raises(CheckpointError, match="is not a valid PyTorch weights file") as err:
        StableLmForCausalLM.from_pretrained(folder)
    assert "weights_only" not in str(err.value) and str(folder / "pytorch_model.bin") in str(err.value)


@pytest.mark.parametrize("content", [{"model.norm.weight": 3}, [torch.ones(2)]])
def test_a_bin_holding_anything_but_named_tensors_is_refused(ref_dir, tmp_path, content):
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    (folder / "model.safetensors").unlink()
    torch.save(content, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin holds"):
        StableLmForCausalLM.from_pretrained(folder)


# ---- bad checkpoints: one clear error each, raised before any weight is read -----------------------------
@pytest.fixture
def no_weights_read(monkeypatch):
    """Fail the test if the loader gets as far as reading weights."""

    def forbidden(*args, **kwargs):
        raise AssertionError("weights were read before the checkpoint was checked")

    monkeypatch.setattr(load_module, "materialise", forbidden)


def test_missing_keys_are_initialised_and_named_as_the_reference(ref_dir, tmp_path):
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    ours, theirs, info, their_info, said = _load_both(folder)
    assert info == their_info and info["missing_keys"] == {"model.layers.1.mlp.up_proj.weight"}
    assert (
        len(said) == 1 and "newly initialised" in said[0] and "model.layers.1.mlp.up_proj.weight" in said[0]
    )
    _assert_loaded_as_stored(ours, folder, skip=set())
    assert torch.isfinite(ours.model.layers[1].mlp.up_proj.weight).all()


def test_a_layer_lacking_its_bias_keeps_its_loaded_weight(tmp_path):
    model = StableLmForCausalLM(small_config(use_qkv_bias=True))
    model.save_pretrained(tmp_path)
    rewrite_weights(tmp_path, lambda t: t.pop("model.layers.0.self_attn.q_proj.bias"))
    ours, _, info, their_info, _ = _load_both(tmp_path)
    assert info == their_info and info["missing_keys"] == {"model.layers.0.self_attn.q_proj.bias"}
    _assert_loaded_as_stored(ours, tmp_path, skip=set())  # q_proj.weight as stored, not initialised again
    assert torch.equal(ours.model.layers[0].self_attn.q_proj.bias, torch.zeros(ours.config.hidden_size))


def test_unexpected_keys_are_left_unused_and_named_as_the_reference(ref_dir, tmp_path):
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    extra = {f"model.layers.{i}.self_attn.extra.weight": torch.ones(2) for i in range(7)}
    rewrite_weights(folder, lambda t: t.update(extra))
    ours, _, info, their_info, said = _load_both(folder)
    assert info == their_info and info["unexpected_keys"] == set(extra)
    assert len(said) == 1 and "not used" in said[0] and "and 2 more" in said[0]
    assert str(folder / "model.safetensors") in said[0] or "extra.weight" in said[0]
    _assert_loaded_as_stored(ours, folder, skip=set())


def test_shape_mismatch_names_the_key_and_both_shapes(ref_dir, tmp_path, no_weights_read):
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    rewrite_weights(folder, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight: the model expects shape \[64\], the checkpoint holds \[65\]"):  # fmt: skip
        StableLmForCausalLM.from_pretrained(folder)


def test_a_config_with_fewer_layers_than_the_weights_loads_the_first_ones_as_the_reference(ref_dir):
    ours, theirs, info, their_info, said = _load_both(ref_dir, num_hidden_layers=1)
    assert info == their_info and info["missing_keys"] == set()
    assert info["unexpected_keys"] and all(
        key.startswith("model.layers.1.") for key in info["unexpected_keys"]
    )
    assert len(said) == 1 and "not used" in said[0]
    with torch.no_grad():
        assert max_diff(ours(ids()).logits, theirs(ids()).logits) <= FP32_TOL


def test_a_config_that_does_not_fit_the_weights(ref_dir, tmp_path, no_weights_read):
    with pytest.raises(CheckpointError, match="config.json beside the weights"):
        StableLmForCausalLM.from_pretrained(ref_dir, intermediate_size=200)


@pytest.mark.parametrize("keep", [0, 8, 100, -10])
def test_truncated_safetensors_are_named(ref_dir, tmp_path, keep, no_weights_read):
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        StableLmForCausalLM.from_pretrained(folder)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "header",
    [b"not json at all!", b'{"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 8]}}',
     b'{"model.norm.weight": {"dtype": "F32", "shape": [64]}}', b"[1, 2]"],
)  # fmt: skip
def test_corrupt_safetensors_headers_are_named(ref_dir, tmp_path, header, no_weights_read):
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(256))
    with pytest.raises(CheckpointError, match="not a valid safetensors weights file") as err:
        StableLmForCausalLM.from_pretrained(folder)
    assert str(path) in str(err.value)


def test_an_unknown_dtype_is_named(ref_dir, tmp_path, no_weights_read):
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    header = b'{"model.norm.weight": {"dtype": "Q4_K", "shape": [64], "data_offsets": [0, 256]}}'
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(256))
    with pytest.raises(
        CheckpointError, match="stores 'model.norm.weight' as Q4_K, a dtype this loader does not"
    ):
        StableLmForCausalLM.from_pretrained(folder)


def sharded(pair, tmp_path: Path) -> Path:
    pair[0].save_pretrained(tmp_path / "s", max_shard_size="30KB")
    return tmp_path / "s"


def test_an_index_naming_a_missing_shard(pair, tmp_path, no_weights_read):
    folder = sharded(pair, tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*does not exist") as err:
        StableLmForCausalLM.from_pretrained(folder)
    assert str(folder / "model.safetensors.index.json") in str(err.value)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "a/../../b.safetensors",
                                  "..\\outside.safetensors", "C:/outside.safetensors"])  # fmt: skip
def test_an_index_pointing_outside_the_folder_is_refused(pair, tmp_path, name, no_weights_read):
    folder = sharded(pair, tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    (tmp_path / "outside.safetensors").write_bytes((folder / index["weight_map"][first]).read_bytes())
    index["weight_map"][first] = name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the model folder") as err:
        StableLmForCausalLM.from_pretrained(folder)
    assert str(index_path) in str(err.value)


def test_an_index_that_does_not_match_its_shards(pair, tmp_path, no_weights_read):
    folder = sharded(pair, tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = index["weight_map"]["model.embed_tokens.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not hold it"):
        StableLmForCausalLM.from_pretrained(folder)


def test_a_git_lfs_pointer_says_to_pull(ref_dir, tmp_path, no_weights_read):
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456\n"
    (folder / "model.safetensors").write_text(pointer)
    with pytest.raises(CheckpointError, match="git lfs pull") as err:
        StableLmForCausalLM.from_pretrained(folder)
    assert str(folder / "model.safetensors") in str(err.value)


@pytest.mark.parametrize(
    "text, match", [("{not json", "is not valid JSON"), ('{"model_type": "llama"}', "'llama'")]
)
def test_a_bad_config_json_is_named(ref_dir, tmp_path, text, match):
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    (folder / "config.json").write_text(text)
    for load in (StableLmForCausalLM.from_pretrained, StableLmConfig.from_pretrained):
        with pytest.raises(ValueError, match=match) as err:
            load(folder)
        assert str(folder / "config.json") in str(err.value)


def test_an_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is empty"):
        StableLmForCausalLM.from_pretrained(tmp_path)


def test_a_folder_without_weights_lists_what_it_holds(ref_dir, tmp_path):
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match="No weights in .*weights.safetensors"):
        StableLmForCausalLM.from_pretrained(folder)


# ---- the hub ---------------------------------------------------------------------------------------------
def fake_hub_cache(cache: Path, repo_id: str, src: Path) -> Path:
    """A huggingface_hub cache holding `src` as the main snapshot of `repo_id`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return copy_checkpoint(src, repo / "snapshots" / ("0" * 40))


def test_a_cached_hub_model_loads_offline(pair, ref_dir, tmp_path):
    fake_hub_cache(tmp_path, "stabilityai/tiny", ref_dir)
    code = (
        "import sys, torch; sys.path.insert(0, 'tests'); from stablelm import StableLmForCausalLM\n"
        f"m = StableLmForCausalLM.from_pretrained('stabilityai/tiny', cache_dir={str(tmp_path)!r})\n"
        "torch.save(m.state_dict(), sys.argv[1])\n"
    )
    out = tmp_path / "state.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, cwd=Path(__file__).parents[1])
    loaded = torch.load(out, weights_only=True)
    for name, tensor in pair[1].state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_a_model_that_is_nowhere_says_how_to_pass_a_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="'stabilityai/not-here'.*local folder"):
        StableLmForCausalLM.from_pretrained("stabilityai/not-here", cache_dir=tmp_path, local_files_only=True)


def test_the_hub_fetches_safetensors_and_bin_only_without_them(ref_dir, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    snapshot = copy_checkpoint(ref_dir, tmp_path / "snap")

    def fake_snapshot_download(repo_id, *, allow_patterns, **kwargs):
        calls.append(allow_patterns)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    StableLmForCausalLM.from_pretrained("org/model")
    assert len(calls) == 1 and "model.safetensors" in calls[0] and not any(".bin" in p for p in calls[0])
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="No weights"):
        StableLmForCausalLM.from_pretrained("org/model")
    assert len(calls) == 3 and "pytorch_model.bin" in calls[2]


def test_hub_options_go_to_huggingface_hub(ref_dir, tmp_path, monkeypatch):
    """subfolder prefixes what is fetched, variant and use_safetensors name the files, force_download is passed."""
    import huggingface_hub

    calls = []
    snapshot = tmp_path / "snap"
    copy_checkpoint(ref_dir, snapshot / "text")

    def fake_snapshot_download(repo_id, *, allow_patterns, **kwargs):
        calls.append((allow_patterns, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    StableLmForCausalLM.from_pretrained("org/model", subfolder="text", force_download=True)
    ((patterns, kwargs),) = calls
    assert kwargs["force_download"] is True and all(p.startswith("text/") for p in patterns)
    assert {"text/config.json", "text/model.safetensors", "text/model-*-of-*.safetensors"} <= set(patterns)
    calls.clear()
    with pytest.raises(FileNotFoundError, match="expected model.fp16.safetensors"):
        StableLmForCausalLM.from_pretrained("org/model", subfolder="text", variant="fp16")
    variant_patterns = set(calls[0][0]) | set(calls[1][0])
    assert {"text/model.fp16.safetensors", "text/model.safetensors.index.fp16.json",
            "text/model.fp16-*-of-*.safetensors", "text/pytorch_model.fp16.bin"} <= variant_patterns  # fmt: skip
    assert calls[0][1]["force_download"] is False
    calls.clear()
    with pytest.raises(FileNotFoundError):
        StableLmForCausalLM.from_pretrained("org/model", subfolder="text", use_safetensors=False)
    assert len(calls) == 1 and not any(p.endswith(".safetensors") for p in calls[0][0])
    calls.clear()
    (snapshot / "text" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="expected model.safetensors or model.safetensors.index.json"):
        StableLmForCausalLM.from_pretrained("org/model", subfolder="text", use_safetensors=True)
    assert len(calls) == 1 and not any(".bin" in p for p in calls[0][0])


def test_a_subfolder_of_a_cached_hub_snapshot_follows_the_caches_links(pair, ref_dir, tmp_path):
    """The hub cache links snapshots/REV/text/FILE to ../../../blobs/HASH: inside the repo's cache folder."""
    repo = tmp_path / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "blobs").mkdir()
    text = repo / "snapshots" / ("0" * 40) / "text"
    text.mkdir(parents=True)
    for path in ref_dir.iterdir():
        (repo / "blobs" / path.name).write_bytes(path.read_bytes())
        (text / path.name).symlink_to(Path("../../../blobs") / path.name)
    model = StableLmForCausalLM.from_pretrained(
        "org/tiny", subfolder="text", cache_dir=tmp_path, local_files_only=True
    )
    _same_weights(model, pair[1])


# ---- saving ----------------------------------------------------------------------------------------------
def test_an_interrupted_save_leaves_the_previous_file_whole(pair, ref_dir, tmp_path, monkeypatch):
    from stablelm.checkpoint import save as save_module

    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    before = (folder / "model.safetensors").read_bytes()

    def interrupted(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(save_module, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pair[0].save_pretrained(folder)
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


@pytest.mark.parametrize("options", [{}, {"max_shard_size": "30KB"}, {"safe_serialization": False}])
def test_save_pretrained_writes_a_given_state_dict_that_both_libraries_load(pair, tmp_path, options):
    """The reference's save_pretrained(state_dict=...): those tensors, under their keys, not the model's."""
    ours, _ = pair
    given = {key: tensor * 0.5 + 1 for key, tensor in ours.state_dict().items()}
    ours.save_pretrained(tmp_path, state_dict=given, **options)
    for model in (
        StableLmForCausalLM.from_pretrained(tmp_path),
        transformers.StableLmForCausalLM.from_pretrained(tmp_path),
    ):
        state = model.state_dict()
        assert set(state) == set(given)
        for key, tensor in given.items():
            assert torch.equal(state[key], tensor), key
    # the model's own tensors are not what was saved
    assert not torch.equal(ours.model.norm.weight, given["model.norm.weight"])


def test_save_pretrained_takes_the_distributed_and_hub_options_at_their_defaults(pair, tmp_path):
    """is_main_process=False writes nothing (other ranks, as the reference); push_to_hub, save_function and
    variant at their defaults are accepted, anything else refused by name before the folder changes."""
    ours, _ = pair
    ours.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    ours.save_pretrained(
        tmp_path / "main", is_main_process=True, push_to_hub=False, save_function=None, variant=None
    )
    assert (tmp_path / "main" / "model.safetensors").is_file()
    for option in ({"push_to_hub": True}, {"save_function": torch.save}, {"variant": "fp16"}):
        with pytest.raises(ValueError, match=f"save_pretrained\\({next(iter(option))}="):
            ours.save_pretrained(tmp_path / "refused", **option)
        assert not (tmp_path / "refused").exists()


def test_a_given_state_dict_of_a_tied_model_leaves_the_head_out_as_the_reference(tmp_path):
    ours, ref = make_pair(small_config(tie_word_embeddings=True))
    # views, as a state_dict() gives them: the head's shares the embedding's memory
    given = {key: tensor.detach() for key, tensor in ours.state_dict().items()}
    given["model.norm.weight"] = given["model.norm.weight"] + 1
    ours.save_pretrained(tmp_path / "ours", state_dict=given)
    ref_given = {key: tensor.detach() for key, tensor in ref.state_dict().items()}
    ref_given["model.norm.weight"] = ref_given["model.norm.weight"] + 1
    ref.save_pretrained(tmp_path / "ref", state_dict=ref_given)
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == set(
        load_file(tmp_path / "ref" / "model.safetensors")
    )
    assert "lm_head.weight" not in load_file(tmp_path / "ours" / "model.safetensors")
    for model in (
        StableLmForCausalLM.from_pretrained(tmp_path / "ours"),
        transformers.StableLmForCausalLM.from_pretrained(tmp_path / "ours"),
    ):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert torch.equal(model.model.norm.weight, given["model.norm.weight"])


@pytest.mark.parametrize(
    "given,error,message",
    [
        ([("model.norm.weight", torch.ones(64))], TypeError, "state_dict must be a dict of tensor names"),
        ({"model.norm.weight": [1.0]}, TypeError, "maps 'model.norm.weight' to list"),
        ({"model.norm.weight": torch.empty(64, device="meta")}, ValueError, "is on the meta device"),
    ],
)
def test_a_bad_state_dict_is_refused_before_the_folder_changes(
    pair, ref_dir, tmp_path, given, error, message
):
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    with pytest.raises(error, match=message):
        pair[0].save_pretrained(folder, state_dict=given)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_resaving_with_fewer_shards_removes_the_stale_ones(pair, tmp_path):
    ours, ref = pair
    ours.save_pretrained(tmp_path, max_shard_size="30KB")
    (tmp_path / "pytorch_model.bin").write_bytes(b"a file of the user's, another format: left alone")
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "pytorch_model.bin",
    ]


def test_generation_config_is_read_and_written_back(pair, ref_dir, tmp_path):
    model = StableLmForCausalLM.from_pretrained(ref_dir)
    assert model.generation_config.to_dict() == json.loads((ref_dir / "generation_config.json").read_text())
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "generation_config.json").read_text())["max_new_tokens"] == 7
    (tmp_path / "a" / "generation_config.json").unlink()
    again = StableLmForCausalLM.from_pretrained(tmp_path / "a")
    # without the file, the config's special tokens (as the reference's from_model_config)
    assert again.generation_config.eos_token_id == again.config.eos_token_id
    again.save_pretrained(tmp_path / "b")  # the file is written all the same, as the reference writes it
    written = json.loads((tmp_path / "b" / "generation_config.json").read_text())
    assert written == {"bos_token_id": 0, "eos_token_id": 0}  # the config's special tokens
    again.generation_config = {"max_new_tokens": 3}  # a dict, as the file holds it
    again.save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "generation_config.json").read_text()) == {"max_new_tokens": 3}


def test_max_shard_size_spellings():
    assert (
        parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500kb") == 500_000
    )
    assert parse_size(1234) == 1234 and parse_size("1.5MB") == 1_500_000
    for bad in ("5 gigs", 0, -1, "", True):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


# ---- progress ----------------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_on_a_terminal_only(ref_dir, monkeypatch, capsys):
    StableLmForCausalLM.from_pretrained(ref_dir)
    assert capsys.readouterr().err == ""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(fill_module, "_PROGRESS_DELAY_S", 0.0)
    StableLmForCausalLM.from_pretrained(ref_dir)
    assert "Loading 1 shard" in terminal.getvalue()


# ---- a base model's checkpoint into a model with a head, and the other way round -------------------------
def test_a_backbone_checkpoint_loads_into_the_causal_lm_with_a_new_head_as_the_reference(pair, tmp_path):
    ours, _ = pair
    ours.model.save_pretrained(tmp_path)  # the bare StableLmModel: no lm_head.weight, no "model." prefix
    model, theirs, info, their_info, said = _load_both(tmp_path)
    assert info == their_info and info["missing_keys"] == {"lm_head.weight"}
    assert len(said) == 1 and "lm_head.weight" in said[0]
    for key, tensor in ours.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[key], tensor), key


def test_a_causal_lm_checkpoint_loads_into_the_backbone_as_the_reference(pair, ref_dir):
    model, theirs, info, their_info, said = _load_both(ref_dir, StableLmModel)
    assert info == their_info and info["unexpected_keys"] == {"lm_head.weight"} and not info["missing_keys"]
    assert len(said) == 1 and "not used" in said[0]
    with torch.no_grad():
        assert max_diff(model(ids()).last_hidden_state, theirs(ids()).last_hidden_state) <= FP32_TOL


@pytest.mark.parametrize("tied", [False, True])
def test_a_checkpoint_holding_none_of_the_weights_initialises_them_all_as_the_reference(tmp_path, tied):
    StableLmForCausalLM(small_config(tie_word_embeddings=tied)).save_pretrained(tmp_path)
    save_file({"tensor": torch.tensor([1, 2])}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, theirs, info, their_info, said = _load_both(tmp_path)
    assert info["unexpected_keys"] == their_info["unexpected_keys"] == {"tensor"}
    params = set(dict(model.named_parameters()))
    assert info["missing_keys"] == params == {k for k in their_info["missing_keys"] if k in params}
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    assert len(said) == 1 and "and " in said[0]  # the first names, and how many more
    for name, p in model.named_parameters():  # initialised as the reference initialises its modules
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("weight"):
            assert 0 < p.std().item() < 3 * model.config.initializer_range, name


def test_missing_weights_of_stored_quantized_layers_are_refused(ref_dir, tmp_path):
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    StableLmForCausalLM.from_pretrained(folder, quantization_config="int8").save_pretrained(folder)
    rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="describes as quantized") as err:
        StableLmForCausalLM.from_pretrained(folder)
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value) and str(folder) in str(err.value)


def test_layers_the_checkpoint_lacks_stay_dense_when_quantizing_on_load(ref_dir, tmp_path):
    folder = copy_checkpoint(ref_dir, tmp_path / "c")
    rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    asked = stablelm.QuantizationConfig.coerce("int8")
    with pytest.warns(UserWarning, match="newly initialised"):
        model = StableLmForCausalLM.from_pretrained(folder, quantization_config=asked)
    assert not hasattr(model.model.layers[1].mlp.up_proj, "quant_type")  # initialised, dense
    assert hasattr(model.model.layers[1].mlp.down_proj, "quant_type")  # read and quantized
    assert asked.modules_to_not_convert == stablelm.QuantizationConfig.coerce("int8").modules_to_not_convert
    classifier = StableLmForSequenceClassification.from_pretrained(
        ref_dir, quantization_config="int8", num_labels=3
    )  # a causal LM's backbone, quantized, under a new dense head
    with torch.no_grad():
        assert classifier(ids(), attention_mask=torch.ones(2, 9)).logits.shape == (2, 3)
