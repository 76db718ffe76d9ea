"""Fine-tuning speed and memory on the 160M shape, full and LoRA: one process against two (DDP, FSDP2) on this CPU.

Each configuration is a fresh run of `stablelm.training.Trainer` (float32, AdamW, no evaluation, no saving)
on random token blocks of the 160M-shaped checkpoint (hidden 768, intermediate 2048, 12 layers, 12 heads,
vocab 50304; written by `benchmarks/load.py`'s shape code if --model is not given). One process runs with
all --threads; two processes (gloo, under torch.distributed.run) with half each, so the cores are the same.
The global batch is the same everywhere (--batch x --block tokens a step): one process takes it whole, each of
two ranks half. Reported per configuration: tokens/s over the timed steps (after --warmup steps), and each
rank's memory: the bytes of weights and AdamW moments it holds (all of them under DDP, a half under FSDP with
two ranks), its resident memory after the last step and its peak (VmHWM; every rank first loads the whole
checkpoint, and freed memory stays with the allocator). The LoRA rows train a rank --lora-r adapter (peft) on
q_proj, k_proj, v_proj and o_proj, the base weights frozen, under the same settings.

Run: python benchmarks/train.py [--model /work/ckpt/160m] [--steps 4] [--warmup 1] [--batch 4] [--block 128]
     [--lora-r 16] [--no-lora]
The figures are ratios within one run; on a shared machine the absolute tokens/s drift run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _status(field: str) -> int:
    """A memory figure of /proc/self/status (VmHWM: peak resident, VmRSS: resident now), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def _held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's weights and AdamW moments (its shards under FSDP); gradients, as large as the
    weights, exist from each backward to the step."""

    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    held = sum(local(p).nbytes for p in model.parameters())  # a LoRA run: the frozen base weights too
    return held + sum(
        local(v).nbytes for state in optimizer.state.values() for v in state.values() if v.dim() > 0
    )


def child(args: argparse.Namespace) -> None:
    """One rank (or the only process): train, time the steps, write {"tokens_per_s", "peak_rss"} to --report."""
    from stablelm import StableLmForCausalLM
    from stablelm.training import Trainer, TrainingArguments, distributed

    parallel = distributed.from_environment(strategy=args.strategy)
    torch.set_num_threads(args.threads)
    model = StableLmForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.lora_r:
        from stablelm.training.lora import LoraSettings, add_lora

        model = add_lora(model, LoraSettings(r=args.lora_r))
    distributed.init_process_group(parallel, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, model.config.vocab_size, (256, args.block), generator=generator)
    times: list[float] = []

    def on_step(event):  # noqa: ANN001 - a TrainingEvent
        if event.kind == "step":
            times.append(time.perf_counter())

    training = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="stablelm-bench-"),
        max_steps=args.warmup + args.steps,
        batch_size=args.batch // parallel.world_size,
        warmup_steps=1,
        save_interval=10**6,
        precision="fp32",
    )
    trainer = Trainer(model, args=training, train_blocks=blocks, callback=on_step, parallel=parallel)
    start = time.perf_counter()
    for _ in range(training.max_steps):
        trainer._train_step()  # the loop's step, without its final checkpoint
    timed = times[-1] - (times[args.warmup - 1] if args.warmup else start)
    report = {
        "tokens_per_s": args.steps * args.batch * args.block / timed,
        "peak_rss": _status("VmHWM"),
        "rss": _status("VmRSS"),
        "held": _held_bytes(model, trainer.optimizer),
    }
    Path(f"{args.report}.{parallel.rank}").write_text(json.dumps(report))
    del trainer
    distributed.destroy_process_group()


def launch(
    args: argparse.Namespace, *, processes: int, strategy: str, lora: bool, report: Path
) -> list[dict]:
    own = [
        str(Path(__file__).resolve()),
        "--child",
        *(["--lora-r", str(args.lora_r)] if lora else []),
        "--model",
        str(args.model),
        "--strategy",
        strategy,
        "--threads",
        str(max(1, args.threads // processes)),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(args.batch),
        "--block",
        str(args.block),
        "--report",
        str(report),
    ]
    if processes == 1:
        command = [sys.executable, *own]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(processes),
        ]
        command += own
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, args.threads // processes))}
    env["TMPDIR"] = str(report.parent)  # the runs' output folders and torchrun's go with the reports
    subprocess.run(command, env=env, check=True)
    return [json.loads(Path(f"{report}.{rank}").read_text()) for rank in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="/work/ckpt/160m", help="a 160M-shaped checkpoint folder")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4, help="blocks per step, over all processes")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--lora-r", type=int, help="the LoRA rows' adapter rank (default 16)")
    parser.add_argument("--no-lora", action="store_true", help="full fine-tuning rows only")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    args.lora_r = None if args.no_lora else args.lora_r or 16
    if args.batch % 2:
        parser.error("--batch must be even (two ranks split it)")
    configurations = [
        ("1 process", 1, "ddp", False),
        ("2 x DDP", 2, "ddp", False),
        ("2 x FSDP", 2, "fsdp", False),
    ]
    if args.lora_r:
        configurations += [("LoRA 1 proc", 1, "ddp", True), ("LoRA 2 x DDP", 2, "ddp", True)]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, processes, strategy, lora in configurations:
            report = Path(folder) / f"{strategy}{processes}{'-lora' if lora else ''}"
            results[name] = launch(args, processes=processes, strategy=strategy, lora=lora, report=report)
    print(
        f"160M fine-tuning, float32, {args.batch} x {args.block} tokens a step, {args.threads} threads in all"
        + (f"; LoRA rank {args.lora_r} on q/k/v/o_proj" if args.lora_r else "")
    )
    print("per rank, GiB: weights + AdamW moments held; resident after the last step; peak resident")
    print(f"{'':12} {'tokens/s':>9} {'x 1 proc':>9} {'held':>12} {'resident':>12} {'peak':>12}")
    for name, reports in results.items():
        base = results["LoRA 1 proc" if name.startswith("LoRA") else "1 process"][0]["tokens_per_s"]
        rate = reports[0]["tokens_per_s"]
        memory = [", ".join(f"{r[key] / 2**30:.2f}" for r in reports) for key in ("held", "rss", "peak_rss")]
        print(f"{name:12} {rate:9.0f} {rate / base:9.2f} {memory[0]:>12} {memory[1]:>12} {memory[2]:>12}")
    if args.lora_r:
        for full, lora in (("1 process", "LoRA 1 proc"), ("2 x DDP", "LoRA 2 x DDP")):
            ratio = results[lora][0]["tokens_per_s"] / results[full][0]["tokens_per_s"]
            print(f"LoRA / full fine-tuning, {full}: {ratio:.2f}x tokens/s")


if __name__ == "__main__":
    main()
