"""Packing labelled documents (chat conversations) whole into blocks: best-fit decreasing, in memory or on disk.

Each document is (ids, labels). Documents are packed whole into blocks of `block_size` tokens, best-fit
decreasing (as TRL's padding-free packing does), a document longer than a block is cut to the block, and each
block's tail is padding with no labels. Position ids restart at 0 for each document: the model then keeps the
documents of a block apart (a block-diagonal causal mask, see `stablelm.attention.packed_mask`), as the
reference does. Blocks with no labelled token to predict are left out.

`pack_conversations` packs documents held in memory; `pack_on_disk` packs the documents of a token cache
(`corpus.tokenize_files` with `chat.ChatEncoder`) into a file beside it, memory-mapped: only one length per
document (and its block) is held in memory, never the tokens. Both go through the same packer.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path, write_text_atomic
from .corpus import map_int32, wait_for
from .wording import plural

IGNORE_INDEX = -100
_ROWS_AT_ONCE = 1024  # blocks written to disk at a time


@dataclass
class LabelledBlocks:
    """Packed blocks with their labels and per-document positions, indexed like a (N, T) tensor of ids.

    Attributes:
        input_ids: (N, T) token ids.
        labels: (N, T) the ids where the loss is taken, -100 elsewhere (predicted from the position before).
        position_ids: (N, T) positions, restarting at 0 for each packed document.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: Any) -> LabelledBlocks:
        return LabelledBlocks(self.input_ids[index], self.labels[index], self.position_ids[index])

    def predicted(self) -> torch.Tensor:
        """(N,) the number of tokens each block is trained to predict (its labels other than -100 past the
        first position, which nothing predicts)."""
        return (self.labels[:, 1:] != IGNORE_INDEX).sum(dim=1)

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> LabelledBlocks:
        """Views of (N, 3 x T) rows, each holding a block's ids, labels and positions one after the other (the
        layout of a packed file): nothing is copied."""
        rows = rows.view(rows.shape[0], 3, -1)
        return cls(rows[:, 0], rows[:, 1], rows[:, 2])


@dataclass(frozen=True)
class PackingReport:
    """What packing did: blocks made, conversations cut to the block size, blocks left out (nothing to learn)."""

    blocks: int
    truncated: int
    dropped: int

    def describe(self) -> str:
        notes = []
        if self.truncated:
            notes.append(f"{plural(self.truncated, 'conversation')} cut to the block size")
        if self.dropped:
            notes.append(f"{plural(self.dropped, 'block')} without labelled tokens left out")
        return "; ".join(notes)


def pack_conversations(
    documents: Sequence[tuple[list[int], list[int]]], *, block_size: int, pad_token_id: int
) -> tuple[LabelledBlocks, PackingReport]:
    """Pack (ids, labels) documents whole into blocks of `block_size`, best-fit decreasing.

    Documents longer than a block are cut to it. Each block's unused tail is `pad_token_id` with no labels;
    its positions restart at 0 too, so that it is a document of its own. Blocks with no labelled token to
    predict are left out (they would teach nothing).

    Raises:
        ValueError: No block has a token to learn.
    """
    lengths = [len(ids) for ids, _ in documents]
    counts: dict[str, int] = {}
    rows = list(
        _packed(lengths, documents.__getitem__, block_size=block_size, pad=pad_token_id, counts=counts)
    )
    report = PackingReport(**counts)
    _check_report(report)
    return LabelledBlocks.from_rows(torch.cat(rows).long()), report  # int64 in memory, as token ids are


def pack_on_disk(
    streams: dict[str, torch.Tensor], *, path: Path, block_size: int, pad_token_id: int, build: bool = True
) -> tuple[torch.Tensor, PackingReport]:
    """`pack_conversations` of the documents of a chat token cache (its "ids", "labels" and "lengths"
    streams), written once to `path` (int32, each block's ids, labels and positions) and memory-mapped.

    Args:
        build: False waits for another process (rank 0 of a machine) to write the file instead.

    Returns:
        The (N, 3 x block_size) int32 rows, memory-mapped (`LabelledBlocks.from_rows` views them as blocks),
        and what packing did.

    Raises:
        ValueError: No block has a token to learn.
    """
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file() and build:
        lengths = streams["lengths"].tolist()  # one number per document: what best-fit packing needs
        starts = [0] * len(lengths)
        for i in range(1, len(lengths)):
            starts[i] = starts[i - 1] + lengths[i - 1]
        ids, labels = streams["ids"], streams["labels"]

        def document(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            span = slice(starts[i], starts[i] + lengths[i])
            return ids[span], labels[span]

        counts: dict[str, int] = {}
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            for chunk in _packed(lengths, document, block_size=block_size, pad=pad_token_id, counts=counts):
                f.write(chunk.numpy().tobytes())
        write_text_atomic(meta_path, json.dumps(counts) + "\n")
    elif not meta_path.is_file():
        wait_for(meta_path)
    report = PackingReport(**json.loads(meta_path.read_text(encoding="utf-8")))
    _check_report(report)
    return map_int32(path, report.blocks * 3 * block_size).view(report.blocks, 3 * block_size), report


def _packed(
    lengths: list[int],
    document: Callable[[int], tuple[Any, Any]],
    *,
    block_size: int,
    pad: int,
    counts: dict[str, int],
) -> Iterator[torch.Tensor]:
    """(n, 3 x block_size) int32 chunks of the packed blocks that have something to learn; `counts` gets the
    numbers of a `PackingReport` when the last is out."""
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}.")
    cut = [min(n, block_size) for n in lengths]
    bins = _best_fit(cut, block_size)
    kept = 0
    for start in range(0, len(bins), _ROWS_AT_ONCE):
        members = bins[start : start + _ROWS_AT_ONCE]
        chunk = torch.stack([_block(m, cut, document, block_size, pad) for m in members])
        keep = LabelledBlocks.from_rows(chunk).predicted() > 0
        kept += int(keep.sum())
        yield chunk[keep]
    counts.update(blocks=kept, truncated=sum(n > block_size for n in lengths), dropped=len(bins) - kept)


def _check_report(report: PackingReport) -> None:
    if report.blocks == 0:
        raise ValueError(
            "No conversation has a token to learn: every labelled token was cut off or there were none "
            "(do the conversations have assistant messages? use --loss-on all, or a larger --block-size)."
        )


def _best_fit(lengths: list[int], block_size: int) -> list[list[int]]:
    """The documents of each block: best-fit decreasing (each document, longest first, goes into the fullest
    block it fits, else a new one)."""
    order = sorted((i for i in range(len(lengths)) if lengths[i] > 0), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted: the best fit is the first with enough room
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            room, index = block_size - lengths[i], len(bins) - 1
        else:
            room, index = free.pop(at)
            bins[index].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, index))
    return bins


def _block(
    members: list[int],
    lengths: list[int],
    document: Callable[[int], tuple[Any, Any]],
    block_size: int,
    pad: int,
) -> torch.Tensor:
    """(3 x block_size) int32: the block's ids, labels and positions."""
    row = torch.empty(3, block_size, dtype=torch.int32)
    at = 0
    for i in members:
        n = lengths[i]
        ids, labels = document(i)
        row[0, at : at + n] = torch.as_tensor(ids[:n], dtype=torch.int32)
        row[1, at : at + n] = torch.as_tensor(labels[:n], dtype=torch.int32)
        row[2, at : at + n] = torch.arange(n, dtype=torch.int32)
        at += n
    row[0, at:], row[1, at:] = pad, IGNORE_INDEX
    row[2, at:] = torch.arange(block_size - at, dtype=torch.int32)
    return row.view(-1)
