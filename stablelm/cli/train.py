"""Train a new model from a config.json, or fine-tune a checkpoint, on text files or JSON lines.

The data (--data: .txt/.md/.rst files, .jsonl files with a "text" field per line, .parquet files with a
"text" column, or folders of them) is tokenized in --data-workers processes, each document followed by the
end-of-text token, cached in --data-cache by content hash, and packed into blocks of --block-size tokens.
Chat data (.jsonl files with a "messages" list per line, or .parquet files with a "messages" column) is
rendered with the tokenizer's chat template in the same worker processes and cache, the loss taken on the
assistant's tokens (--loss-on), and conversations packed whole, kept apart.
Under torchrun (torchrun --nproc-per-node N -m stablelm train ...) the processes train data-parallel.
The held-out loss is measured on --eval-data, or on --eval-fraction of the blocks. Checkpoints go to
OUTPUT_DIR/checkpoint-STEP (each a complete Hugging Face checkpoint, plus the optimiser state), the final
model and tokenizer to OUTPUT_DIR. After an interruption, run the same command with --resume: the run
continues from the last checkpoint exactly as if it had not stopped.

examples:
  stablelm train-tokenizer --data docs/ --vocab-size 4096 --output-dir tok
  stablelm train --config config.json --tokenizer tok --data docs/ --output-dir out --max-steps 2000
  stablelm train --model ./out --data chat.jsonl --add-special-tokens "<|user|>" "<|assistant|>" \\
      --output-dir chat --lr 1e-4 --warmup-steps 20 --max-steps 200
  stablelm train --model ./out --data chat.jsonl --lora-r 16 --output-dir adapter --max-steps 200
"""

from __future__ import annotations

import argparse

from . import train_lora
from .options import DEVICES, bounded, seed_type

DEFAULT_BLOCK_SIZE_CAP = 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser.add_argument_group("model"))
    train_lora.add_arguments(parser.add_argument_group("LoRA (needs peft: pip install 'stablelm[lora]')"))
    _add_data_arguments(parser.add_argument_group("data"))
    _add_optimiser_arguments(parser.add_argument_group("optimisation"))
    _add_output_arguments(parser.add_argument_group("evaluation, checkpoints and output"))
    _add_distributed_arguments(parser.add_argument_group("several processes (under torchrun)"))


def _add_model_arguments(group: argparse._ArgumentGroup) -> None:
    start = group.add_mutually_exclusive_group(required=True)
    start.add_argument("--config", metavar="CONFIG_JSON", help="train a new model with this config.json")
    start.add_argument(
        "-m", "--model", metavar="NAME_OR_PATH", help="fine-tune this checkpoint (folder or hub id)"
    )
    group.add_argument(
        "--tokenizer",
        metavar="NAME_OR_PATH",
        help="the tokenizer folder (needed with --config; default with --model: the checkpoint's)",
    )
    group.add_argument(
        "--add-special-tokens",
        nargs="+",
        default=[],
        metavar="TOKEN",
        help="add these special tokens (chat roles, say), growing the embeddings to fit",
    )
    group.add_argument("--device", choices=DEVICES, default="auto", help="where to train (default: auto)")


def _add_data_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help="training data: text, JSON-lines or Parquet files, or folders of them",
    )
    group.add_argument("--eval-data", nargs="+", metavar="PATH", help="held-out text files or folders")
    group.add_argument(
        "--eval-fraction",
        type=bounded(float, low=0.0, high=0.5),
        default=0.05,
        metavar="F",
        help="without --eval-data, hold out this fraction of the blocks (default: 0.05; 0 for none)",
    )
    group.add_argument(
        "--data-workers",
        type=bounded(int, low=1),
        metavar="N",
        help="processes that tokenize the data (default: one per usable core)",
    )
    group.add_argument(
        "--data-cache",
        metavar="DIR",
        help="where tokenized data is kept, by content hash, so that a rerun does not tokenize again "
        "(default: $STABLELM_DATA_CACHE, else ~/.cache/stablelm/tokens)",
    )
    group.add_argument(
        "--block-size",
        type=bounded(int, low=2),
        metavar="N",
        help=f"tokens per training sequence (default: the model's context, at most {DEFAULT_BLOCK_SIZE_CAP})",
    )
    group.add_argument(
        "--loss-on",
        choices=("assistant", "all"),
        help="chat data: take the loss on the assistant's tokens only, or on all tokens (default: assistant)",
    )


def _add_optimiser_arguments(group: argparse._ArgumentGroup) -> None:
    positive_int, fraction = bounded(int, low=1), bounded(float, low=0.0)
    group.add_argument(
        "--max-steps", type=positive_int, default=1000, metavar="N", help="optimiser steps (1000)"
    )
    group.add_argument(
        "--batch-size", type=positive_int, default=8, metavar="N", help="blocks per micro-batch (8)"
    )
    group.add_argument(
        "--grad-accum", type=positive_int, default=1, metavar="N", help="micro-batches per optimiser step (1)"
    )
    group.add_argument(
        "--lr", type=bounded(float, low=0.0, open_low=True), default=3e-4, help="peak learning rate"
    )
    group.add_argument(
        "--min-lr", type=fraction, metavar="LR", help="end of the cosine decay (default: lr / 10)"
    )
    group.add_argument("--warmup-steps", type=bounded(int, low=0), default=100, metavar="N", help="(100)")
    group.add_argument(
        "--weight-decay", type=fraction, default=0.1, metavar="W", help="of weight matrices (0.1)"
    )
    group.add_argument(
        "--max-grad-norm",
        type=fraction,
        default=1.0,
        metavar="X",
        help="clip gradients to this norm; 0: off (1.0)",
    )
    group.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="bf16 autocast or fp32 (default: auto, bf16 on a GPU that supports it)",
    )
    group.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations to save memory"
    )
    group.add_argument(
        "--seed", type=seed_type, default=0, help="seed of the initial weights and data order (0)"
    )


def _add_output_arguments(group: argparse._ArgumentGroup) -> None:
    positive_int = bounded(int, low=1)
    group.add_argument("--output-dir", required=True, metavar="DIR", help="checkpoints and the final model")
    group.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --output-dir"
    )
    group.add_argument("--eval-interval", type=positive_int, default=100, metavar="N", help="steps (100)")
    group.add_argument("--eval-batches", type=positive_int, metavar="N", help="batches per evaluation (all)")
    group.add_argument("--save-interval", type=positive_int, default=500, metavar="N", help="steps (500)")
    group.add_argument(
        "--save-total-limit",
        type=bounded(int, low=0),
        default=2,
        metavar="N",
        help="checkpoints kept; 0: all (2)",
    )
    group.add_argument(
        "--log-interval", type=positive_int, default=10, metavar="N", help="steps per log line (10)"
    )
    group.add_argument(
        "--save-dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of the final model's weights (checkpoints stay float32)",
    )


def _add_distributed_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--strategy",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="ddp: each process holds the whole model; fsdp: parameters, gradients and optimiser state are "
        "sharded over the processes (default: ddp)",
    )
    group.add_argument(
        "--dist-timeout",
        type=bounded(float, low=0.0, open_low=True),
        default=1800.0,
        metavar="SECONDS",
        help="how long a process waits for the others in a collective before the run fails (1800)",
    )


def run(args: argparse.Namespace) -> int:
    from .train_run import run as train

    return train(args)
