"""Hostile input to `stablelm train` and `stablelm train-tokenizer`: each is refused (or warned of) before
work starts, with a message that names the flag or file, never a traceback from deep inside torch."""

from __future__ import annotations

import json
import resource
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from training_fixtures import TEXTS as ALL_TEXTS
from training_fixtures import TINY_TRAINING_CONFIG, write_text_jsonl

import stablelm.training
from stablelm import CheckpointError, StableLmConfig, StableLmForCausalLM
from stablelm.cli import main
from stablelm.cli import train_run as train_command
from stablelm.training import (
    InsufficientMemoryError,
    Trainer,
    TrainingArguments,
    check_output_dir,
    check_training_memory,
    estimate_training_memory,
    pack,
    read_documents,
    split_blocks,
    tokenize,
    train_tokenizer,
)
from stablelm.training import checkpoints as checkpoints_module
from stablelm.training import memory as memory_module
from stablelm.training.sources import check_vocabulary, read_model_config
from stablelm.training.wording import plural

TEXTS = ALL_TEXTS[:4]
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(TINY_TRAINING_CONFIG, num_hidden_layers=1)
# About 10^12 parameters: 16 TB to train in float32 with AdamW.
HUGE = dict(TINY, hidden_size=32768, intermediate_size=131072, num_hidden_layers=60, num_attention_heads=256)
HUGE["num_key_value_heads"] = 256


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def files(tokenizer, tmp_path_factory):
    """A tokenizer folder, a tiny config.json and a data file."""
    root = tmp_path_factory.mktemp("files")
    tokenizer.save_pretrained(root / "tok")
    (root / "config.json").write_text(json.dumps(TINY))
    write_text_jsonl(root / "data.jsonl", TEXTS)
    return root


def _train(files, out, *extra):
    return main(
        [
            "train",
            "--config",
            str(files / "config.json"),
            "--tokenizer",
            str(files / "tok"),
            "--output-dir",
            str(out),
            "--block-size",
            "32",
            "--batch-size",
            "2",
            "--warmup-steps",
            "1",
            *extra,
        ]
    )


@pytest.fixture
def no_model_built(monkeypatch):
    """Fail the test (instead of allocating) if the command builds the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(train_command, "StableLmForCausalLM", refuse)


# ---- 1. --output-dir is checked before training ------------------------------------------------------
def test_an_output_dir_that_is_a_file_fails_before_any_work(files, tmp_path, capsys, no_model_built):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    assert _train(files, target, "--data", str(files / "data.jsonl"), "--max-steps", "2") == 1
    err = capsys.readouterr().err
    assert f"--output-dir '{target}' is a file" in err
    assert "data:" not in err and "Traceback" not in err
    assert target.read_text() == "not a folder"


def test_output_dir_checks_name_the_folder_and_create_nothing(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="output_dir '.*file/sub' cannot be created: .*file is a file"):
        check_output_dir(tmp_path / "file" / "sub")
    check_output_dir(tmp_path / "new" / "deeper")  # creatable: fine, and nothing is made yet
    assert not (tmp_path / "new").exists()

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    (tmp_path / "ro").mkdir()
    check_output_dir(tmp_path / "ro")
    assert list((tmp_path / "ro").iterdir()) == []  # the probe file is gone
    monkeypatch.setattr(checkpoints_module.tempfile, "mkstemp", refused)
    with pytest.raises(ValueError, match=r"--output-dir '.*ro': cannot write there \(Permission denied\)"):
        check_output_dir(tmp_path / "ro", name="--output-dir")
    with pytest.raises(ValueError, match=r"'.*ro/new': cannot create it: cannot write in .*ro \(Permission"):
        check_output_dir(tmp_path / "ro" / "new")


def test_trainer_checks_its_output_dir_before_the_first_step(tokenizer, tmp_path):
    (tmp_path / "file").write_text("x")
    model = StableLmForCausalLM(StableLmConfig(vocab_size=len(tokenizer), **TINY))
    events = []
    args = TrainingArguments(output_dir=tmp_path / "file", max_steps=2, batch_size=1, warmup_steps=1)
    trainer = Trainer(
        model, args=args, train_blocks=pack(tokenize(tokenizer, TEXTS), 16), callback=events.append
    )
    with pytest.raises(ValueError, match="output_dir .*file' is a file"):
        trainer.train()
    assert events == []


def test_train_tokenizer_checks_its_output_dir_first(files, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was trained")

    monkeypatch.setattr(stablelm.training, "train_tokenizer", refuse)
    (tmp_path / "taken").write_text("x")
    args = ["train-tokenizer", "--data", str(files / "data.jsonl"), "--output-dir", str(tmp_path / "taken")]
    assert main(args) == 1
    assert "--output-dir" in capsys.readouterr().err


# ---- 2. a model that cannot fit in memory is refused before it is allocated ---------------------------
def test_a_model_too_large_for_memory_is_refused_before_allocating(
    files, tmp_path, capsys, monkeypatch, no_model_built
):
    config = tmp_path / "huge.json"
    config.write_text(json.dumps(HUGE))
    monkeypatch.setattr(memory_module, "available_memory", lambda device: 8 * 2**30)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    args = ["train", "--config", str(config), "--tokenizer", str(files / "tok")]
    assert main([*args, "--data", str(files / "data.jsonl"), "--output-dir", str(tmp_path / "out")]) == 1
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak  # KiB on Linux, bytes on macOS
    assert grown * (1 if sys.platform == "darwin" else 1024) < 2**30
    err = capsys.readouterr().err
    assert f"--config {config}: Training this model needs about" in err
    assert "8.0 GiB available" in err and "1,030,809,911,296 parameters" in err
    assert "Make the model smaller" in err and not (tmp_path / "out").exists()


def test_memory_estimate_counts_weights_gradients_and_both_adamw_moments():
    config = StableLmConfig(vocab_size=300, **TINY)
    # Embedding (tied head) 300*32, q/k/v/o 4*32*32, MLP 3*32*64, two LayerNorms 2*2*32, final norm 2*32.
    parameters = 300 * 32 + 4 * 32 * 32 + 3 * 32 * 64 + 4 * 32 + 2 * 32
    estimate = estimate_training_memory(config, batch_size=2, block_size=16)
    assert (
        estimate.parameters == parameters == sum(p.numel() for p in StableLmForCausalLM(config).parameters())
    )
    assert (estimate.weights, estimate.gradients, estimate.optimizer) == (4 * parameters,) * 2 + (
        8 * parameters,
    )
    larger = estimate_training_memory(config, batch_size=4, block_size=16)
    assert larger.activations == 2 * estimate.activations > 0
    deep = StableLmConfig(vocab_size=300, **dict(TINY, num_hidden_layers=4))
    kept = estimate_training_memory(deep, batch_size=4, block_size=16)
    recomputed = estimate_training_memory(deep, batch_size=4, block_size=16, gradient_checkpointing=True)
    assert recomputed.activations < kept.activations


def test_memory_check_compares_with_what_is_available(monkeypatch):
    estimate = estimate_training_memory(StableLmConfig(vocab_size=300, **TINY), batch_size=2, block_size=16)
    monkeypatch.setattr(memory_module, "available_memory", lambda device: estimate.total)
    check_training_memory(estimate, device="cpu")
    monkeypatch.setattr(memory_module, "available_memory", lambda device: estimate.total - 1)
    with pytest.raises(InsufficientMemoryError, match="needs about .* but cpu has .* available") as caught:
        check_training_memory(estimate, device="cpu")
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, MemoryError)
    check_training_memory(estimate, device="cpu", weights_loaded=True)  # the weights are in memory already
    monkeypatch.setattr(memory_module, "available_memory", lambda device: None)  # unknown: no refusal
    check_training_memory(estimate, device="cpu")


def test_available_memory_is_read_on_this_machine():
    available = memory_module.available_memory("cpu")
    if sys.platform.startswith("linux"):
        meminfo = Path("/proc/meminfo").read_text()
        kib = int(next(line for line in meminfo.splitlines() if line.startswith("MemAvailable:")).split()[1])
        assert 0 < available <= kib * 1024 * 1.5  # another process may free memory between the two reads


def test_fine_tuning_checks_the_memory_of_the_rest_of_the_run(files, tmp_path, capsys, monkeypatch):
    config = StableLmConfig(vocab_size=300, **TINY)
    StableLmForCausalLM(config).save_pretrained(tmp_path / "model")
    # Room for the gradients and AdamW moments, but only for half of the default micro-batch's activations.
    estimate = estimate_training_memory(config, batch_size=8, block_size=64)
    room = estimate.gradients + estimate.optimizer + estimate.activations // 2
    monkeypatch.setattr(memory_module, "available_memory", lambda device: room)
    args = [
        "train",
        "--model",
        str(tmp_path / "model"),
        "--tokenizer",
        str(files / "tok"),
        "--max-steps",
        "1",
    ]
    assert main([*args, "--data", str(files / "data.jsonl"), "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "needs about" in err and "Lower --batch-size or --block-size" in err and "data:" not in err


# ---- 3. the tokenizer's size against the model's vocabulary ------------------------------------------
def test_a_model_vocabulary_far_larger_than_the_tokenizer_is_warned_of(files, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(TINY, vocab_size=4096)))
    (tmp_path / "short.txt").write_text("too short")
    args = [
        "train",
        "--config",
        str(config),
        "--tokenizer",
        str(files / "tok"),
        "--data",
        str(tmp_path / "short.txt"),
    ]
    assert main([*args, "--output-dir", str(tmp_path / "out"), "--warmup-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "warning: The model's vocab_size (4096) is larger than the tokenizer's 300 tokens" in err
    assert "3796 embedding rows will never be used" in err


def test_vocabulary_padding_is_fine_and_a_smaller_vocabulary_is_refused(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_vocabulary(tokenizer, StableLmForCausalLM(StableLmConfig(vocab_size=384, **TINY)))
    with pytest.warns(UserWarning, match="vocab_size \\(385\\) is larger than the tokenizer's 300 tokens"):
        check_vocabulary(tokenizer, StableLmForCausalLM(StableLmConfig(vocab_size=385, **TINY)))
    with pytest.raises(ValueError, match="tokenizer has 300 tokens .* the model's vocab_size is 200"):
        check_vocabulary(tokenizer, StableLmForCausalLM(StableLmConfig(vocab_size=200, **TINY)))


# ---- 4. a warmup longer than the run -----------------------------------------------------------------
def test_a_warmup_longer_than_the_run_is_warned_of(files, tmp_path, capsys):
    with pytest.warns(
        UserWarning, match=r"warmup_steps \(--warmup-steps\) is 10, .* max_steps \(--max-steps\) is 5"
    ):
        TrainingArguments(output_dir=tmp_path, warmup_steps=10, max_steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainingArguments(output_dir=tmp_path, warmup_steps=5, max_steps=5)  # reaches the peak at the end
    missing = str(tmp_path / "missing.txt")
    assert (
        _train(files, tmp_path / "out", "--data", missing, "--warmup-steps", "200", "--max-steps", "50") == 1
    )
    assert "warning: warmup_steps (--warmup-steps) is 200, longer than the run" in capsys.readouterr().err


# ---- 5. one thing, several things ----------------------------------------------------------------------
def test_counts_are_singular_or_plural(files, tmp_path, capsys):
    assert [plural(1, "document"), plural(2, "document"), plural(1234, "token")] == [
        "1 document",
        "2 documents",
        "1,234 tokens",
    ]
    with pytest.raises(ValueError, match="The data has 1 token, fewer than one block of 16"):
        pack(torch.arange(1), 16)
    with pytest.raises(ValueError, match="makes only 1 block, too few"):
        split_blocks(torch.arange(4).view(1, 4), 0.05)
    (tmp_path / "one.txt").write_text(TEXTS[0])
    args = ["--data", str(tmp_path / "one.txt"), "--max-steps", "1", "--eval-fraction", "0"]
    assert _train(files, tmp_path / "out", *args, "--save-interval", "1") == 0
    err = capsys.readouterr().err
    assert "data: 1 document, " in err and "trained 1 step on 64 tokens" in err
    tok = ["train-tokenizer", "--data", str(tmp_path / "one.txt"), "--vocab-size", "300"]
    assert main([*tok, "--output-dir", str(tmp_path / "tok")]) == 0
    assert "tokenizer on 1 document; saved" in capsys.readouterr().err


# ---- 6. text that is not UTF-8, lone surrogates ---------------------------------------------------------
def test_bytes_that_are_not_utf8_are_an_error_naming_file_line_and_offset(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not UTF-8 text: byte offset 28 holds b'\\xe9'"):
        read_documents([tmp_path / "bad.jsonl"])
    (tmp_path / "bad.txt").write_bytes(b"line one\nline two \xff\n")
    with pytest.raises(ValueError, match=r"bad.txt:2 is not UTF-8 text: byte offset 18 .*Convert the file"):
        read_documents([tmp_path / "bad.txt"])
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "with a byte-order mark"}\n')
    assert read_documents([tmp_path / "bom.jsonl"]) == ["with a byte-order mark"]


def test_lone_surrogates_are_an_error_naming_where_they_are(tokenizer, tmp_path, files, capsys):
    (tmp_path / "escaped.jsonl").write_text('{"text": "ok"}\n{"text": "half a pair \\udc80"}\n')
    with pytest.raises(ValueError, match=r"escaped.jsonl:2: the \"text\" holds a lone surrogate \\udc80"):
        read_documents([tmp_path / "escaped.jsonl"])
    decoded = b"caf\xe9".decode("utf-8", errors="surrogateescape")  # "caf\udce9"
    with pytest.raises(ValueError, match=r"Document 1 holds a lone surrogate \\udce9 at character 3"):
        tokenize(tokenizer, ["fine", decoded])
    with pytest.raises(ValueError, match=r"Document 0 holds a lone surrogate \\udce9"):
        train_tokenizer([decoded], vocab_size=300)
    assert _train(files, tmp_path / "out", "--data", str(tmp_path / "escaped.jsonl")) == 1
    err = capsys.readouterr().err
    assert 'escaped.jsonl:2: the "text" holds a lone surrogate' in err and "Traceback" not in err


# ---- 7. the rest of train's arguments ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--min-lr", "inf"),
        ("--weight-decay", "nan"),
        ("--max-grad-norm", "nan"),
        ("--eval-fraction", "nan"),
        ("--seed", "-1"),
        ("--seed", str(2**40)),
        ("--batch-size", "0"),  # these two were already usage errors
        ("--max-steps", "0"),
    ],
)
def test_flag_values_that_cannot_train_are_usage_errors(files, tmp_path, capsys, flag, value):
    assert _train(files, tmp_path / "out", "--data", str(tmp_path / "missing.txt"), flag, value) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err and "Traceback" not in err


@pytest.mark.parametrize(
    "field, value",
    [("learning_rate", float("nan")), ("learning_rate", float("inf")), ("weight_decay", float("nan"))],
)
def test_training_arguments_refuse_nan_and_infinity(tmp_path, field, value):
    flag = {"learning_rate": "--lr", "weight_decay": "--weight-decay"}[field]
    with pytest.raises(ValueError, match=f"{field} must be a finite number, got {value} \\({flag}\\)"):
        TrainingArguments(output_dir=tmp_path, **{field: value})
    TrainingArguments(output_dir=tmp_path, max_grad_norm=float("inf"))  # no clipping, as None


def test_short_held_out_data_and_a_config_folder_are_named(files, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("too short")
    assert (
        _train(
            files,
            tmp_path / "out",
            "--data",
            str(files / "data.jsonl"),
            "--eval-data",
            str(tmp_path / "short.txt"),
        )
        == 1
    )
    assert "--eval-data: The data has" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="is a folder; pass the config.json file in it"):
        read_model_config(tmp_path)


def test_a_huge_tokenizer_vocabulary_is_refused_clearly(files, tmp_path, capsys):
    args = ["train-tokenizer", "--data", str(files / "data.jsonl"), "--vocab-size", str(10**30)]
    assert main([*args, "--output-dir", str(tmp_path / "tok")]) == 1
    assert "vocab_size 1000000000000000000000000000000 is too large" in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    """A one-step training checkpoint of the tiny model."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = StableLmForCausalLM(StableLmConfig(vocab_size=len(tokenizer), **TINY))
    args = TrainingArguments(output_dir=out, max_steps=1, batch_size=2, warmup_steps=1, precision="fp32")
    Trainer(model, args=args, train_blocks=pack(tokenize(tokenizer, TEXTS), 16), tokenizer=tokenizer).train()
    return out / "checkpoint-1"


def _damage_state(folder):
    (folder / "trainer_state.json").write_text("{not json")


def _state_without_run(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    del state["run"]
    (folder / "trainer_state.json").write_text(json.dumps(state))


def _truncate_optimizer(folder):
    data = (folder / "optimizer.pt").read_bytes()
    (folder / "optimizer.pt").write_bytes(data[: len(data) // 2])


def _junk_rng(folder):
    (folder / "rng_state.pt").write_bytes(b"junk")


def _foreign_weights(folder):
    other = StableLmForCausalLM(StableLmConfig(vocab_size=300, **dict(TINY, hidden_size=64)))
    other.save_pretrained(folder)


def _foreign_optimizer(folder):
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    state["state"][0]["exp_avg"] = torch.zeros(300, 64)
    torch.save(state, folder / "optimizer.pt")


@pytest.mark.parametrize(
    "damage, file, message",
    [
        (_damage_state, "trainer_state.json", "is damaged: not JSON"),
        (_state_without_run, "trainer_state.json", "it lacks 'run'"),
        (_truncate_optimizer, "optimizer.pt", "is damaged or not a file torch.save wrote"),
        (_junk_rng, "rng_state.pt", "is damaged or not a file torch.save wrote"),
        (_foreign_weights, "", "are from another model: model.embed_tokens.weight is \\(300, 64\\) there"),
        (_foreign_optimizer, "optimizer.pt", "optimiser state of another model: its exp_avg of parameter 0"),
    ],
)
def test_resuming_from_a_damaged_or_foreign_checkpoint_is_refused_and_changes_nothing(
    tokenizer, checkpoint, tmp_path, damage, file, message
):
    folder = tmp_path / "checkpoint-1"
    shutil.copytree(checkpoint, folder)
    damage(folder)
    model = StableLmForCausalLM(StableLmConfig(vocab_size=len(tokenizer), **TINY))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    args = TrainingArguments(output_dir=tmp_path, max_steps=2, batch_size=2, warmup_steps=1, precision="fp32")
    trainer = Trainer(model, args=args, train_blocks=pack(tokenize(tokenizer, TEXTS), 16))
    with pytest.raises(CheckpointError, match=f"{folder / file if file else folder}.*{message}"):
        trainer.resume(folder)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
    assert trainer.optimizer.state_dict()["state"] == {}


def test_a_damaged_checkpoint_is_found_before_the_data_is_read(files, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text("[]")
    assert _train(files, out, "--data", str(files / "data.jsonl"), "--resume") == 1
    err = capsys.readouterr().err
    assert "checkpoint-3/trainer_state.json is damaged: it holds a JSON list" in err
    assert "delete that folder" in err and "data:" not in err
