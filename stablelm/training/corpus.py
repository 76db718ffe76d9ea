"""Training data at scale: files streamed in pieces, tokenized in worker processes, cached on disk.

`tokenize_files` turns text, JSON-lines and Parquet files (see `data`) into one stream of token ids, the same
stream `data.tokenize(tokenizer, data.read_documents(paths))` makes, without ever holding the data in memory.
What a record becomes is the `Encoder`'s: `TextEncoder` (a document's ids and the eos token) here, and
`chat.ChatEncoder` (a conversation rendered with the chat template: ids, labels and its length); the
pieces, the workers, the progress and the cache are the same for both:
- Each file is cut into pieces: a JSON-lines file into runs of whole lines of about `PIECE_BYTES`, a Parquet
  file into its row groups, a text file (one document) stays whole. The cutting pass also hashes the files.
- Worker processes (spawned, one encoder each) read and tokenize the pieces; the main process appends
  their int32 outputs, in order, to one file per output (the encoder's `streams`), and draws a progress bar.
- The files are kept in a cache folder under a name made of the content hashes of the files and of the
  encoder (tokenizer, template...): a rerun on the same data, even from other paths, memory-maps them
  instead of tokenizing again. Each is written under a temporary name and renamed when complete, and a
  small JSON file written last says the entry is whole, so an interrupted run leaves no half entry.

Parquet is read with pyarrow (the `train` extra: `pip install 'stablelm[train]'`): the one library that
reads Parquet, without the weight of `datasets` (pandas, fsspec, aiohttp...), whose streaming and caching
this module does in a few lines for the three formats `stablelm train` takes.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..atomic import atomic_path, write_text_atomic
from ..tokenizer import Tokenizer
from .data import (
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    decode_line,
    find_files,
    held_out_rows,
    jsonl_texts,
    no_text_error,
    read_text,
    token_ids,
)
from .parquet import parquet_group_bytes, parquet_groups, parquet_texts

PIECE_BYTES = 4 * 2**20  # a worker's share at a time: large enough to amortise, small enough to stream
_FORMAT = "stablelm-tokens-2"  # changes when the cache's layout or the tokenization rules change
_CACHE_ENV = "STABLELM_DATA_CACHE"
_PARALLEL_BYTES = 16 * 2**20  # below this, starting worker processes costs more than it saves


@dataclass(frozen=True)
class Piece:
    """A unit of tokenization: `kind` "text" (a whole file), "jsonl" (`length` bytes from `offset`, starting
    at line `first_line`) or "parquet" (row group `offset`)."""

    kind: str
    path: Path
    offset: int = 0
    length: int = 0
    first_line: int = 1


class Encoder(Protocol):
    """What turns a piece's records into int32 outputs: one bytes string per name of `streams`, in order.

    An encoder is pickled to each worker process, so it carries what it needs (a tokenizer's JSON, a
    template), not live objects."""

    kind: str  # part of the cache key: what the outputs mean
    streams: tuple[str, ...]  # the outputs' names, each an int32 file of the cache entry
    column: str  # the Parquet column it reads

    def fingerprint(self) -> bytes:
        """Everything besides the files that changes the outputs (the tokenizer, the template...)."""
        ...

    def encode(self, piece: Piece) -> tuple[list[bytes], int]:
        """The piece's outputs (int32 bytes, one per stream) and its number of documents."""
        ...

    def empty_error(self, paths: Sequence[str | os.PathLike]) -> ValueError:
        """The error for data without a single document."""
        ...


class TextEncoder:
    """Text documents: each one's token ids followed by the eos token (if any); one stream, "tokens"."""

    kind, streams, column = "text", ("tokens",), "text"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.backend = tokenizer.backend_tokenizer
        self.tokenizer_json, self.eos = self.backend.to_str(), tokenizer.eos_token_id

    def __getstate__(self) -> dict[str, Any]:  # workers rebuild the tokenizer from its JSON
        return {**self.__dict__, "backend": None}

    def fingerprint(self) -> bytes:
        return f"{json_digest(self.tokenizer_json)}\n{self.eos!r}".encode()

    def encode(self, piece: Piece) -> tuple[list[bytes], int]:
        texts = [text for text in _read_texts(piece) if text.strip()]
        ids = array.array("i", token_ids(backend_of(self), texts, eos=self.eos) if texts else [])
        return [ids.tobytes()], len(texts)

    def empty_error(self, paths: Sequence[str | os.PathLike]) -> ValueError:
        return no_text_error(paths)


def json_digest(text: str) -> str:
    """The SHA-256 of a (large) string, such as a tokenizer's JSON, for a cache key."""
    return hashlib.sha256(text.encode()).hexdigest()


def backend_of(encoder: Any) -> Any:
    """The encoder's `tokenizers.Tokenizer`: its own in the main process, rebuilt from JSON in a worker."""
    if encoder.backend is None:
        from tokenizers import Tokenizer as Backend

        encoder.backend = Backend.from_str(encoder.tokenizer_json)
    return encoder.backend


@dataclass(frozen=True)
class TokenStream:
    """A tokenized corpus: `tokens` (int32, memory-mapped from `path`) and how many documents it holds.

    Attributes:
        streams: Every output of the encoder by name, memory-mapped (`tokens` is the first).
        key: The cache entry's name (the content hash), for files derived from it.
    """

    tokens: torch.Tensor
    documents: int
    path: Path
    cached: bool  # read from the cache, not tokenized by this call
    streams: dict[str, torch.Tensor] = field(default_factory=dict)
    key: str = ""


def default_cache_dir() -> Path:
    """$STABLELM_DATA_CACHE, else $XDG_CACHE_HOME/stablelm/tokens (~/.cache/stablelm/tokens)."""
    if os.environ.get(_CACHE_ENV):
        return Path(os.environ[_CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "stablelm" / "tokens"


def tokenize_files(
    paths: Sequence[str | os.PathLike],
    tokenizer: Tokenizer | None = None,
    *,
    cache_dir: str | os.PathLike,
    encoder: Encoder | None = None,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    build: bool = True,
) -> TokenStream:
    """The token stream of the data files named by `paths`, from the cache or tokenized into it.

    Args:
        paths: Files and folders, as `data.read_documents` takes them.
        tokenizer: Each document's ids are followed by its eos token (if any); not needed with `encoder`.
        cache_dir: Where token files are kept (created if needed).
        encoder: What a record becomes (default: `TextEncoder(tokenizer)`; `chat.ChatEncoder` for chat data).
        workers: Processes that tokenize (1: this process). Data under 16 MiB is tokenized here.
        progress: Called with (bytes done, bytes in all) as pieces are tokenized.
        build: False waits for another process (rank 0 of a machine) to write the cache file instead.

    Raises:
        FileNotFoundError: A path does not exist, or a folder holds no data files.
        ValueError: As `data.read_documents`: a file is not UTF-8, a record is not valid, or there is no text.
        ImportError: A Parquet file, without pyarrow.
    """
    if encoder is None:
        if tokenizer is None:
            raise ValueError("tokenize_files needs a tokenizer (or an encoder).")
        encoder = TextEncoder(tokenizer)
    files = find_files(paths)
    pieces, key = _plan(files, encoder)
    folder = Path(cache_dir)
    outputs = {name: folder / f"{key}.{name}.int32" for name in encoder.streams}
    meta_path = folder / f"{key}.json"
    cached = meta_path.is_file() and all(path.is_file() for path in outputs.values())
    if not cached and build:
        folder.mkdir(parents=True, exist_ok=True)
        _build(pieces, encoder, outputs, meta_path, workers=workers, progress=progress)
    elif not cached:
        wait_for(meta_path)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta["documents"] == 0:
        raise encoder.empty_error(paths)
    streams = {name: map_int32(path, meta["sizes"][name]) for name, path in outputs.items()}
    first = encoder.streams[0]
    return TokenStream(
        tokens=streams[first],
        documents=meta["documents"],
        path=outputs[first],
        cached=cached,
        streams=streams,
        key=key,
    )


def map_int32(path: Path, count: int) -> torch.Tensor:
    """`count` int32 values memory-mapped from `path` (read, not copied into memory)."""
    if count == 0:
        return torch.empty(0, dtype=torch.int32)
    return torch.from_file(str(path), shared=False, size=count, dtype=torch.int32)


def split_on_disk(
    blocks: torch.Tensor, fraction: float, *, source: Path, build: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """`data.split_blocks` for (N, W) int32 blocks memory-mapped from the cache: the training blocks are written
    once, beside the cache file `source`, and memory-mapped rather than copied into memory; the held-out
    blocks are copied.

    Args:
        build: False waits for another process (rank 0 of a machine) to write the file instead.
    """
    held = held_out_rows(blocks.shape[0], fraction)
    count, width = int((~held).sum()), blocks.shape[1]
    path = source.with_name(f"{source.stem}.train-{blocks.shape[0]}x{width}-{fraction!r}.int32")
    if not path.is_file() and build:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                for start in range(0, blocks.shape[0], 4096):  # a few MiB at a time
                    rows = blocks[start : start + 4096][~held[start : start + 4096]]
                    f.write(rows.to(torch.int32).numpy().tobytes())
    elif not path.is_file():
        wait_for(path)
    return map_int32(path, count * width).view(count, width), blocks[held].clone()


# ---- planning ----------------------------------------------------------------------------------------------
def _plan(files: list[Path], encoder: Encoder) -> tuple[list[Piece], str]:
    """The pieces of `files`, and the cache key: a hash of the files' contents and of the encoder."""
    key = hashlib.sha256(f"{_FORMAT}\n{encoder.kind}\n".encode())
    key.update(encoder.fingerprint())
    pieces: list[Piece] = []
    for path in files:
        if path.suffix in JSONL_SUFFIXES:
            found, digest = _jsonl_pieces(path)
        else:
            parquet = path.suffix in PARQUET_SUFFIXES
            found = parquet_pieces(path, encoder.column) if parquet else [Piece("text", path)]
            digest = _file_hash(path)
        pieces += found
        key.update(f"{found[0].kind if found else 'empty'}:{digest}\n".encode())
    return pieces, key.hexdigest()[:32]


def parquet_pieces(path: Path, column: str) -> list[Piece]:
    """A Parquet file's row groups, once its `column` is checked."""
    return [Piece("parquet", path, group) for group in range(parquet_groups(path, column))]


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _jsonl_pieces(path: Path) -> tuple[list[Piece], str]:
    """Runs of whole lines of about PIECE_BYTES, and the file's hash, in one pass."""
    digest, pieces = hashlib.sha256(), []
    offset, line, start, start_line, size = 0, 1, 0, 1, 0
    with open(path, "rb") as f:
        while chunk := f.read(PIECE_BYTES):
            digest.update(chunk)
            offset += len(chunk)
            line += chunk.count(b"\n")
            size += len(chunk)
            if size >= PIECE_BYTES:
                rest = f.readline()  # finish the line the chunk cut
                digest.update(rest)
                offset += len(rest)
                line += rest.count(b"\n")
                pieces.append(Piece("jsonl", path, start, offset - start, start_line))
                start, start_line, size = offset, line, 0
    if offset > start:
        pieces.append(Piece("jsonl", path, start, offset - start, start_line))
    return pieces, digest.hexdigest()


def jsonl_lines(piece: Piece) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a JSON-lines piece, decoded as UTF-8 (an error names the line and
    byte offset)."""
    offset = piece.offset
    for number, raw in enumerate(_raw_lines(piece), start=piece.first_line):
        yield number, decode_line(piece.path, raw, line=number, offset=offset)
        offset += len(raw)


def _read_texts(piece: Piece) -> list[str]:
    if piece.kind == "text":
        return [read_text(piece.path)]
    if piece.kind == "parquet":
        return parquet_texts(piece.path, group=piece.offset)
    return jsonl_texts(piece.path, _raw_lines(piece), first_line=piece.first_line, offset=piece.offset)


def _raw_lines(piece: Piece) -> list[bytes]:
    """The lines (bytes, with their ends) of a JSON-lines piece."""
    with open(piece.path, "rb") as f:
        f.seek(piece.offset)
        return f.read(piece.length).splitlines(keepends=True)


# ---- tokenizing --------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}  # a worker process's encoder, set once when the pool starts it


def _start_worker(encoder: Encoder) -> None:
    # One process per core already: the tokenizers library's own thread pool would only compete.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["encoder"] = encoder


def _tokenize_in_worker(piece: Piece) -> tuple[list[bytes], int]:
    return _WORKER["encoder"].encode(piece)


def _tokenize_piece(piece: Piece, encoder: Encoder) -> tuple[list[bytes], int]:
    """(the piece's outputs as int32 bytes, its number of documents), in this process."""
    return encoder.encode(piece)


def _build(
    pieces: list[Piece],
    encoder: Encoder,
    outputs: dict[str, Path],
    meta_path: Path,
    *,
    workers: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    sizes = [_piece_bytes(piece) for piece in pieces]
    documents = done = 0
    counts = dict.fromkeys(outputs, 0)
    with contextlib.ExitStack() as stack:
        files = [
            stack.enter_context(open(stack.enter_context(atomic_path(p)), "wb")) for p in outputs.values()
        ]
        for size, (parts, count) in zip(sizes, _map(pieces, encoder, workers, sum(sizes)), strict=True):
            for name, out, part in zip(outputs, files, parts, strict=True):
                out.write(part)
                counts[name] += len(part) // 4
            documents += count
            done += size
            if progress is not None:
                progress(done, sum(sizes))
    # Written last: its presence says every output is whole.
    write_text_atomic(meta_path, json.dumps({"documents": documents, "sizes": counts}) + "\n")


def _map(
    pieces: list[Piece], encoder: Encoder, workers: int, total: int
) -> Iterator[tuple[list[bytes], int]]:
    if workers <= 1 or len(pieces) < 2 or total < _PARALLEL_BYTES:
        yield from (_tokenize_piece(piece, encoder) for piece in pieces)
        return
    # Spawned, not forked: the parent's torch and tokenizers thread pools do not survive a fork.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, _start_worker, (encoder,)) as pool:
        yield from pool.imap(_tokenize_in_worker, pieces)


def _piece_bytes(piece: Piece) -> int:
    if piece.kind == "jsonl":
        return piece.length
    if piece.kind == "text":
        return piece.path.stat().st_size
    return parquet_group_bytes(piece.path, piece.offset)


def wait_for(path: Path) -> None:
    """Wait until another process (the first of this machine's ranks) has written `path`."""
    import time

    # If that process fails, torchrun stops this one.
    while not path.is_file():
        time.sleep(0.5)
