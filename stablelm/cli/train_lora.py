"""`stablelm train`'s LoRA flags: their arguments, and the adapter they put on the model (see
`stablelm.training.lora`)."""

from __future__ import annotations

import argparse

from .errors import UsageError
from .options import bounded

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj"  # stablelm.training.lora.DEFAULT_TARGETS, without torch


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--lora-r",
        type=bounded(int, low=1),
        metavar="R",
        help="train a LoRA adapter of this rank (with peft) instead of every weight; the adapter goes to "
        "--output-dir",
    )
    group.add_argument(
        "--lora-alpha",
        type=bounded(float, low=0.0, open_low=True),
        metavar="A",
        help="the adapter's scale is alpha / r (default: 2 r)",
    )
    group.add_argument(
        "--lora-dropout",
        type=bounded(float, low=0.0, high=0.99),
        default=0.0,
        metavar="P",
        help="dropout on the adapter's input (default: 0)",
    )
    group.add_argument(
        "--lora-target",
        default=DEFAULT_TARGETS,
        metavar="NAMES",
        help=f"comma-separated layers to adapt (default: {DEFAULT_TARGETS}; also gate_proj,up_proj,down_proj)",
    )
    group.add_argument(
        "--merge",
        action="store_true",
        help="also write the model with the adapter merged into its weights, to OUTPUT_DIR/merged",
    )


def check(args: argparse.Namespace) -> None:
    """Usage errors of the LoRA flags, before anything loads."""
    lora_only = {
        "--lora-alpha": args.lora_alpha is not None,
        "--lora-dropout": args.lora_dropout != 0.0,
        "--lora-target": args.lora_target != DEFAULT_TARGETS,
        "--merge": args.merge,
    }
    given = [flag for flag, set_ in lora_only.items() if set_]
    if args.lora_r is None and given:
        raise UsageError(f"{given[0]} is for a LoRA run: add --lora-r R (the adapter's rank)")
    if args.lora_r is not None and args.config is not None:
        raise UsageError(
            "--lora-r adapts a trained checkpoint: use it with --model, not --config (a new model trains whole)"
        )


def add_adapter(args: argparse.Namespace, model, vocab_size: int):  # noqa: ANN001, ANN201 - torch-free import
    """The model with a LoRA adapter on it (peft), or `model` as it is without --lora-r.

    `vocab_size` is the checkpoint's: new token rows (from --add-special-tokens) would live outside the
    adapter, so that the adapter alone could not carry them.
    """
    if args.lora_r is None:
        return model
    from ..training.lora import LoraSettings, add_lora

    if model.config.vocab_size != vocab_size:
        raise UsageError(
            "--add-special-tokens grew the vocabulary, and a LoRA adapter cannot carry new embedding rows: add "
            "the tokens in a full fine-tuning run first, or use tokens the vocabulary has"
        )
    targets = tuple(name.strip() for name in args.lora_target.split(",") if name.strip())
    settings = LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets)
    return add_lora(model, settings, base_model=args.model)
