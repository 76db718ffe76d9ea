"""LoRA adapters and chat data under torchrun (gloo, CPU): DDP and FSDP2 against one process.

Each run is a real `python -m torch.distributed.run ... -m stablelm train` of a tiny checkpoint; the one-process
runs it is compared with are `stablelm train` in this process, with the same global batch. Tolerance as in
test_training_distributed.py (the same gradients summed in another order, float32): losses within rel 2e-6,
adapter weights and AdamW moments within atol 1e-6.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import transformers
from safetensors.torch import load_file
from training_fixtures import (
    TEXTS,
    history,
    launch,
    save_checkpoint,
    tiny_causal_lm,
    torchrun,
    write_jsonl,
    write_text_jsonl,
)

from stablelm import AutoTokenizer, StableLmForCausalLM
from stablelm.cli import main
from stablelm.training.lora import apply_adapter

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("torchrun_tmpdir")

DEMO = Path(__file__).parents[1] / "stablelm" / "assets" / "demo"
STEPS, SAVE = 6, 3
LOSS_RTOL, WEIGHT_ATOL = 2e-6, 1e-6


@pytest.fixture(scope="module")
def base(training_tokenizer, tmp_path_factory) -> Path:
    """A tiny float32 checkpoint with a trained tokenizer, and JSON-lines text to train on."""
    folder = tmp_path_factory.mktemp("base")
    save_checkpoint(folder, tiny_causal_lm(len(training_tokenizer)), training_tokenizer)
    write_text_jsonl(folder / "data.jsonl", TEXTS[:12])
    return folder


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--block-size", "32",
        "--max-steps", str(STEPS), "--warmup-steps", "1", "--lr", "1e-2", "--save-interval", str(SAVE),
        "--eval-interval", str(SAVE), "--eval-fraction", "0.2", "--save-total-limit", "0", "--precision", "fp32",
        "--threads", "1", "--log-interval", "1", *extra,
    ]  # fmt: skip


def _two_processes(args: list[str]):
    result = launch([*torchrun("--standalone", "--nproc-per-node", "2", "-m", "stablelm"), *args])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _assert_same_losses(ours: Path, reference: Path) -> None:
    mine, theirs = history(ours / f"checkpoint-{STEPS}"), history(reference / f"checkpoint-{STEPS}")
    assert [sorted(e) for e in mine] == [sorted(e) for e in theirs]
    assert any("eval_loss" in e for e in mine)
    for a, b in zip(mine, theirs, strict=True):
        for key in set(a) - {"step"}:
            assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL), (key, a, b)


def _assert_same_tensors(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=WEIGHT_ATOL, msg=name)


def _assert_same_optimizer(ours: Path, reference: Path) -> None:
    mine = torch.load(ours / f"checkpoint-{STEPS}" / "optimizer.pt", weights_only=True)
    theirs = torch.load(reference / f"checkpoint-{STEPS}" / "optimizer.pt", weights_only=True)
    assert mine["param_groups"] == theirs["param_groups"] and mine["state"].keys() == theirs["state"].keys()
    for index, state in theirs["state"].items():
        _assert_same_tensors(mine["state"][index], state)


# ---- LoRA ----------------------------------------------------------------------------------------------------
LORA = ("--lora-r", "4", "--lora-target", "q_proj,v_proj,down_proj")


@pytest.fixture(scope="module")
def lora_one_process(base, tmp_path_factory) -> Path:
    """One process, global batch 4 (2 x 2 micro-batches), with the adapter merged too."""
    out = tmp_path_factory.mktemp("lora-one")
    data = base / "data.jsonl"
    assert main(_args(base, data, out, *LORA, "--batch-size", "2", "--grad-accum", "2", "--merge")) == 0
    return out


def test_lora_under_ddp_equals_one_process(base, lora_one_process, tmp_path):
    out = tmp_path / "ddp"
    args = _args(base, base / "data.jsonl", out, *LORA, "--strategy", "ddp", "--batch-size", "1")
    result = _two_processes([*args, "--grad-accum", "2"])
    assert result.stderr.count(f"saved {out / f'checkpoint-{STEPS}'}") == 1  # rank 0 alone writes
    _assert_same_losses(out, lora_one_process)
    _assert_same_optimizer(out, lora_one_process)
    adapter = load_file(out / "adapter_model.safetensors")
    _assert_same_tensors(adapter, load_file(lora_one_process / "adapter_model.safetensors"))
    assert not (out / "model.safetensors").exists()

    # The adapter rank 0 saved loads with peft onto the reference, with our logits.
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 2, 180]])
    reference = transformers.StableLmForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        before = reference(ids).logits
        reference = peft.PeftModel.from_pretrained(reference, out).eval()
        expected = reference(ids).logits
        ours = apply_adapter(StableLmForCausalLM.from_pretrained(base), out, merge=False).eval()
        assert (expected - before).abs().max() > 1e-2  # the adapter trained
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)


def test_lora_under_fsdp_resumes_a_one_process_checkpoint_and_merges(base, lora_one_process, tmp_path):
    """FSDP2 shards the base weights and the adapters; it resumes a one-process adapter checkpoint, trains
    on, gathers the adapter (and its AdamW state) for rank 0 to save, and --merge writes the merged model."""
    out = tmp_path / "fsdp"
    out.mkdir()
    shutil.copytree(lora_one_process / f"checkpoint-{SAVE}", out / f"checkpoint-{SAVE}")
    args = _args(base, base / "data.jsonl", out, *LORA, "--strategy", "fsdp", "--batch-size", "2", "--merge")
    result = _two_processes([*args, "--resume"])
    assert result.stderr.count("resumed from") == 1
    _assert_same_losses(out, lora_one_process)
    _assert_same_optimizer(out, lora_one_process)
    _assert_same_tensors(
        load_file(out / "adapter_model.safetensors"),
        load_file(lora_one_process / "adapter_model.safetensors"),
    )
    merged, expected = (load_file(d / "merged" / "model.safetensors") for d in (out, lora_one_process))
    _assert_same_tensors(merged, expected)
    assert AutoTokenizer.from_pretrained(out / "merged") is not None


# bf16 (mixed precision) under FSDP against one process in bf16. FSDP reduces the gradients in float32
# (reduce_dtype), so summing over the ranks adds only float32 rounding (~1e-7, as above); what differs from one
# process is bf16 rounding: FSDP casts every parameter to bf16 for compute (the one process's autocast rounds
# only matmul operands, and keeps norm weights, embeddings and gradients float32), and each rank's gradient
# is rounded to bf16 (relative 2^-8 = 3.9e-3 per element) before the float32 reduce-scatter. A step's loss, a
# mean over 124 predicted tokens, moves much less than one element: measured within 1e-4 relative over 6
# steps. Tolerance 1e-3: 4x below one bf16 rounding, 10x above what was measured, and below what a wrong batch
# (consecutive steps' losses differ by 1-2%) or a rank weighing its gradient twice would give.
# The adapter weights are not compared element by element: AdamW's first steps move each weight by about
# +-lr whatever its gradient's size, so a gradient near zero whose sign a bf16 rounding flips moves that
# weight 2 lr the other way (measured: lora_B 11-13% apart in Frobenius norm between one process in bf16 and
# in float32, and between FSDP and one process in bf16). The held-out losses, the adapter's effect on the
# model, are compared instead.
BF16_LOSS_RTOL = 1e-3


def test_lora_under_fsdp_from_step_0_equals_one_process(base, lora_one_process, tmp_path):
    """float32: the adapter made at step 0 on every rank (the same seed), then sharded, trains as in one
    process within float32 reduction tolerance (the other FSDP test resumes a one-process checkpoint)."""
    out = tmp_path / "fsdp"
    args = _args(base, base / "data.jsonl", out, *LORA, "--strategy", "fsdp", "--batch-size", "1")
    result = _two_processes([*args, "--grad-accum", "2"])
    assert "resumed" not in result.stderr
    _assert_same_losses(out, lora_one_process)
    _assert_same_optimizer(out, lora_one_process)
    _assert_same_tensors(
        load_file(out / "adapter_model.safetensors"),
        load_file(lora_one_process / "adapter_model.safetensors"),
    )


def test_lora_under_fsdp_in_bf16_from_step_0_equals_one_process_in_bf16(base, lora_one_process, tmp_path):
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    data, bf16 = base / "data.jsonl", ("--precision", "bf16")
    assert main(_args(base, data, one, *LORA, "--batch-size", "2", "--grad-accum", "2", *bf16)) == 0
    args = _args(
        base, data, fsdp, *LORA, "--strategy", "fsdp", "--batch-size", "1", "--grad-accum", "2", *bf16
    )
    assert "resumed" not in _two_processes(args).stderr
    mine, theirs = history(fsdp / f"checkpoint-{STEPS}"), history(one / f"checkpoint-{STEPS}")
    assert [sorted(e) for e in mine] == [sorted(e) for e in theirs] and any("eval_loss" in e for e in mine)
    for a, b in zip(mine, theirs, strict=True):
        for key in set(a) - {"step"}:
            assert a[key] == pytest.approx(b[key], rel=BF16_LOSS_RTOL), (key, a, b)
    # bf16 did happen: the same run in float32 is further from it than float32 reductions allow
    fp32 = history(lora_one_process / f"checkpoint-{STEPS}")
    assert (
        max(abs(a["loss"] / b["loss"] - 1) for a, b in zip(theirs, fp32, strict=True) if "loss" in a) > 1e-5
    )
    adapter = load_file(fsdp / "adapter_model.safetensors")
    assert adapter.keys() == load_file(one / "adapter_model.safetensors").keys()
    assert all(t.dtype == torch.float32 for t in adapter.values())  # the float32 master weights, gathered
    assert max(t.abs().max() for name, t in adapter.items() if "lora_B" in name) > 1e-3  # B starts at 0


# ---- chat data -----------------------------------------------------------------------------------------------
def _conversations() -> list[dict]:
    """Conversations whose assistant turns differ in length, so that blocks hold unequal labelled counts."""
    words = "the for statement iterates over the items of any sequence in the order that they appear".split()
    rows = []
    for n in range(24):
        reply = " ".join(words[: 1 + (n * 7) % len(words)])
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Question {n}?"},
                    {"role": "assistant", "content": reply},
                ]
            }
        )
    return rows


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("chat")
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    assert tokenizer.chat_template is not None
    save_checkpoint(folder, tiny_causal_lm(len(tokenizer)), tokenizer)
    return folder, write_jsonl(folder / "chat.jsonl", _conversations())


def test_chat_data_under_ddp_equals_one_process(chat, tmp_path):
    """The loss is the mean over the global step's labelled tokens: a rank weighs its micro-batches by the
    labelled tokens of all ranks (summed across them), not by its own."""
    model, data = chat
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    assert main(_args(model, data, one, "--batch-size", "2", "--grad-accum", "2")) == 0
    _two_processes(_args(model, data, ddp, "--strategy", "ddp", "--batch-size", "1", "--grad-accum", "2"))
    _assert_same_losses(ddp, one)
    _assert_same_tensors(load_file(ddp / "model.safetensors"), load_file(one / "model.safetensors"))


def test_merging_a_sharded_adapter_in_the_trainer_is_refused_clearly(base, tmp_path, monkeypatch):
    """Trainer.save_model(merge=True) needs the whole base weights, which FSDP shards: refused, naming the way
    (the command merges the saved adapter into the base read again instead, tested above)."""
    from stablelm.training import Trainer, TrainingArguments, distributed
    from stablelm.training.lora import LoraSettings, add_lora

    model = add_lora(StableLmForCausalLM.from_pretrained(base), LoraSettings(r=2))
    blocks = torch.randint(0, model.config.vocab_size, (4, 16))
    trainer = Trainer(model, args=TrainingArguments(output_dir=str(tmp_path)), train_blocks=blocks)
    monkeypatch.setattr(distributed, "is_sharded", lambda module: True)
    with pytest.raises(
        ValueError, match="merge=True needs the whole weights .* FSDP shards them.*apply_adapter"
    ):
        trainer.save_model(tmp_path / "merged", merge=True)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("case", ["bad-row", "mixed-data"])
def test_a_data_error_under_torchrun_is_printed_once(chat, tmp_path, case):
    """A bad row is met by the process that tokenizes (the first of the machine; the other waits for its cache
    files), mixed data by every process: either way one process prints it, and the job ends at once."""
    model, _ = chat
    data = tmp_path / "data"
    data.mkdir()
    if case == "bad-row":
        rows = [*_conversations()[:10], {"messages": [{"role": "robot", "content": "beep"}]}]
        where = f"{write_jsonl(data / 'chat.jsonl', rows)}:11: message 0 has role 'robot'"
    else:
        write_jsonl(data / "a.jsonl", _conversations()[:3])
        write_text_jsonl(data / "b.jsonl", ["plain text"])
        where = "The data mixes chat conversations"
    start = time.monotonic()
    command = torchrun("--standalone", "--nproc-per-node", "2", "-m", "stablelm")
    result = launch([*command, *_args(model, data, tmp_path / "out", "--batch-size", "1")])
    assert result.returncode != 0
    assert result.stderr.count("stablelm: error:") == 1 and where in result.stderr, result.stderr[-3000:]
    assert time.monotonic() - start < 45  # the other rank does not wait out its grace period
