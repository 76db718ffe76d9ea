"""Training: data packing and order, the optimiser, the loop, exact resume, checkpoints, tokenizer training, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import transformers
from training_fixtures import TEXTS as ALL_TEXTS
from training_fixtures import Interrupt, stop_at_save, tiny_tokenizer, write_text_jsonl

from stablelm import AutoTokenizer, StableLmConfig, StableLmForCausalLM
from stablelm.cli import main
from stablelm.training import (
    BlockOrder,
    Trainer,
    TrainingArguments,
    learning_rate_at,
    pack,
    parameter_groups,
    read_documents,
    split_blocks,
    tokenize,
    train_tokenizer,
)
from stablelm.training import checkpoints as checkpoints_module
from stablelm.training.checkpoints import list_checkpoints
from stablelm.training.sources import read_model_config

TEXTS = ALL_TEXTS[:12]
pytestmark = pytest.mark.usefixtures("one_thread")
BLOCK = 32


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(vocab_size=400)


@pytest.fixture(scope="module")
def blocks(tokenizer):
    return pack(tokenize(tokenizer, TEXTS), BLOCK)


def _config(tokenizer, **overrides) -> StableLmConfig:
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return StableLmConfig(**{**fields, **overrides})


def _model(tokenizer, seed=0, **overrides) -> StableLmForCausalLM:
    torch.manual_seed(seed)
    return StableLmForCausalLM(_config(tokenizer, **overrides))


def _args(tmp_path, **overrides) -> TrainingArguments:
    fields = dict(
        output_dir=tmp_path,
        max_steps=6,
        batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        warmup_steps=2,
        eval_interval=3,
        save_interval=2,
        save_total_limit=0,
        precision="fp32",
    )
    return TrainingArguments(**{**fields, **overrides})


# ---- data ------------------------------------------------------------------------------------------------
def test_read_documents_from_text_jsonl_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        '{"text": "second"}\n\n{"text": "third", "id": 3}\n{"text": ""}\n'
    )
    (tmp_path / "sub" / "ignored.bin").write_bytes(b"\x00")
    assert read_documents([tmp_path]) == ["first document\n", "second", "third"]
    assert read_documents([tmp_path / "sub" / "b.jsonl", tmp_path / "a.txt"]) == [
        "second",
        "third",
        "first document\n",
    ]


def test_bad_data_gets_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt' does not exist"):
        read_documents([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="holds no text"):
        read_documents([tmp_path / "empty.txt", tmp_path / "empty.jsonl"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        read_documents([tmp_path / "bad.jsonl"])
    (tmp_path / "nofield.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match='nofield.jsonl:1 has no string "text" field'):
        read_documents([tmp_path / "nofield.jsonl"])
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no data files"):
        read_documents([tmp_path / "folder"])
    with pytest.raises(ValueError, match="fewer than one block"):
        pack(torch.arange(10), 16)


def test_tokenize_separates_documents_with_eos(tokenizer):
    stream = tokenize(tokenizer, ["a b", "c"])
    eos = tokenizer.eos_token_id
    assert stream.dtype == torch.int64
    assert stream.tolist() == [*tokenizer.encode("a b"), eos, *tokenizer.encode("c"), eos]
    assert pack(torch.arange(10), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_split_blocks_holds_out_evenly_spaced_blocks():
    blocks = torch.arange(40).view(20, 2)
    train, held = split_blocks(blocks, 0.25)
    assert held[:, 0].tolist() == [6, 14, 22, 30, 38]  # blocks 3, 7, 11, 15, 19
    assert len(train) == 15
    assert split_blocks(blocks, 0.0)[1].shape[0] == 0
    with pytest.raises(ValueError, match="too few to hold out"):
        split_blocks(blocks[:1], 0.05)


def test_block_order_is_a_fresh_permutation_each_epoch_from_the_seed():
    order = BlockOrder(7, seed=3)
    run = order.indices(0, 21).tolist()
    epochs = [run[i : i + 7] for i in range(0, 21, 7)]
    assert all(sorted(epoch) == list(range(7)) for epoch in epochs)
    assert epochs[0] != epochs[1]
    assert BlockOrder(7, seed=3).indices(9, 5).tolist() == run[9:14]  # any position, any time
    assert BlockOrder(7, seed=4).indices(0, 7).tolist() != epochs[0]


# ---- optimiser ---------------------------------------------------------------------------------------------
def test_schedule_warms_up_then_decays_to_the_minimum():
    lr = dict(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    assert [learning_rate_at(s, **lr) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate_at(4, **lr) == 1.0
    assert learning_rate_at(9, **lr) == pytest.approx(0.55)
    assert learning_rate_at(14, **lr) == pytest.approx(0.1)
    assert learning_rate_at(100, **lr) == pytest.approx(0.1)


@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_applies_to_matrices_only(tokenizer, tie):
    model = _model(tokenizer, tie_word_embeddings=tie, use_qkv_bias=True)
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]} == {"weight", "bias"}
    assert all("norm" in names[id(p)] or names[id(p)].endswith("bias") for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert ("lm_head.weight" in [names[id(p)] for p in decay["params"]]) == (not tie)


# ---- the loop --------------------------------------------------------------------------------------------
def _batch_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return model(batch, labels=batch).loss.item()


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tokenizer, blocks, tmp_path):
    model = _model(tokenizer)
    batch = blocks[:4]
    before = _batch_loss(model, batch)
    args = _args(tmp_path, max_steps=12, gradient_accumulation_steps=1, save_interval=100)
    state = Trainer(model, args=args, train_blocks=batch).train()
    after = _batch_loss(model, batch)
    assert state.step == 12 and state.tokens_seen == 12 * 4 * BLOCK
    assert after < before - 1.0, (before, after)


@pytest.fixture(scope="module")
def uninterrupted(tokenizer, blocks, tmp_path_factory):
    """A 6-step run with dropout, accumulation and evaluation, never stopped."""
    out = tmp_path_factory.mktemp("uninterrupted")
    model = _model(tokenizer, hidden_dropout=0.1)
    trainer = Trainer(
        model, args=_args(out), train_blocks=blocks[:-4], eval_blocks=blocks[-4:], tokenizer=tokenizer
    )
    state = trainer.train()
    return out, model, trainer, state


def test_resume_equals_an_uninterrupted_run(tokenizer, blocks, tmp_path, uninterrupted):
    _, model, trainer, state = uninterrupted
    kwargs = dict(train_blocks=blocks[:-4], eval_blocks=blocks[-4:], tokenizer=tokenizer)
    first = Trainer(
        _model(tokenizer, hidden_dropout=0.1), args=_args(tmp_path), callback=stop_at_save(4), **kwargs
    )
    with pytest.raises(Interrupt):
        first.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]

    # A new process: other initial weights and random state; everything comes from the checkpoint.
    torch.manual_seed(123)
    resumed = Trainer(_model(tokenizer, seed=99, hidden_dropout=0.1), args=_args(tmp_path), **kwargs)
    final = resumed.train(resume_from=resumed.latest_checkpoint())

    assert final.log_history == state.log_history  # same losses, learning rates and held-out losses
    assert final.step == state.step and final.tokens_seen == state.tokens_seen
    for name, tensor in model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    ours, theirs = resumed.optimizer.state_dict()["state"], trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(ours[i]["exp_avg_sq"], theirs[i]["exp_avg_sq"]) for i in theirs)


def test_resume_with_other_settings_is_refused(tokenizer, blocks, tmp_path, uninterrupted):
    out = uninterrupted[0]
    trainer = Trainer(_model(tokenizer), args=_args(tmp_path, batch_size=2), train_blocks=blocks[:-4])
    with pytest.raises(ValueError, match="global_batch_size: now 4, then 8"):
        trainer.train(resume_from=out / "checkpoint-6")
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
        trainer.resume(tmp_path)


def test_trained_checkpoint_loads_here_and_in_the_reference(uninterrupted):
    out, model, _, _ = uninterrupted
    folder = out / "checkpoint-6"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    ours = StableLmForCausalLM.from_pretrained(folder)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ref_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = 'The "for" statement is used to iterate over the elements of a sequence'
    ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == ref_tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        logits = ours(ids).logits
        torch.testing.assert_close(reference(ids).logits, logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits, model.eval()(ids).logits)


def test_an_interrupted_checkpoint_write_keeps_the_last_good_one(tokenizer, blocks, tmp_path, monkeypatch):
    calls = []
    real = checkpoints_module._save_tensors

    def failing_on_the_second_checkpoint(data, path):
        calls.append(path)
        if len(calls) == 3:  # the second checkpoint's optimizer.pt
            raise OSError("disk full")
        real(data, path)

    monkeypatch.setattr(checkpoints_module, "_save_tensors", failing_on_the_second_checkpoint)
    trainer = Trainer(_model(tokenizer), args=_args(tmp_path), train_blocks=blocks, tokenizer=tokenizer)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert (tmp_path / ".checkpoint-4.partial").is_dir()
    monkeypatch.setattr(checkpoints_module, "_save_tensors", real)
    resumed = Trainer(_model(tokenizer), args=_args(tmp_path), train_blocks=blocks, tokenizer=tokenizer)
    assert resumed.train(resume_from=resumed.latest_checkpoint()).step == 6
    assert not (tmp_path / ".checkpoint-4.partial").exists()
    assert resumed.save_checkpoint() == tmp_path / "checkpoint-6"  # saving the same step again replaces it
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_checkpoints_beyond_the_limit_are_removed(tokenizer, blocks, tmp_path):
    args = _args(tmp_path, save_interval=1, save_total_limit=2, max_steps=4)
    Trainer(_model(tokenizer), args=args, train_blocks=blocks).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]


def test_gradient_checkpointing_and_bf16_autocast(tokenizer, blocks, tmp_path):
    args = dict(max_steps=2, save_interval=100, gradient_accumulation_steps=1)
    plain = Trainer(_model(tokenizer), args=_args(tmp_path / "a", **args), train_blocks=blocks).train()
    recomputed = Trainer(
        _model(tokenizer),
        args=_args(tmp_path / "b", gradient_checkpointing=True, **args),
        train_blocks=blocks,
    )
    state = recomputed.train()
    assert recomputed.model.is_gradient_checkpointing
    assert [e["loss"] for e in state.log_history] == pytest.approx(
        [e["loss"] for e in plain.log_history], rel=1e-5
    )
    bf16 = Trainer(
        _model(tokenizer), args=_args(tmp_path / "c", precision="bf16", **args), train_blocks=blocks
    )
    losses = [e["loss"] for e in bf16.train().log_history]
    assert losses == pytest.approx([e["loss"] for e in plain.log_history], rel=0.05)
    assert bf16.model.dtype == torch.float32


def test_save_model_in_another_dtype(tokenizer, blocks, tmp_path):
    trainer = Trainer(_model(tokenizer), args=_args(tmp_path), train_blocks=blocks, tokenizer=tokenizer)
    trainer.save_model(tmp_path / "bf16", dtype=torch.bfloat16)
    loaded = StableLmForCausalLM.from_pretrained(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16 and trainer.model.dtype == torch.float32
    assert AutoTokenizer.from_pretrained(tmp_path / "bf16").get_vocab() == tokenizer.get_vocab()


def test_bad_training_input_gets_clear_errors(tokenizer, blocks, tmp_path):
    model = _model(tokenizer)
    with pytest.raises(ValueError, match="block size 128 is outside .* max_position_embeddings \\(64\\)"):
        Trainer(model, args=_args(tmp_path), train_blocks=torch.zeros(2, 128, dtype=torch.int64))
    with pytest.raises(ValueError, match=f"token id {len(tokenizer)}, outside the model's vocabulary"):
        Trainer(model, args=_args(tmp_path), train_blocks=torch.full((2, 8), len(tokenizer)))
    with pytest.raises(ValueError, match="Train a float32 model"):
        Trainer(model.to(torch.bfloat16), args=_args(tmp_path), train_blocks=blocks)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        _args(tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="precision must be one of"):
        _args(tmp_path, precision="fp16")


def test_model_config_files_are_checked(tokenizer, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4, "num_hiden_layers": 2}))
    with pytest.raises(ValueError, match="'num_hiden_layers' \\(did you mean 'num_hidden_layers'\\?\\)"):
        read_model_config(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_model_config(tmp_path / "nope.json")
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an object"):
        read_model_config(path)
    path.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 5}))
    with pytest.raises(ValueError, match="config.json: hidden_size \\(64\\) must be divisible"):
        read_model_config(path)
    path.write_text(
        json.dumps({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "eos_token_id": 7})
    )
    config = read_model_config(path, tokenizer=tokenizer)
    assert config.vocab_size == len(tokenizer) and config.pad_token_id == tokenizer.pad_token_id
    assert config.eos_token_id == 7  # what the file says wins


# ---- tokenizer training ----------------------------------------------------------------------------------
def test_trained_tokenizer_is_deterministic_and_loads_in_the_reference(tokenizer, tmp_path):
    assert train_tokenizer(TEXTS, vocab_size=400, model_max_length=64).backend_tokenizer.to_str() == (
        tokenizer.backend_tokenizer.to_str()
    )
    assert len(tokenizer) == 400
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|padding|>"]) == [0, 1]
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 0 and tokenizer.pad_token_id == 1
    text = "for x in range(10):\n    print(x)  # caf\u00e9 \u6771\u4eac \U0001f600"
    assert tokenizer.decode(tokenizer.encode(text)) == text  # byte-level: any text round-trips
    tokenizer.save_pretrained(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reference(text)["input_ids"] == AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"]
    assert (reference.eos_token, reference.pad_token, reference.model_max_length) == (
        "<|endoftext|>",
        "<|padding|>",
        64,
    )
    with pytest.raises(ValueError, match="vocab_size 100 is too small"):
        train_tokenizer(TEXTS, vocab_size=100)


# ---- the commands ----------------------------------------------------------------------------------------
def test_train_commands_end_to_end(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    write_text_jsonl(data, TEXTS)
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=64,
                tie_word_embeddings=True,
            )
        )
    )
    tok, out = tmp_path / "tok", tmp_path / "out"
    assert (
        main(["train-tokenizer", "--data", str(data), "--vocab-size", "300", "--output-dir", str(tok)]) == 0
    )
    common = [
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--block-size",
        "32",
        "--batch-size",
        "2",
        "--warmup-steps",
        "1",
        "--eval-interval",
        "2",
        "--save-interval",
        "2",
        "--log-interval",
        "1",
    ]
    assert main(["train", "--config", str(config), "--tokenizer", str(tok), "--max-steps", "2", *common]) == 0
    err = capsys.readouterr().err
    assert "step 2/2: loss" in err and "held-out loss" in err and "tokens/s" in err
    assert StableLmForCausalLM.from_pretrained(out).config.vocab_size == 300

    assert main(["train", "--config", str(config), "--tokenizer", str(tok), "--max-steps", "3", *common]) == 2
    assert "pass --resume" in capsys.readouterr().err
    args = [
        "train",
        "--config",
        str(config),
        "--tokenizer",
        str(tok),
        "--max-steps",
        "3",
        "--resume",
        *common,
    ]
    assert main(args) == 0
    assert "resumed from" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]

    chat = tmp_path / "chat"
    args = [
        "train",
        "--model",
        str(out),
        "--add-special-tokens",
        "<|user|>",
        "<|assistant|>",
        "--max-steps",
        "1",
    ]
    assert (
        main([*args, *common[:2], "--output-dir", str(chat), "--block-size", "32", "--eval-fraction", "0"])
        == 0
    )
    assert StableLmForCausalLM.from_pretrained(chat).config.vocab_size == 302
    assert AutoTokenizer.from_pretrained(chat).extra_special_tokens == ["<|user|>", "<|assistant|>"]


def test_train_command_errors(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "rope_thetta": 1.0}
        )
    )
    tok = tmp_path / "tok"
    train_tokenizer(TEXTS[:2], vocab_size=300).save_pretrained(tok)
    (tmp_path / "a.txt").write_text(TEXTS[0])
    base = ["train", "--tokenizer", str(tok), "--output-dir", str(tmp_path / "out")]
    assert main([*base, "--config", str(config), "--data", str(tmp_path / "a.txt")]) == 1
    assert "'rope_thetta' (did you mean 'rope_theta'?)" in capsys.readouterr().err
    config.write_text(
        json.dumps(
            {
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "max_position_embeddings": 16,
            }
        )
    )
    assert (
        main([*base, "--config", str(config), "--data", str(tmp_path / "a.txt"), "--block-size", "32"]) == 1
    )
    assert "block size 32 is outside" in capsys.readouterr().err
    assert main([*base, "--config", str(config), "--data", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl' does not exist" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--data", "x", "--output-dir", str(tmp_path)]) == 2
    assert "needs --tokenizer" in capsys.readouterr().err
    assert main(["train", "--data", "x", "--output-dir", str(tmp_path)]) == 2  # neither --config nor --model
    assert not Path(tmp_path / "out").exists()
