"""Builders shared by the training tests: texts, a tiny model and tokenizer, data files, checkpoints, runs that
stop at a save, and torchrun launched in a session of its own with its temporary files under the test's
folder. The pytest fixtures built on them (`one_thread`, `training_tokenizer`, `torchrun_tmpdir`) are in
conftest.py."""

from __future__ import annotations

import json
import os
import pydoc_data.topics
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_

from stablelm import StableLmConfig, StableLmForCausalLM
from stablelm.training import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
# Python's own documentation: real English text of varied length, always at hand.
TEXTS = [pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)[:40]]
RUN_TIMEOUT = 90  # a torchrun job of a tiny model that takes longer has hung
# A tiny model for `stablelm train --config` (hidden 32, one or two layers).
TINY_TRAINING_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def tiny_tokenizer(texts: int = 12, vocab_size: int = 300, **kwargs):
    """A byte-level BPE tokenizer trained on the first `texts` TEXTS."""
    return train_tokenizer(TEXTS[:texts], vocab_size=vocab_size, **{"model_max_length": 64, **kwargs})


def tiny_causal_lm(vocab_size: int, *, seed: int = 0, **overrides) -> StableLmForCausalLM:
    """A random float32 causal LM with hidden size 32 and two layers."""
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = StableLmForCausalLM(StableLmConfig(**{**fields, **overrides}))
    randomize_(model, seed)
    return model


def write_jsonl(path: Path, rows) -> Path:
    """Rows (objects, or lines as they are) as a JSON-lines file."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def write_text_jsonl(path: Path, texts) -> Path:
    """`{"text": ...}` lines."""
    return write_jsonl(path, [{"text": text} for text in texts])


def save_checkpoint(folder: Path, model, tokenizer) -> Path:
    """A model and its tokenizer saved as a Hugging Face checkpoint folder."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Interrupt(Exception):
    """Raised by `stop_at_save` to end a run as if killed."""


def stop_at_save(step: int):
    """A Trainer callback that interrupts the run once checkpoint-`step` is saved."""

    def callback(event):
        if event.kind == "save" and event.step == step:
            raise Interrupt

    return callback


def history(folder: Path) -> list[dict]:
    """The log history a checkpoint's trainer_state.json holds."""
    return json.loads((folder / "trainer_state.json").read_text())["log_history"]


# ---- torchrun ----------------------------------------------------------------------------------------------
def environment() -> dict[str, str]:
    """This process's environment (with TMPDIR where `torchrun_tmpdir` put it) for a run of this checkout."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def torchrun(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *flags]


def start(command: list[str], **options) -> subprocess.Popen:
    """A command (torchrun) in a session of its own, so that `stop` ends its workers too."""
    return subprocess.Popen(
        command,
        env=options.pop("env", environment()),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **options,
    )


def stop(process: subprocess.Popen) -> None:
    """Kill torchrun and its workers if they still run (a hung test leaves no process behind)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def launch(command: list[str]) -> subprocess.CompletedProcess:
    """Run a command to its end (at most RUN_TIMEOUT seconds: longer fails the test)."""
    process = start(command)
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(process)
        _, stderr = process.communicate()
        pytest.fail(f"{' '.join(command)} ran past {RUN_TIMEOUT} s:\n{(stderr or '')[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
