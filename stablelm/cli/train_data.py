"""`stablelm train`'s data: text or chat files to training and held-out blocks, through the token cache.

Both kinds go the same way (see `stablelm.training.corpus`): streamed in pieces, tokenized in worker
processes with a progress bar, cached by content hash; chat conversations are then packed into a cached,
memory-mapped file (`stablelm.training.packing`). Under torchrun the first process of each machine does
the work and the others wait for its files: they read the same blocks, and a data error is met (and
printed) by that one process.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..tokenizer import Tokenizer
from ..training import pack
from ..training.chat import ChatEncoder, is_chat_data
from ..training.corpus import Encoder, TokenStream, default_cache_dir, split_on_disk, tokenize_files
from ..training.distributed import Distributed
from ..training.packing import LabelledBlocks, pack_on_disk
from ..training.wording import plural
from .errors import UsageError

Blocks = torch.Tensor | LabelledBlocks


def training_blocks(
    args: argparse.Namespace, tokenizer: Tokenizer, block_size: int, parallel: Distributed
) -> tuple[Blocks, Blocks | None]:
    """The training and held-out blocks of --data (and --eval-data, or --eval-fraction); rank 0 says what
    they hold on stderr."""
    chat = is_chat_data(args.data)
    if not chat and args.loss_on is not None:
        raise UsageError('--loss-on is for chat data (.jsonl lines with "messages"); --data holds plain text')
    if chat and tokenizer.chat_template is None:
        raise UsageError(
            "--data holds chat conversations, but the tokenizer has no chat template to render them with: "
            "use a tokenizer whose tokenizer_config.json has a chat_template (--tokenizer)"
        )
    if chat and args.eval_data and not is_chat_data(args.eval_data):
        raise UsageError("--data holds chat conversations, so --eval-data must too")
    loss_on = args.loss_on or "assistant"
    encoder = ChatEncoder(tokenizer, loss_on=loss_on) if chat else None
    train = _stream(args, args.data, tokenizer, parallel, encoder)
    blocks, notes, source = _rows(train, tokenizer, block_size, parallel, flag="--data")
    if args.eval_data:
        stream = _stream(args, args.eval_data, tokenizer, parallel, encoder)
        eval_blocks = _rows(stream, tokenizer, block_size, parallel, flag="--eval-data")[0]
    elif args.eval_fraction > 0:
        # The held-out rows are copied out, the training ones memory-mapped from a file written once.
        blocks, eval_blocks = split_on_disk(
            blocks, args.eval_fraction, source=source, build=parallel.local_rank == 0
        )
    else:
        eval_blocks = None
    if chat:  # each row holds a block's ids, labels and positions
        blocks = LabelledBlocks.from_rows(blocks)
        eval_blocks = LabelledBlocks.from_rows(eval_blocks) if eval_blocks is not None else None
    if parallel.is_main:
        held = f", {len(eval_blocks):,} held out" if eval_blocks is not None else ""
        what = (
            f"{plural(train.documents, 'conversation')} (loss on {loss_on} tokens)"
            if chat
            else plural(train.documents, "document")
        )
        print(
            f"data: {what}, {plural(len(blocks), 'training block')} of {block_size} tokens{held}"
            + (f"; {notes}" if notes else ""),
            file=sys.stderr,
        )
    return blocks, eval_blocks


def _rows(
    stream: TokenStream, tokenizer: Tokenizer, block_size: int, parallel: Distributed, *, flag: str
) -> tuple[torch.Tensor, str, Path]:
    """The blocks of a token stream as rows (text: the ids; chat: ids, labels and positions, packed into a
    file beside the cache), what packing left out, and the file they are read from."""
    try:
        if "lengths" not in stream.streams:
            return pack(stream.tokens, block_size), "", stream.path
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        path = stream.path.with_name(f"{stream.key}.packed-{block_size}-{pad or 0}.int32")
        rows, report = pack_on_disk(
            stream.streams,
            path=path,
            block_size=block_size,
            pad_token_id=pad or 0,
            build=parallel.local_rank == 0,
        )
        return rows, report.describe(), path
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from err


def _stream(
    args: argparse.Namespace,
    paths: list[str],
    tokenizer: Tokenizer,
    parallel: Distributed,
    encoder: Encoder | None,
) -> TokenStream:
    """The data's tokens, from the cache or tokenized into it by the first process of each machine (the
    others wait for its file)."""
    cache_dir = Path(args.data_cache) if args.data_cache else default_cache_dir()
    workers = args.data_workers or len(os.sched_getaffinity(0))
    bar = _TokenizingBar() if parallel.local_rank == 0 and sys.stderr.isatty() else None
    try:
        stream = tokenize_files(
            paths,
            tokenizer,
            encoder=encoder,
            cache_dir=cache_dir,
            workers=workers,
            progress=bar,
            build=parallel.local_rank == 0,
        )
    finally:
        if bar is not None:
            bar.close()
    if parallel.is_main:
        how = "read from the cache" if stream.cached else "tokenized"
        print(f"tokens: {plural(stream.tokens.numel(), 'token')} {how} ({stream.path})", file=sys.stderr)
    return stream


class _TokenizingBar:
    """A tqdm bar of the bytes tokenized (tqdm comes with huggingface_hub; without it, no bar)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
