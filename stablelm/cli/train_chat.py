"""`stablelm train` on chat data: conversations to labelled, packed blocks (see `stablelm.training.chat`)."""

from __future__ import annotations

import argparse
import sys

from ..tokenizer import Tokenizer
from ..training.chat import (
    LabelledBlocks,
    encode_conversations,
    is_chat_data,
    pack_conversations,
    read_conversations,
)
from ..training.data import split_blocks
from ..training.wording import plural
from .errors import UsageError


def chat_blocks(
    args: argparse.Namespace, tokenizer: Tokenizer, block_size: int, *, verbose: bool = True
) -> tuple[LabelledBlocks, LabelledBlocks | None]:
    """The training and held-out blocks of --data (and --eval-data, or --eval-fraction) holding chat data;
    `verbose` says what they hold on stderr (rank 0 of a data-parallel run)."""
    if tokenizer.chat_template is None:
        raise UsageError(
            "--data holds chat conversations, but the tokenizer has no chat template to render them with: "
            "use a tokenizer whose tokenizer_config.json has a chat_template (--tokenizer)"
        )
    loss_on = args.loss_on or "assistant"
    blocks, count, notes = _pack(args.data, tokenizer, block_size, loss_on=loss_on, flag="--data")
    if args.eval_data:
        if not is_chat_data(args.eval_data):
            raise UsageError("--data holds chat conversations, so --eval-data must too")
        eval_blocks = _pack(args.eval_data, tokenizer, block_size, loss_on=loss_on, flag="--eval-data")[0]
    elif args.eval_fraction > 0:
        blocks, eval_blocks = split_blocks(blocks, args.eval_fraction)
    else:
        eval_blocks = None
    held = f", {len(eval_blocks):,} held out" if eval_blocks is not None else ""
    if not verbose:
        return blocks, eval_blocks
    print(
        f"data: {plural(count, 'conversation')} (loss on {loss_on} tokens), {plural(len(blocks), 'training block')}"
        f" of {block_size} tokens{held}" + (f"; {notes}" if notes else ""),
        file=sys.stderr,
    )
    return blocks, eval_blocks


def _pack(
    paths: list[str], tokenizer: Tokenizer, block_size: int, *, loss_on: str, flag: str
) -> tuple[LabelledBlocks, int, str]:
    conversations = read_conversations(paths)
    documents = encode_conversations(tokenizer, conversations, loss_on=loss_on)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        blocks, report = pack_conversations(documents, block_size=block_size, pad_token_id=pad or 0)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from err
    return blocks, len(conversations), report.describe()
