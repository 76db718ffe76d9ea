"""The training loop: batches of packed blocks, AdamW steps, held-out loss, checkpoints, exact resume.

Nothing here prints: progress goes to an optional callback as `TrainingEvent`s (the CLI draws the bar).
Everything a step depends on (the weights, the optimiser state, the random generators and the position in
the data) is in the checkpoint, so resuming from step k gives the same run as never stopping.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..heads import StableLmForCausalLM
from ..tokenizer import Tokenizer
from . import distributed
from .arguments import TrainingArguments
from .checkpoints import (
    STATE_NAME,
    check_output_dir,
    list_checkpoints,
    read_checkpoint,
    read_trainer_state,
    save_checkpoint,
    set_rng_state,
)
from .data import BlockOrder, check_blocks
from .distributed import Distributed
from .lora import gather_adapter, is_peft_model, lora_settings, merged, model_state_names
from .losses import accumulate_gradients, held_out_loss
from .optim import build_optimizer, learning_rate_at
from .packing import LabelledBlocks


@dataclass(frozen=True)
class TrainingEvent:
    """What the loop reports to its callback.

    `kind` is "step" (after each optimiser step: `loss`, `learning_rate`, `grad_norm`, `tokens_per_second`),
    "eval" (`eval_loss`, `perplexity`), "save" (`path` of the checkpoint) or "resume" (`path` resumed from).
    """

    kind: Literal["step", "eval", "save", "resume"]
    step: int
    max_steps: int
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    eval_loss: float | None = None
    perplexity: float | None = None
    path: str | None = None


@dataclass
class TrainingState:
    """Where a run stands; saved in each checkpoint as trainer_state.json."""

    step: int = 0
    tokens_seen: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)  # the settings that fix the data order


class Trainer:
    """Trains a `StableLmForCausalLM` on packed blocks of token ids.

    Example:
        >>> trainer = Trainer(model, args=TrainingArguments(output_dir="out"), train_blocks=blocks)
        >>> trainer.train()
        >>> trainer.save_model("out")
    """

    def __init__(
        self,
        model: StableLmForCausalLM,
        *,
        args: TrainingArguments,
        train_blocks: torch.Tensor | LabelledBlocks,
        eval_blocks: torch.Tensor | LabelledBlocks | None = None,
        tokenizer: Tokenizer | None = None,
        callback: Callable[[TrainingEvent], None] | None = None,
        parallel: Distributed | None = None,
    ) -> None:
        """Set up a run.

        Args:
            model: The model to train, in float32 (the optimiser keeps no separate master weights).
            args: The run's settings.
            train_blocks: (N, T) token ids; each row is one training sequence (see `data.pack`). Or
                `packing.LabelledBlocks`: ids with their labels and per-document positions (chat data); the
                loss is then the mean over the step's labelled tokens, whichever micro-batch and rank hold them.
            eval_blocks: (M, T) held-out token ids (or `LabelledBlocks`) for the held-out loss, or None.
            tokenizer: Saved with each checkpoint and the final model, so that they load as they are.
            callback: Called with each `TrainingEvent`.
            parallel: This process's place in a data-parallel run (default: one process). Each rank passes
                the same blocks; the global batch is batch_size x gradient_accumulation_steps x world size,
                and rank r reads positions r, r + W, ... of each global batch of the one-process order.

        Raises:
            ValueError: The blocks do not fit the model (longer than max_position_embeddings, ids outside the
                vocabulary), or the model is not float32. Blocks are int64, or int32 (a memory-mapped token
                cache, read a batch at a time).
        """
        for name, blocks in (("train_blocks", train_blocks), ("eval_blocks", eval_blocks)):
            if blocks is not None:
                ids = blocks.input_ids if isinstance(blocks, LabelledBlocks) else blocks
                check_blocks(ids, name=name, config=model.config)
        if model.dtype != torch.float32:
            raise ValueError(
                f"Train a float32 model (this one is {model.dtype}); load it with dtype=torch.float32 and use "
                "precision='bf16' for bf16 compute."
            )
        self.model, self.args, self.tokenizer, self.callback = model, args, tokenizer, callback
        self.train_blocks, self.eval_blocks = train_blocks, eval_blocks
        self.output_dir = Path(args.output_dir)
        self.order = BlockOrder(train_blocks.shape[0], seed=args.seed)
        self.parallel = parallel or Distributed()
        # self.model stays the model as given (a peft model for LoRA): its peft_config, merging and saving need
        # it unwrapped; forward and backward go through self.module.
        self.model_class = type(
            model
        )  # for a sharded plain model's gathered copy (a LoRA run gathers its adapter)
        bf16 = resolve_precision(args.precision, model.device) == "bf16"
        # What forward and backward run through: the model, DDP around it, or the model sharded by FSDP2
        # (before the optimiser is built, so that it holds the shards).
        self.module = distributed.wrap(model, self.parallel, bf16=bf16)
        self.optimizer = build_optimizer(
            model, lr=args.learning_rate, weight_decay=args.weight_decay, betas=args.adam_betas
        )
        self.state = TrainingState(run=self._run_settings())

    # ---- the run ----------------------------------------------------------------------------------------
    def train(self, *, resume_from: str | os.PathLike | None = None) -> TrainingState:
        """Train up to `args.max_steps`, evaluating and saving checkpoints on the way.

        Args:
            resume_from: A `checkpoint-{step}` folder of an earlier run with the same data and settings.

        Returns:
            The final state: step, tokens seen, and the history of losses.

        Raises:
            ValueError: `args.output_dir` is a file or cannot be written to (checked before the first step).
        """
        check_output_dir(self.output_dir)
        if resume_from is not None:
            self.resume(resume_from)
        if self.args.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.train()
        while self.state.step < self.args.max_steps:
            self._train_step()
            step = self.state.step
            last = step == self.args.max_steps
            if self.eval_blocks is not None and (step % self.args.eval_interval == 0 or last):
                self.evaluate()
            if step % self.args.save_interval == 0 or last:
                self.save_checkpoint()
        return self.state

    def _train_step(self) -> None:
        args, step = self.args, self.state.step
        lr = learning_rate_at(
            step,
            lr=args.learning_rate,
            min_lr=args.learning_rate / 10 if args.min_learning_rate is None else args.min_learning_rate,
            warmup_steps=args.warmup_steps,
            max_steps=args.max_steps,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        loss = self._accumulate_gradients(step)
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = self._global_batch() * self.train_blocks.shape[1]
        seconds = time.perf_counter() - start
        self.state.step += 1
        self.state.tokens_seen += tokens
        self.state.log_history.append({"step": self.state.step, "loss": loss, "learning_rate": lr})
        self._emit(
            "step",
            loss=loss,
            learning_rate=lr,
            grad_norm=grad_norm,
            tokens_per_second=tokens / max(seconds, 1e-9),
        )

    def _global_batch(self) -> int:
        """Samples per optimiser step, over all ranks."""
        return self.args.gradient_accumulation_steps * self.args.batch_size * self.parallel.world_size

    def _accumulate_gradients(self, step: int) -> float:
        """Forward and backward over this rank's micro-batches of the step; the mean loss over all ranks."""
        shares = self.order.micro_batches(
            step,
            batch_size=self.args.batch_size,
            accumulation=self.args.gradient_accumulation_steps,
            rank=self.parallel.rank,
            world_size=self.parallel.world_size,
        )
        batches = [self.train_blocks[indices] for indices in shares]
        return accumulate_gradients(
            self.module, batches, parallel=self.parallel, device=self.model.device, autocast=self._autocast
        )

    def _clip_gradients(self) -> float:
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        limit = self.args.max_grad_norm if self.args.max_grad_norm is not None else math.inf
        return distributed.plain_norm(torch.nn.utils.clip_grad_norm_(parameters, limit)).item()

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """The mean held-out loss per predicted token, and its perplexity (also sent as an "eval" event)."""
        if self.eval_blocks is None:
            raise ValueError("No held-out data: pass eval_blocks to the Trainer.")
        was_training = self.model.training
        self.model.eval()
        limit = self.args.eval_batches * self.args.batch_size if self.args.eval_batches else None
        loss = held_out_loss(
            self.module,
            self.eval_blocks[:limit],
            batch_size=self.args.batch_size,
            parallel=self.parallel,
            device=self.model.device,
            autocast=self._autocast,
        )
        self.model.train(was_training)
        perplexity = math.exp(loss) if loss < 700 else math.inf
        self.state.log_history.append({"step": self.state.step, "eval_loss": loss, "perplexity": perplexity})
        self._emit("eval", eval_loss=loss, perplexity=perplexity)
        return loss, perplexity

    def _autocast(self) -> contextlib.AbstractContextManager:
        device = self.model.device
        if resolve_precision(self.args.precision, device) == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    # ---- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write `output_dir/checkpoint-{step}` (atomically) and drop checkpoints beyond the limit.

        In a data-parallel run every rank calls this (the shards are gathered) and rank 0 writes.
        """
        model = self._whole_model()
        optimizer_state = distributed.full_optimizer_state(self.model, self.optimizer)
        path = self.output_dir / f"checkpoint-{self.state.step}"
        if self.parallel.is_main:
            path = save_checkpoint(
                self.output_dir,
                model=model,
                tokenizer=self.tokenizer,
                optimizer_state=optimizer_state,
                state=asdict(self.state),
                keep=self.args.save_total_limit,
            )
        self._emit("save", path=str(path))
        return path

    def resume(self, checkpoint: str | os.PathLike) -> None:
        """Continue from a checkpoint: weights, optimiser, random generators and position in the data.

        Raises:
            ValueError: The checkpoint's run used other data or settings that fix the data order.
            stablelm.CheckpointError: The checkpoint is damaged, or of another model (nothing is changed).
        """
        folder = Path(checkpoint)
        if (folder / STATE_NAME).is_file():  # settings first: a foreign run is refused before any loading
            self._check_same_run(folder, read_trainer_state(folder))
        # Each rank reads the whole checkpoint (on the CPU when it is to be sharded) and keeps its part.
        device = "cpu" if distributed.is_sharded(self.model) else None
        saved = read_checkpoint(
            folder, model=self.model, optimizer=self.optimizer, model_class=self.model_class, device=device
        )
        adapter = is_peft_model(self.model)  # its checkpoint holds the adapter, named as peft saves it
        distributed.load_full_state(
            self.model,
            self.optimizer,
            weights=model_state_names(self.model, saved.weights) if adapter else saved.weights,
            optimizer_state=saved.optimizer_state,
            strict=not adapter,
        )
        set_rng_state(saved.rng)
        self.state = TrainingState(**saved.state)
        self._emit("resume", path=str(folder))

    def _check_same_run(self, folder: Path, state: dict[str, Any]) -> None:
        then = dict(state["run"])
        if "global_batch_size" not in then and "batch_size" in then:  # written before data-parallel runs
            then["global_batch_size"] = then["batch_size"] * then.get("gradient_accumulation_steps", 1)
        differ = {k: (v, then.get(k)) for k, v in self.state.run.items() if then.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: now {now!r}, then {then!r}" for k, (now, then) in differ.items())
            raise ValueError(
                f"Cannot resume from {folder}: it was trained with other data or settings ({detail}). Resume "
                "with the same data, --seed and --block-size, and the same global batch (--batch-size x "
                "--grad-accum x processes; any split of it), or start afresh."
            )

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint in `output_dir`, or None."""
        found = list_checkpoints(self.output_dir)
        return found[-1] if found else None

    def save_model(
        self, directory: str | os.PathLike, *, dtype: torch.dtype | None = None, merge: bool = False
    ) -> None:
        """Write the model (in `dtype`, default its own) and the tokenizer as a Hugging Face checkpoint.

        A LoRA run's model is written as its peft adapter folder, or with `merge` as the whole model with
        the adapter merged into its weights. In a data-parallel run every rank calls this (the shards are
        gathered) and rank 0 writes.

        Raises:
            ValueError: `merge` with a model that FSDP shards (merge the saved adapter into the base model
                instead: `lora.apply_adapter`).
        """
        adapter = is_peft_model(self.model)
        if merge and adapter and distributed.is_sharded(self.model):
            raise ValueError(
                "merge=True needs the whole weights on one process, and FSDP shards them: save the adapter, "
                "then merge it into the base model (stablelm.training.lora.apply_adapter)."
            )
        model = self._whole_model()
        if not self.parallel.is_main:
            return
        if merge and adapter:
            model = merged(self.model)
        if dtype not in (None, model.dtype):
            model = (copy.deepcopy(model) if model is self.model else model).to(dtype)
        model.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)

    def _whole_model(self) -> Any:
        """What rank 0 saves: the model itself (a peft model saves its adapter), or the whole model gathered
        from FSDP's shards (for a LoRA run, the adapter alone). Every rank calls this (it gathers)."""
        if is_peft_model(self.model) and distributed.is_sharded(self.model):
            return gather_adapter(self.model)
        return distributed.full_model(self.model, model_class=self.model_class)

    # ---- helpers ---------------------------------------------------------------------------------------
    def _run_settings(self) -> dict[str, Any]:
        blocks, labelled = self.train_blocks, {}
        if isinstance(blocks, LabelledBlocks):
            labelled = {
                "train_labels_sum": int(blocks.labels.sum()),
                "train_positions_sum": int(blocks.position_ids.sum()),
            }
            blocks = blocks.input_ids
        # The global batch, not its split into micro-batches, accumulation and ranks, fixes the data order.
        return {
            "seed": self.args.seed,
            "global_batch_size": self._global_batch(),
            "block_size": int(blocks.shape[1]),
            "train_blocks": int(blocks.shape[0]),
            "train_tokens_sum": int(blocks.sum()),
            **labelled,
            **({"lora": lora_settings(self.model)} if is_peft_model(self.model) else {}),
        }

    def _emit(self, kind: str, **values: Any) -> None:
        if self.callback is not None:
            self.callback(TrainingEvent(kind, self.state.step, self.args.max_steps, **values))


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "fp32" or "bf16": what `precision` ("auto", "fp32" or "bf16") means on `device` (auto: bf16 on a GPU
    that supports it)."""
    if precision == "auto":
        bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if bf16_gpu else "fp32"
    return precision
