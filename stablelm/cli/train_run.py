"""`stablelm train`'s work (the command's arguments are in `train`, which imports this module only to
run, so that `stablelm train --help` does not load torch)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from ..checkpoint.options import resolve_device, resolve_dtype
from ..config import StableLmConfig
from ..heads import StableLmForCausalLM
from ..seeding import set_seed
from ..tokenizer import AutoTokenizer, Tokenizer
from ..training import (
    Trainer,
    TrainingArguments,
    TrainingEvent,
    check_block_size,
    distributed,
)
from ..training.arguments import MAX_SEED
from ..training.checkpoints import check_output_dir, list_checkpoints, read_trainer_state
from ..training.distributed import Distributed
from ..training.lora import apply_adapter
from ..training.memory import (
    InsufficientMemoryError,
    MemoryEstimate,
    check_training_memory,
    estimate_training_memory,
)
from ..training.sources import add_special_tokens, check_vocabulary, load_model, read_model_config
from ..training.trainer import resolve_precision
from ..training.wording import plural
from . import train_lora
from .errors import UsageError
from .train import DEFAULT_BLOCK_SIZE_CAP
from .train_data import training_blocks

# How long a process other than the first of its machine keeps an error of the set-up to itself: the first
# process meets the same error on the same files, prints it and exits, and torchrun then ends this one.
QUIET_GRACE_S = 60.0


def run(args: argparse.Namespace) -> int:
    # Under torchrun: this process's rank; only rank 0 speaks.
    parallel = distributed.from_environment(strategy=args.strategy)
    if not parallel.is_main:
        warnings.simplefilter("ignore")
    with _said_once(parallel):
        _check_flags(args)
        train_lora.check(args)
        output_dir = Path(args.output_dir)
        # Before any work: a folder that cannot be written would fail the first save, steps later.
        check_output_dir(output_dir, name="--output-dir")
        resume_from = _resume_point(output_dir, resume=args.resume, parallel=parallel)
        training_args = _training_arguments(args)  # checks the values before any loading
        set_seed(args.seed)  # the same on every rank: the same initial weights
        device = distributed.process_device(parallel, resolve_device(args.device))
        model, tokenizer, block_size = _model_and_tokenizer(args, device, parallel)
        train_blocks, eval_blocks = training_blocks(args, tokenizer, block_size, parallel)
    # Joined only now: reading and tokenizing the data may take longer than a collective's timeout.
    distributed.init_process_group(parallel, device=device, timeout_s=args.dist_timeout)
    log = _Log(args.log_interval) if parallel.is_main else None
    trainer = Trainer(
        model,
        args=training_args,
        train_blocks=train_blocks,
        eval_blocks=eval_blocks,
        tokenizer=tokenizer,
        callback=log,
        parallel=parallel,
    )
    try:
        state = trainer.train(resume_from=resume_from)
    finally:
        if log is not None:
            log.close()
    trainer.save_model(output_dir, dtype=resolve_dtype(args.save_dtype))
    if args.merge:
        _save_merged(args, trainer, output_dir, parallel)
    # DDP's reducer and FSDP's sharded modules (their device mesh) are released before the process group
    # they use: released after it, at the interpreter's exit, a rank could wait forever or abort in gloo's
    # teardown ("terminate called without an active exception", seen once under FSDP in bf16).
    del trainer, model
    gc.collect()
    distributed.destroy_process_group()
    if parallel.is_main:
        across = f" across {plural(parallel.world_size, 'process', 'processes')}" if parallel.active else ""
        print(
            f"trained {plural(state.step, 'step')} on {plural(state.tokens_seen, 'token')}{across}; model saved "
            f"in {output_dir}",
            file=sys.stderr,
        )
    return 0


@contextlib.contextmanager
def _said_once(parallel: Distributed) -> Iterator[None]:
    """Errors of the set-up (flags, files, model, data), said by one process of each machine.

    Before the ranks join, every process of a machine does the same work on the same files (or waits for the
    first one's token cache), so an error there is the same on each: the first process (local rank 0) prints
    it and exits with status 1, and torchrun ends the others, which keep quiet meanwhile. One that is still
    running after QUIET_GRACE_S (its error was its own: no GPU for its local rank, say) prints it then.
    """
    try:
        yield
    except Exception:
        if parallel.active and parallel.local_rank != 0:
            time.sleep(QUIET_GRACE_S)
        raise


def _save_merged(args: argparse.Namespace, trainer: Trainer, output_dir: Path, parallel: Distributed) -> None:
    """--merge: the model with the adapter merged into its weights, to OUTPUT_DIR/merged."""
    directory, dtype = output_dir / "merged", resolve_dtype(args.save_dtype)
    if not distributed.is_sharded(trainer.model):
        trainer.save_model(directory, dtype=dtype, merge=True)
        return
    # FSDP holds a shard of the base weights on each rank: rank 0 merges the adapter it just saved into the
    # base model read again from -m (the same weights: a LoRA run leaves them as they are).
    if parallel.is_main:
        model = apply_adapter(load_model(args.model, device=torch.device("cpu")), output_dir, merge=True)
        model = model if dtype in (None, model.dtype) else model.to(dtype)
        model.save_pretrained(directory)
        trainer.tokenizer.save_pretrained(directory)


def _check_flags(args: argparse.Namespace) -> None:
    """Usage errors for the values argparse's range checks let through: NaN and infinities, seeds too large."""
    numbers = {
        "--lr": args.lr,
        "--min-lr": args.min_lr,
        "--weight-decay": args.weight_decay,
        "--eval-fraction": args.eval_fraction,
    }
    for flag, value in numbers.items():
        if value is not None and not math.isfinite(value):
            raise UsageError(f"argument {flag}: expected a finite number, got {value}")
    if math.isnan(args.max_grad_norm):
        raise UsageError("argument --max-grad-norm: expected a number >= 0 (0 or inf: no clipping), got nan")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"argument --seed: expected an integer in [0, {MAX_SEED}], got {args.seed}")


def _resume_point(output_dir: Path, *, resume: bool, parallel: Distributed) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    if checkpoints and not resume:
        raise UsageError(
            f"{output_dir} holds checkpoints of an earlier run ({checkpoints[-1].name}); pass --resume to "
            "continue it, or choose another --output-dir"
        )
    if resume and not checkpoints and parallel.is_main:
        print(f"no checkpoint in {output_dir} yet: starting from step 0", file=sys.stderr)
    if checkpoints:
        read_trainer_state(checkpoints[-1])  # a damaged one fails now, not after the data is tokenized
    return checkpoints[-1] if checkpoints else None


def _training_arguments(args: argparse.Namespace) -> TrainingArguments:
    return TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        min_learning_rate=args.min_lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None,
        eval_interval=args.eval_interval,
        eval_batches=args.eval_batches,
        save_interval=args.save_interval,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
    )


def _model_and_tokenizer(
    args: argparse.Namespace, device: torch.device, parallel: Distributed
) -> tuple[StableLmForCausalLM, Tokenizer, int]:
    """The model, its tokenizer and the block size; the memory the run needs is checked before the
    optimiser's (and, for a new model, the weights') memory is taken."""
    if args.config is not None:
        if args.tokenizer is None:
            raise UsageError(
                "--config trains a new model and needs --tokenizer (see 'stablelm train-tokenizer')"
            )
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        config = read_model_config(args.config, tokenizer=tokenizer)
        block_size = _block_size(args, config)
        try:
            _check_memory(args, config, block_size, device, parallel, weights_loaded=False)
        except InsufficientMemoryError as err:
            raise InsufficientMemoryError(f"--config {args.config}: {err}") from None
        model = StableLmForCausalLM(config).to(device)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        model = load_model(args.model, device=device)
        block_size = _block_size(args, model.config)
    vocab_size = model.config.vocab_size
    if args.add_special_tokens:
        add_special_tokens(tokenizer, model, args.add_special_tokens)
    check_vocabulary(tokenizer, model)
    model = train_lora.add_adapter(args, model, vocab_size)  # its parameters are few: added before the check
    if args.config is None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _check_memory(
            args, model.config, block_size, device, parallel, weights_loaded=True, trainable=trainable
        )
    return model, tokenizer, block_size


def _block_size(args: argparse.Namespace, config: StableLmConfig) -> int:
    block_size = args.block_size or min(config.max_position_embeddings, DEFAULT_BLOCK_SIZE_CAP)
    check_block_size(block_size, max_position_embeddings=config.max_position_embeddings)
    return block_size


def _check_memory(
    args: argparse.Namespace,
    config: StableLmConfig,
    block_size: int,
    device: torch.device,
    parallel: Distributed,
    *,
    weights_loaded: bool,
    trainable: int | None = None,
) -> None:
    bf16 = resolve_precision(args.precision, device) == "bf16"
    estimate = estimate_training_memory(
        config,
        batch_size=args.batch_size,
        block_size=block_size,
        gradient_checkpointing=args.gradient_checkpointing,
        activation_bytes=2 if bf16 else 4,
        trainable_parameters=trainable,
    )
    if parallel.active and parallel.strategy == "fsdp":  # each rank keeps 1/W of the gradients and moments
        shards = parallel.world_size
        estimate = dataclasses.replace(
            estimate, gradients=estimate.gradients // shards, optimizer=estimate.optimizer // shards
        )
    if device.type == "cpu":  # the ranks on this machine share its memory
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        estimate = MemoryEstimate(**{k: v * local for k, v in dataclasses.asdict(estimate).items()})
    check_training_memory(estimate, device=device, weights_loaded=weights_loaded)


class _Log:
    """Shows training progress on stderr: a tqdm bar on a terminal, else a line every `interval` steps."""

    def __init__(self, interval: int) -> None:
        self.interval, self.bar = interval, None
        self.losses: list[float] = []
        self.seconds_per_token: list[float] = []

    def __call__(self, event: TrainingEvent) -> None:
        if event.kind == "step":
            self._step(event)
        elif event.kind == "eval":
            self._write(
                f"step {event.step}: held-out loss {event.eval_loss:.4f}, perplexity {event.perplexity:.2f}"
            )
        else:
            self._write(f"{'saved' if event.kind == 'save' else 'resumed from'} {event.path}")

    def _step(self, event: TrainingEvent) -> None:
        self.losses.append(event.loss)
        self.seconds_per_token.append(1.0 / event.tokens_per_second)
        if len(self.losses) < self.interval and event.step < event.max_steps:
            return
        # Steps are of equal size, so the harmonic mean of their rates is the rate over the interval.
        loss = sum(self.losses) / len(self.losses)
        rate = len(self.seconds_per_token) / sum(self.seconds_per_token)
        self.losses, self.seconds_per_token = [], []
        text = f"loss {loss:.4f}, lr {event.learning_rate:.2e}, {rate:,.0f} tokens/s"
        bar = self._bar(event)
        if bar is None:
            print(f"step {event.step}/{event.max_steps}: {text}", file=sys.stderr, flush=True)
        else:
            bar.update(event.step - bar.n)
            bar.set_postfix_str(text)

    def _bar(self, event: TrainingEvent):  # noqa: ANN202 - a tqdm bar, or None
        if self.bar is None and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is optional (huggingface_hub brings it)
                return None
            self.bar = tqdm(total=event.max_steps, initial=event.step, unit="step", file=sys.stderr)
        return self.bar

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
