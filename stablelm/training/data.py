"""Training text: read documents from files, tokenize them into one stream, pack it into blocks, order them.

A document is a text file, one record of a JSON-lines file (`{"text": ...}` per line), or one row of a
Parquet file's "text" column (read by `corpus`, which streams large data through a token cache). Each document's
tokens are followed by the end-of-text token, the documents are concatenated in order, and the stream is
cut into blocks of `block_size` tokens (the tail that does not fill a block is dropped). The order in which
training visits the blocks is a function of the seed and the position alone, so a resumed run reads the
same batches as an uninterrupted one.

Files are read as strict UTF-8 (a leading byte-order mark is dropped). Bytes that are not UTF-8, and lone
UTF-16 surrogates (a JSON escape such as "\\udc80", or text decoded with errors="surrogateescape"), are
errors naming the file, the line and the byte offset, not replaced: silently changing training text would
teach the model or the tokenizer U+FFFD where the data meant something else, and the tokenizers library
cannot encode a lone surrogate at all. Convert such files to UTF-8 first (`iconv -f LATIN1 -t UTF-8`, say).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import StableLmConfig
from ..tokenizer import Tokenizer
from .wording import plural

JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
PARQUET_SUFFIXES = (".parquet",)
_HINT = (
    'Pass text files (.txt, .md, .rst), JSON-lines files (.jsonl, one {"text": ...} per line), Parquet files '
    '(.parquet, a "text" column) or folders.'
)
_SURROGATE = re.compile("[\ud800-\udfff]")


def find_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The data files named by `paths`: files as given, folders expanded (recursively, sorted).

    Raises:
        FileNotFoundError: A path does not exist, or a folder holds no data files.
    """
    if not paths:
        raise ValueError(f"No training data given. {_HINT}")
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix in JSONL_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES
            )
            if not found:
                raise FileNotFoundError(f"The folder {str(path)!r} holds no data files. {_HINT}")
            files += found
        elif path.exists():
            raise FileNotFoundError(f"Training data {str(path)!r} is not a regular file or folder. {_HINT}")
        else:
            raise FileNotFoundError(f"Training data {str(path)!r} does not exist. {_HINT}")
    return files


def read_documents(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The non-empty documents of the data files named by `paths`, in order.

    Raises:
        FileNotFoundError: A path does not exist.
        ValueError: A file is not UTF-8 (the message names the line and byte offset), a JSON-lines record is
            not valid JSON, has no string "text" or holds a lone surrogate, or there is no text at all.
    """
    documents: list[str] = []
    for path in find_files(paths):
        if path.suffix in PARQUET_SUFFIXES:
            from .parquet import parquet_texts

            documents += parquet_texts(path)
        elif path.suffix in JSONL_SUFFIXES:
            with open(path, "rb") as lines:
                documents += jsonl_texts(path, lines)
        else:
            documents.append(read_text(path))
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise no_text_error(paths)
    return documents


def no_text_error(paths: Sequence[str | os.PathLike]) -> ValueError:
    """The error for data that holds no text at all."""
    names = ", ".join(str(p) for p in paths)
    return ValueError(f"The training data ({names}) holds no text: every file or record is empty.")


def read_text(path: Path) -> str:
    """A text file's content: one document."""
    data = path.read_bytes()
    return decode_line(path, data, line=1, offset=0)


def jsonl_texts(path: Path, lines: Iterable[bytes], *, first_line: int = 1, offset: int = 0) -> list[str]:
    """The "text" of each record of JSON-lines `lines` (raw bytes, from line `first_line` at byte `offset` of
    `path`), blank lines skipped; errors name the file, line and byte offset."""
    texts = []
    for number, raw in enumerate(lines, start=first_line):
        line = decode_line(path, raw, line=number, offset=offset)
        offset += len(raw)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} is not valid JSON ({err}). {_HINT}") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(
                f'{path}:{number} has no string "text" field; each line must be an object like '
                '{"text": "..."}.'
            )
        if match := _SURROGATE.search(record["text"]):
            raise ValueError(
                f'{path}:{number}: the "text" holds a lone surrogate {_escape(match.group())} (half of a '
                "UTF-16 pair, escaped in the JSON), which is not a character and cannot be tokenized; fix "
                "or drop that record."
            )
        texts.append(record["text"])
    return texts


def decode_line(path: Path, data: bytes, *, line: int, offset: int) -> str:
    """`data` (the file's bytes from byte `offset`, line `line`) as UTF-8, or a ValueError naming the place."""
    try:
        return data.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError as err:
        bad = data[err.start : err.end]
        line += data.count(b"\n", 0, err.start)
        raise ValueError(
            f"{path}:{line} is not UTF-8 text: byte offset {offset + err.start:,} holds {bad!r} ({err.reason}). "
            "Convert the file to UTF-8 first (for example iconv -f LATIN1 -t UTF-8), or drop that line."
        ) from None


def _escape(char: str) -> str:
    return f"\\u{ord(char):04x}"


def check_text(documents: Sequence[str]) -> None:
    """Raise ValueError if a document is not a str or holds a lone surrogate, which no tokenizer can encode.

    Lone surrogates come from text decoded with errors="surrogateescape" (undecodable bytes kept as
    U+DC80..U+DCFF) or from JSON escapes of half a UTF-16 pair.
    """
    for index, document in enumerate(documents):
        if not isinstance(document, str):
            raise TypeError(f"Document {index} is a {type(document).__name__}, not a str.")
        if match := _SURROGATE.search(document):
            raise ValueError(
                f"Document {index} holds a lone surrogate {_escape(match.group())} at character {match.start():,}, "
                "which is not a character and cannot be tokenized (text decoded with errors='surrogateescape'?). "
                "Read the file as UTF-8 (errors='strict'), or replace such characters first."
            )


def tokenize(tokenizer: Tokenizer, documents: Iterable[str]) -> torch.Tensor:
    """One int64 stream of the documents' tokens, each document followed by the eos token (if any).

    Raises:
        ValueError: A document holds a lone surrogate (see `check_text`).
    """
    stream = token_ids(tokenizer.backend_tokenizer, list(documents), eos=tokenizer.eos_token_id)
    return torch.tensor(stream, dtype=torch.int64)


def token_ids(backend: Any, documents: list[str], *, eos: int | None) -> list[int]:
    """The documents' token ids, each document followed by `eos` (if any), from a `tokenizers.Tokenizer`.

    Raises:
        ValueError: A document holds a lone surrogate (see `check_text`).
    """
    check_text(documents)
    end = [eos] if eos is not None else []
    encodings = backend.encode_batch_fast(documents, add_special_tokens=False)
    return [token for encoding in encodings for token in (*encoding.ids, *end)]


def pack(stream: torch.Tensor, block_size: int) -> torch.Tensor:
    """Blocks (N, block_size) cut from the token stream; the tail shorter than a block is dropped.

    Raises:
        ValueError: The stream is shorter than one block.
    """
    if block_size < 2:
        raise ValueError(
            f"block_size must be at least 2 (a token and the one it predicts), got {block_size}."
        )
    n = stream.numel() // block_size
    if n == 0:
        raise ValueError(
            f"The data has {plural(stream.numel(), 'token')}, fewer than one block of {block_size}; add text or "
            "lower the block size."
        )
    return stream[: n * block_size].view(n, block_size)


def split_blocks(blocks: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): `fraction` of the blocks, evenly spaced through the data, are held out.

    Raises:
        ValueError: The fraction is outside [0, 1), or leaves no block on one side.
    """
    held = held_out_rows(blocks.shape[0], fraction)
    return blocks[~held], blocks[held]


def held_out_rows(count: int, fraction: float) -> torch.Tensor:
    """The mask of the rows `split_blocks` holds out of `count` blocks.

    Raises:
        ValueError: The fraction is outside [0, 1), or leaves no block on one side.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"The held-out fraction must be in [0, 1), got {fraction}.")
    held = torch.tensor([math.floor((i + 1) * fraction) > math.floor(i * fraction) for i in range(count)])
    if fraction > 0 and (not held.any() or held.all()):
        raise ValueError(
            f"The data makes only {plural(count, 'block')}, too few to hold out {fraction:.0%} of them; add "
            "text, lower the block size, or pass separate held-out data."
        )
    return held


def check_blocks(blocks: torch.Tensor, *, name: str, config: StableLmConfig) -> None:
    """Raise ValueError (naming `name`) unless `blocks` are (N, T) int64 or int32 ids that fit the model."""
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{name} must be a non-empty (N, block_size) int64 (or int32) tensor, got {tuple(blocks.shape)} "
            f"{blocks.dtype}."
        )
    check_block_size(int(blocks.shape[1]), max_position_embeddings=config.max_position_embeddings)
    top = int(blocks.max())
    if top >= config.vocab_size:
        raise ValueError(
            f"{name} holds token id {top}, outside the model's vocabulary of {config.vocab_size}; resize the "
            "embeddings to the tokenizer first (model.resize_token_embeddings(len(tokenizer)))."
        )


def check_block_size(block_size: int, *, max_position_embeddings: int) -> None:
    """Raise ValueError unless 2 <= block_size <= max_position_embeddings."""
    if not 2 <= block_size <= max_position_embeddings:
        raise ValueError(
            f"The block size {block_size} is outside what the model takes: use 2 to max_position_embeddings "
            f"({max_position_embeddings}), e.g. --block-size {min(max(block_size, 2), max_position_embeddings)}."
        )


class BlockOrder:
    """The order in which training visits the blocks: a fresh permutation each epoch, from the seed alone.

    Sample k of the run is `order[k]`, whatever happened before, so a resumed run continues the same order.
    """

    def __init__(self, num_blocks: int, *, seed: int) -> None:
        self.num_blocks, self.seed = num_blocks, seed
        self._epoch, self._permutation = -1, torch.empty(0, dtype=torch.int64)

    def micro_batches(
        self, step: int, *, batch_size: int, accumulation: int, rank: int = 0, world_size: int = 1
    ) -> list[torch.Tensor]:
        """The block indices rank `rank` of `world_size` reads in optimiser step `step`, per micro-batch.

        A step reads the next batch_size x accumulation x world_size samples of the order (the global batch),
        and rank r takes its positions r, r + W, r + 2W, ...: the same samples, in the same steps, for any world
        size with the same global batch (a run resumed on another number of processes reads the same data).
        """
        start = step * batch_size * accumulation * world_size + rank
        return [
            self.indices(start + world_size * micro * batch_size, batch_size, stride=world_size)
            for micro in range(accumulation)
        ]

    def indices(self, start: int, count: int, *, stride: int = 1) -> torch.Tensor:
        """The block indices of samples start, start + stride, ..., start + (count - 1) * stride."""
        return torch.stack([self._at(k) for k in range(start, start + count * stride, stride)])

    def _at(self, k: int) -> torch.Tensor:
        epoch, i = divmod(k, self.num_blocks)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._permutation = epoch, torch.randperm(self.num_blocks, generator=generator)
        return self._permutation[i]
