"""Data-parallel training under torchrun (gloo, CPU): DDP and FSDP2 against one process, checkpoints that
resume on another world size, a failing rank, and two "nodes" on 127.0.0.1 (README's multi-node line).

Each run is a real `python -m torch.distributed.run ... -m stablelm train` of a tiny model (2 layers, hidden 32)
on Python's documentation; the one-process runs it is compared with are `stablelm train` in this process.
Tolerance: one process and W processes sum the same gradients in another order (per rank, then across
ranks), so they agree within float32 rounding, which 24 AdamW steps carry into the weights: losses within
rel 2e-6, weights and AdamW moments within atol 1e-6 (measured on CPU: losses 1.7e-7 rel, weights 1.2e-7,
moments 7.5e-9 at most).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import transformers
from safetensors.torch import load_file
from training_fixtures import (
    ROOT,
    RUN_TIMEOUT,
    TEXTS,
    TINY_TRAINING_CONFIG,
    environment,
    history,
    launch,
    start,
    stop,
    tiny_tokenizer,
    torchrun,
    write_text_jsonl,
)

from stablelm import AutoTokenizer, StableLmForCausalLM
from stablelm.cli import main
from stablelm.training import BlockOrder
from stablelm.training.distributed import Distributed, from_environment

STEPS, SAVE = 24, 4
LOSS_RTOL, WEIGHT_ATOL = 2e-6, 1e-6
pytestmark = pytest.mark.usefixtures("torchrun_tmpdir")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A tokenizer, a tiny config.json and JSON-lines data, in one folder."""
    folder = tmp_path_factory.mktemp("inputs")
    write_text_jsonl(folder / "data.jsonl", TEXTS[:12])
    tiny_tokenizer().save_pretrained(folder / "tok")
    (folder / "config.json").write_text(json.dumps(TINY_TRAINING_CONFIG))
    return folder


def _train_args(inputs: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        str(inputs / "config.json"),
        "--tokenizer",
        str(inputs / "tok"),
        "--data",
        str(inputs / "data.jsonl"),
        "--output-dir",
        str(output_dir),
        "--block-size",
        "32",
        "--max-steps",
        str(STEPS),
        "--warmup-steps",
        "2",
        "--save-interval",
        str(SAVE),
        "--eval-interval",
        str(SAVE),
        "--save-total-limit",
        "0",
        "--precision",
        "fp32",
        "--threads",
        "1",
        *extra,
    ]


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory) -> Path:
    """The run every data-parallel one is compared with: one process, global batch 8 (4 x 2 micro-batches)."""
    out = tmp_path_factory.mktemp("one")
    assert main(_train_args(inputs, out, "--batch-size", "4", "--grad-accum", "2")) == 0
    return out


def _assert_same_run(ours: Path, reference: Path) -> None:
    """Same losses, held-out losses and learning rates (within float32 rounding), same weights and AdamW state."""
    mine, theirs = history(ours / f"checkpoint-{STEPS}"), history(reference / f"checkpoint-{STEPS}")
    assert [sorted(e) for e in mine] == [sorted(e) for e in theirs]
    for a, b in zip(mine, theirs, strict=True):
        assert a["step"] == b["step"]
        for key in set(a) - {"step"}:
            assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL), (key, a, b)
    final, expected = load_file(ours / "model.safetensors"), load_file(reference / "model.safetensors")
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=WEIGHT_ATOL, msg=name)
    optimizer = torch.load(ours / f"checkpoint-{STEPS}" / "optimizer.pt", weights_only=True)
    reference_optimizer = torch.load(reference / f"checkpoint-{STEPS}" / "optimizer.pt", weights_only=True)
    assert optimizer["param_groups"] == reference_optimizer["param_groups"]
    for index, state in reference_optimizer["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(optimizer["state"][index][key], value, rtol=0, atol=WEIGHT_ATOL)


# ---- the data each rank reads ------------------------------------------------------------------------------
def test_ranks_split_each_global_batch_of_the_one_process_order():
    order, global_batch = BlockOrder(37, seed=5), 12
    one = order.indices(0, 3 * global_batch).tolist()
    for world in (2, 3, 4):
        per_rank = global_batch // world
        for step in range(3):
            start = step * global_batch
            shares = [order.indices(start + rank, per_rank, stride=world).tolist() for rank in range(world)]
            assert sorted(sum(shares, [])) == sorted(one[start : start + global_batch])


def test_torchrun_environment_is_read_and_checked(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert from_environment() == Distributed()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="sets RANK, WORLD_SIZE but not LOCAL_RANK; start .* with torchrun"):
        from_environment()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert from_environment(strategy="fsdp") == Distributed(
        rank=1, local_rank=1, world_size=2, strategy="fsdp"
    )
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="rank 2 .* does not fit a world of 2 processes"):
        from_environment()
    with pytest.raises(ValueError, match=r"strategy must be one of \('ddp', 'fsdp'\)"):
        Distributed(strategy="zero3")


# ---- DDP and FSDP2 against one process ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy, split",
    [
        ("ddp", ("--batch-size", "2", "--grad-accum", "2")),
        ("fsdp", ("--batch-size", "4", "--grad-accum", "1")),
    ],
)
def test_two_processes_equal_one_with_the_same_global_batch(
    inputs, one_process, tmp_path, strategy, split, torchrun_tmpdir
):
    out = tmp_path / strategy
    command = torchrun("--standalone", "--nproc-per-node", "2", "-m", "stablelm")
    result = launch([*command, *_train_args(inputs, out, "--strategy", strategy, *split)])
    assert result.returncode == 0, result.stderr[-3000:]
    # torchrun's agent left its torchelastic_* folder in the test's TMPDIR, not in /tmp
    assert list(torchrun_tmpdir.glob("torchelastic_*")), list(torchrun_tmpdir.iterdir())
    _assert_same_run(out, one_process)
    # Only rank 0 logs: one line per log interval, one final line.
    assert result.stderr.count(f"step {STEPS}/{STEPS}: loss") == 1
    assert result.stderr.count("trained 24 steps on 6,144 tokens across 2 processes") == 1

    # The checkpoint a sharded run wrote is a whole Hugging Face checkpoint: here and in the reference.
    folder = out / f"checkpoint-{STEPS}"
    ids = AutoTokenizer.from_pretrained(folder)("The for statement", return_tensors="pt")["input_ids"]
    ours = StableLmForCausalLM.from_pretrained(folder).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_fsdp_in_bf16_trains_close_to_float32(inputs, one_process, tmp_path):
    out = tmp_path / "bf16"
    command = torchrun("--standalone", "--nproc-per-node", "2", "-m", "stablelm")
    args = _train_args(inputs, out, "--strategy", "fsdp", "--batch-size", "4", "--precision", "bf16")
    result = launch([*command, *args[: args.index("--precision")], *args[args.index("--precision") + 2 :]])
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [e["loss"] for e in history(out / f"checkpoint-{STEPS}") if "loss" in e]
    expected = [e["loss"] for e in history(one_process / f"checkpoint-{STEPS}") if "loss" in e]
    assert losses == pytest.approx(expected, rel=0.02)
    assert losses != pytest.approx(expected, rel=1e-6)  # bf16 compute did happen
    assert load_file(out / "model.safetensors")["model.norm.weight"].dtype == torch.float32


# ---- failures ----------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _local_rank(pid: int) -> int | None:
    try:
        environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    values = dict(item.split(b"=", 1) for item in environ if b"=" in item)
    return int(values[b"LOCAL_RANK"]) if b"LOCAL_RANK" in values else None


def test_killed_rank_ends_the_job_and_the_run_resumes_on_another_world_size(inputs, one_process, tmp_path):
    out = tmp_path / "killed"
    command = torchrun("--standalone", "--nproc-per-node", "2", "-m", "stablelm")
    args = _train_args(inputs, out, "--batch-size", "2", "--grad-accum", "2")
    job = start([*command, *args])
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while (
            not (out / f"checkpoint-{SAVE}").is_dir() and job.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        ranks = {_local_rank(pid): pid for pid in _children(job.pid)}
        assert 1 in ranks, f"no rank 1 to kill: {ranks}, {job.poll()}"
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = job.communicate(timeout=60)
    finally:
        stop(job)
    assert job.returncode != 0 and time.monotonic() - killed < 15, stderr[-2000:]
    assert not (out / "model.safetensors").exists(), "the run ended before the kill: nothing was tested"
    assert "Signals.SIGKILL" in stderr or "SIGKILL" in stderr

    # Resumed in one process, with the global batch of 8 split as 4 x 2 micro-batches instead of 2 x 2 x 2 ranks.
    assert main([*_train_args(inputs, out, "--batch-size", "4", "--grad-accum", "2"), "--resume"]) == 0
    _assert_same_run(out, one_process)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_resume_a_one_process_checkpoint(inputs, one_process, tmp_path, strategy):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(one_process / "checkpoint-12", out / "checkpoint-12")
    command = torchrun("--standalone", "--nproc-per-node", "2", "-m", "stablelm")
    args = _train_args(inputs, out, "--strategy", strategy, "--batch-size", "4", "--resume")
    result = launch([*command, *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("resumed from") == 1
    _assert_same_run(out, one_process)


RAISING_RANK = """
import sys
from stablelm.cli import main
from stablelm.training import trainer

if __name__ == "__main__":
    real = trainer.Trainer._train_step

    def failing(self):
        if self.parallel.rank == 1 and self.state.step == 3:
            raise RuntimeError("rank 1 broke at step 3")
        real(self)

    trainer.Trainer._train_step = failing
    sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_rank_that_raises_ends_the_whole_job_within_seconds(inputs, tmp_path, strategy):
    script = tmp_path / "raising_rank.py"
    script.write_text(RAISING_RANK)
    args = _train_args(inputs, tmp_path / "out", "--batch-size", "2", "--strategy", strategy)
    start = time.monotonic()
    result = launch([*torchrun("--standalone", "--nproc-per-node", "2"), str(script), *args])
    assert result.returncode != 0
    assert "stablelm: error: RuntimeError: rank 1 broke at step 3" in result.stderr
    # The whole run (two interpreters starting, three steps) takes a few seconds when nothing hangs; rank 0,
    # waiting in its next collective, is stopped by torchrun as soon as rank 1 exits.
    assert time.monotonic() - start < 45, result.stderr[-2000:]
    assert not (tmp_path / "out" / "model.safetensors").exists()


HANGING_RANK = RAISING_RANK.replace(
    'raise RuntimeError("rank 1 broke at step 3")', "import time; time.sleep(3600)"
)


def test_a_rank_that_hangs_ends_the_job_after_the_collective_timeout(inputs, tmp_path):
    script = tmp_path / "hanging_rank.py"
    script.write_text(HANGING_RANK)
    args = _train_args(inputs, tmp_path / "out", "--batch-size", "2", "--dist-timeout", "5")
    start = time.monotonic()
    result = launch([*torchrun("--standalone", "--nproc-per-node", "2"), str(script), *args])
    assert result.returncode != 0
    # Rank 0's next collective gives up after 5 s and rank 0 exits with the error; torchrun stops rank 1.
    assert re.search(r"stablelm: error: .*Timed out waiting 5000ms", result.stderr), result.stderr[:3000]
    assert time.monotonic() - start < 60, result.stderr[-2000:]


# ---- two nodes -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def readme_multi_node_command() -> str:
    """The README's multi-node command line (the one with --node-rank)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)
    found = [line for block in blocks for line in _joined(block.splitlines()) if "--node-rank" in line]
    assert len(found) == 1, f"README.md should have one multi-node torchrun line, has {found}"
    return found[0]


def _joined(lines: list[str]) -> list[str]:
    """Lines continued with a backslash joined into one."""
    joined, current = [], ""
    for line in lines:
        current += " " + line.rstrip().rstrip("\\").strip()
        if not line.rstrip().endswith("\\"):
            joined.append(current.strip())
            current = ""
    return joined


def test_readme_multi_node_line_runs_as_two_nodes_on_localhost(inputs, one_process, tmp_path):
    command = readme_multi_node_command()
    assert command.startswith("torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8"), command
    # As written, with the head node at 127.0.0.1 and one process per "node" on this CPU.
    command = command.replace("$MASTER_ADDR", "127.0.0.1").replace("--nproc-per-node 8", "--nproc-per-node 1")
    command = command.replace("29500", str(_free_port()))
    train = command.index(" train ")
    launcher = command[:train].split()
    args = _train_args(inputs, tmp_path / "out", "--batch-size", "2", "--grad-accum", "2")
    env = {**environment(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    nodes = [
        start([part.replace("$NODE_RANK", str(rank)) for part in launcher] + args, env=env) for rank in (0, 1)
    ]
    try:
        results = [node.communicate(timeout=RUN_TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            stop(node)
    for node, (_, stderr) in zip(nodes, results, strict=True):
        assert node.returncode == 0, stderr[-3000:]
    assert "across 2 processes" in results[0][1] and "across" not in results[1][1]  # only rank 0 logs
    _assert_same_run(tmp_path / "out", one_process)
