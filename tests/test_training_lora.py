"""LoRA through peft: `stablelm train --lora-r`, its adapter against the reference, merging, exact resume,
and `--adapter` on the commands that load a model."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import transformers
from training_fixtures import TEXTS as ALL_TEXTS
from training_fixtures import (
    Interrupt,
    save_checkpoint,
    stop_at_save,
    tiny_causal_lm,
    tiny_tokenizer,
    write_text_jsonl,
)

from stablelm import StableLmForCausalLM
from stablelm.checkpoint import CheckpointError
from stablelm.cli import main
from stablelm.training import Trainer, TrainingArguments, pack, tokenize
from stablelm.training.checkpoints import list_checkpoints
from stablelm.training.lora import LoraSettings, adapter_state, add_lora, apply_adapter, require_peft
from stablelm.training.memory import estimate_training_memory

peft = pytest.importorskip("peft")

TEXTS = ALL_TEXTS[:8]
pytestmark = pytest.mark.usefixtures("one_thread")
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(texts=8)


@pytest.fixture(scope="module")
def base(tokenizer, tmp_path_factory):
    """A tiny float32 checkpoint with its tokenizer, and JSON-lines text to train on."""
    folder = tmp_path_factory.mktemp("base")
    save_checkpoint(folder, _tiny(tokenizer), tokenizer)
    write_text_jsonl(folder / "data.jsonl", TEXTS)
    return folder


def _train_args(base, out, *extra):
    return [
        "train", "--model", str(base), "--data", str(base / "data.jsonl"), "--output-dir", str(out),
        "--block-size", "32", "--batch-size", "2", "--max-steps", "3", "--lr", "1e-2", "--warmup-steps", "0",
        "--eval-fraction", "0", "--save-interval", "2", "--log-interval", "1", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    assert main(_train_args(base, out, "--lora-r", "4", "--lora-target", ALL_LINEAR, "--merge")) == 0
    return out


def _tiny(tokenizer, **overrides) -> StableLmForCausalLM:
    return tiny_causal_lm(len(tokenizer), **overrides)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 2, 180]])


def test_the_adapter_loads_with_peft_onto_the_reference_with_our_logits(base, lora_run):
    names = {p.name for p in lora_run.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names  # the adapter only, not a second copy of the model
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert (
        config["r"] == 4
        and config["lora_alpha"] == 8
        and set(config["target_modules"]) == set(ALL_LINEAR.split(","))
    )
    # the base model is recorded, as peft does for the reference's models (its Auto classes read it)
    assert config["base_model_name_or_path"] == str(base)
    reference = transformers.StableLmForCausalLM.from_pretrained(base).eval()
    before = _logits(reference, IDS)
    reference = peft.PeftModel.from_pretrained(reference, lora_run).eval()
    ours = apply_adapter(StableLmForCausalLM.from_pretrained(base), lora_run, merge=False).eval()
    expected = _logits(reference, IDS)
    assert (expected - before).abs().max() > 1e-2  # the adapter trained: it changes the logits
    torch.testing.assert_close(_logits(ours, IDS), expected, atol=1e-5, rtol=0)


def test_the_merged_checkpoint_equals_the_adapter_applied(base, lora_run):
    merged = lora_run / "merged"
    adapted = _logits(
        apply_adapter(StableLmForCausalLM.from_pretrained(base), lora_run, merge=False).eval(), IDS
    )
    ours = StableLmForCausalLM.from_pretrained(merged).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    torch.testing.assert_close(_logits(ours, IDS), adapted, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(reference, IDS), adapted, atol=1e-5, rtol=0)
    merged_on_load = apply_adapter(StableLmForCausalLM.from_pretrained(base), lora_run).eval()
    assert isinstance(merged_on_load, StableLmForCausalLM)
    torch.testing.assert_close(_logits(merged_on_load, IDS), adapted, atol=1e-5, rtol=0)


def test_generate_with_adapter_equals_the_merged_model(base, lora_run, capsys):
    common = ["-n", "8", "--temperature", "0", "The for statement"]
    assert main(["generate", "-m", str(base), "--adapter", str(lora_run), *common]) == 0
    adapted = capsys.readouterr().out
    assert main(["generate", "-m", str(lora_run / "merged"), *common]) == 0
    assert capsys.readouterr().out == adapted


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "bench"])
def test_a_bad_adapter_is_a_clear_error(command, base, lora_run, tokenizer, tmp_path, capsys):
    other = tmp_path / "other"  # an adapter of a wider model
    add_lora(_tiny(tokenizer, hidden_size=64), LoraSettings(r=4)).save_pretrained(other)
    deeper = tmp_path / "deeper"  # layers the model does not have: peft itself only warns
    add_lora(_tiny(tokenizer, num_hidden_layers=3), LoraSettings(r=4)).save_pretrained(deeper)
    extra = {"generate": ["The for statement"], "bench": ["--prompt", "4", "--new-tokens", "2"]}.get(
        command, []
    )
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(base): "has no adapter_config.json",
        str(other): "does not fit this model",
        str(deeper): "fits no layer of it",
    }
    for path, message in cases.items():
        assert main([command, "-m", str(base), "--adapter", path, *extra]) == 1, path
        err = capsys.readouterr().err
        assert f"--adapter {path!r}" in err and message in err and "Traceback" not in err, err
    if command != "bench":  # bench quantizes after loading, so after merging
        status = main([command, "-m", str(base), "--adapter", str(lora_run), "--quantize", "int8", *extra])
        assert status == 2 and "--adapter and --quantize" in capsys.readouterr().err


def test_info_and_bench_take_an_adapter(base, lora_run, tokenizer, tmp_path, capsys):
    assert main(["info", "-m", str(base), "--adapter", str(lora_run), "--json"]) == 0
    adapter = json.loads(capsys.readouterr().out)["adapter"]
    trained = adapter_state(apply_adapter(StableLmForCausalLM.from_pretrained(base), lora_run, merge=False))
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["layers"] == 2 * 7
    assert adapter["parameters"] == sum(t.numel() for t in trained.values())
    assert main(["info", "-m", str(base), "--adapter", str(lora_run)]) == 0
    assert "LoRA r 4, alpha 8 on down_proj,gate_proj" in capsys.readouterr().out
    other = tmp_path / "other"
    add_lora(_tiny(tokenizer, hidden_size=64), LoraSettings(r=4)).save_pretrained(other)
    assert main(["info", "-m", str(base), "--adapter", str(other)]) == 1
    assert "does not fit this model" in capsys.readouterr().err
    assert (
        main(["bench", "-m", str(base), "--adapter", str(lora_run), "--prompt", "4", "--new-tokens", "2"])
        == 0
    )
    assert main(["bench", "--adapter", str(lora_run)]) == 2
    assert "--adapter applies to a checkpoint" in capsys.readouterr().err


# ---- the trainer with an adapter ------------------------------------------------------------------------
def _args(out, **overrides) -> TrainingArguments:
    fields = dict(
        output_dir=out,
        max_steps=4,
        batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        warmup_steps=1,
        eval_interval=2,
        save_interval=2,
        save_total_limit=0,
        precision="fp32",
    )
    return TrainingArguments(**{**fields, **overrides})


def _lora_model(tokenizer, seed=0, r=4):
    torch.manual_seed(seed)  # the adapters' A matrices start random
    model = _tiny(tokenizer)
    return add_lora(model, LoraSettings(r=r, dropout=0.1, targets=("q_proj", "v_proj", "down_proj")))


def test_lora_resume_equals_an_uninterrupted_run(tokenizer, tmp_path):
    blocks = pack(tokenize(tokenizer, TEXTS), 32)
    kwargs = dict(train_blocks=blocks[:-2], eval_blocks=blocks[-2:], tokenizer=tokenizer)
    whole = Trainer(_lora_model(tokenizer), args=_args(tmp_path / "whole"), **kwargs)
    state = whole.train()
    trainable = [n for n, p in whole.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    out = tmp_path / "parts"
    first = Trainer(_lora_model(tokenizer), args=_args(out), callback=stop_at_save(2), **kwargs)
    with pytest.raises(Interrupt):
        first.train()
    checkpoint = list_checkpoints(out)[-1]
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "rng_state.pt", "trainer_state.json"} <= names
    assert "model.safetensors" not in names

    torch.manual_seed(123)  # another process: other adapter weights and random state
    resumed = Trainer(_lora_model(tokenizer, seed=7), args=_args(out), **kwargs)
    final = resumed.train(resume_from=resumed.latest_checkpoint())
    assert final.log_history == state.log_history
    ours, theirs = adapter_state(resumed.model), adapter_state(whole.model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)

    full = Trainer(_tiny(tokenizer), args=_args(tmp_path / "full"), **kwargs)
    with pytest.raises(CheckpointError, match="holds a LoRA adapter"):
        full.resume(checkpoint)
    other_rank = Trainer(_lora_model(tokenizer, r=2), args=_args(tmp_path / "r2"), **kwargs)
    with pytest.raises(ValueError, match="other data or settings"):
        other_rank.resume(checkpoint)


def test_lora_with_gradient_checkpointing_gives_the_same_losses(tokenizer, tmp_path):
    blocks = pack(tokenize(tokenizer, TEXTS), 32)
    losses = []
    for checkpointing in (False, True):
        trainer = Trainer(
            _lora_model(tokenizer),
            args=_args(tmp_path / str(checkpointing), max_steps=3, gradient_checkpointing=checkpointing),
            train_blocks=blocks,
        )
        losses.append([entry["loss"] for entry in trainer.train().log_history if "loss" in entry])
    assert losses[0] == losses[1] and losses[0][-1] < losses[0][0]


def test_the_memory_estimate_counts_only_the_trainable_parameters(tokenizer):
    config = _tiny(tokenizer).config
    full = estimate_training_memory(config, batch_size=2, block_size=32)
    lora = estimate_training_memory(config, batch_size=2, block_size=32, trainable_parameters=1000)
    assert (lora.gradients, lora.optimizer) == (4000, 8000)
    assert (full.gradients, full.optimizer) == (4 * full.parameters, 8 * full.parameters)
    assert (lora.weights, lora.activations) == (full.weights, full.activations)


def test_lora_flags_are_checked(base, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    assert main(_train_args(base, out, "--merge")) == 2
    assert "--merge is for a LoRA run: add --lora-r" in capsys.readouterr().err
    assert main(_train_args(base, out, "--lora-r", "2", "--lora-target", "q_proj,qkv")) == 1
    assert "--lora-target qkv: the model has no such layer" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"stablelm\[lora\]"):
        require_peft()
    assert main(_train_args(base, out, "--lora-r", "2")) == 1
    assert "pip install 'stablelm[lora]'" in capsys.readouterr().err
