"""Training data at scale: files streamed in pieces, tokenized in worker processes, cached on disk.

`tokenize_files` turns text, JSON-lines and Parquet files (see `data`) into one stream of token ids, the same
stream `data.tokenize(tokenizer, data.read_documents(paths))` makes, without ever holding the data in memory:
- Each file is cut into pieces: a JSON-lines file into runs of whole lines of about `PIECE_BYTES`, a Parquet
  file into its row groups, a text file (one document) stays whole. The cutting pass also hashes the files.
- Worker processes (spawned, one tokenizer each) read and tokenize the pieces; the main process appends
  their ids, in order, to a file of int32 ids, and draws a progress bar.
- The file is kept in a cache folder under a name made of the content hashes of the files and of the
  tokenizer: a rerun on the same data, even from other paths, memory-maps it instead of tokenizing again.
  It is written under a temporary name and renamed when complete, so an interrupted run leaves no half file.

Parquet is read with pyarrow (the `train` extra: `pip install 'stablelm[train]'`): the one library that
reads Parquet, without the weight of `datasets` (pandas, fsspec, aiohttp...), whose streaming and caching
this module does in a few lines for the three formats `stablelm train` takes.
"""

from __future__ import annotations

import array
import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path, write_text_atomic
from ..tokenizer import Tokenizer
from .data import (
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    find_files,
    held_out_rows,
    jsonl_texts,
    no_text_error,
    read_text,
    token_ids,
)

PIECE_BYTES = 4 * 2**20  # a worker's share at a time: large enough to amortise, small enough to stream
_FORMAT = "stablelm-tokens-1"  # changes when the cache's layout or the tokenization rules change
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


@dataclass(frozen=True)
class TokenStream:
    """A tokenized corpus: `tokens` (int32, memory-mapped from `path`) and how many documents it holds."""

    tokens: torch.Tensor
    documents: int
    path: Path
    cached: bool  # read from the cache, not tokenized by this call


def default_cache_dir() -> Path:
    """$STABLELM_DATA_CACHE, else $XDG_CACHE_HOME/stablelm/tokens (~/.cache/stablelm/tokens)."""
    if os.environ.get(_CACHE_ENV):
        return Path(os.environ[_CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "stablelm" / "tokens"


def tokenize_files(
    paths: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    *,
    cache_dir: str | os.PathLike,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    build: bool = True,
) -> TokenStream:
    """The token stream of the data files named by `paths`, from the cache or tokenized into it.

    Args:
        paths: Files and folders, as `data.read_documents` takes them.
        tokenizer: Each document's ids are followed by its eos token (if any).
        cache_dir: Where token files are kept (created if needed).
        workers: Processes that tokenize (1: this process). Data under 16 MiB is tokenized here.
        progress: Called with (bytes done, bytes in all) as pieces are tokenized.
        build: False waits for another process (rank 0 of a machine) to write the cache file instead.

    Raises:
        FileNotFoundError: A path does not exist, or a folder holds no data files.
        ValueError: As `data.read_documents`: a file is not UTF-8, a record is not valid, or there is no text.
        ImportError: A Parquet file, without pyarrow.
    """
    files = find_files(paths)
    pieces, key = _plan(files, tokenizer)
    folder = Path(cache_dir)
    tokens_path, meta_path = folder / f"{key}.int32", folder / f"{key}.json"
    cached = meta_path.is_file() and tokens_path.is_file()
    if not cached and build:
        folder.mkdir(parents=True, exist_ok=True)
        _build(pieces, tokenizer, tokens_path, meta_path, workers=workers, progress=progress)
    elif not cached:
        _wait_for(meta_path)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta["documents"] == 0:
        raise no_text_error(paths)
    tokens = torch.from_file(str(tokens_path), shared=False, size=meta["tokens"], dtype=torch.int32)
    return TokenStream(tokens=tokens, documents=meta["documents"], path=tokens_path, cached=cached)


def split_on_disk(
    stream: TokenStream, blocks: torch.Tensor, fraction: float, *, build: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """`data.split_blocks` for blocks cut from a cached stream: the training blocks are written once, beside
    the cache file, and memory-mapped rather than copied into memory; the held-out blocks are copied.

    Args:
        build: False waits for another process (rank 0 of a machine) to write the file instead.
    """
    held = held_out_rows(blocks.shape[0], fraction)
    count, width = int((~held).sum()), blocks.shape[1]
    path = stream.path.with_name(f"{stream.path.stem}.train-{blocks.shape[0]}x{width}-{fraction!r}.int32")
    if not path.is_file() and build:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.truncate(count * width * 4)
            out = torch.from_file(str(tmp), shared=True, size=count * width, dtype=torch.int32)
            out, done = out.view(count, width), 0
            for start in range(0, blocks.shape[0], 4096):  # a few MiB at a time
                rows = blocks[start : start + 4096][~held[start : start + 4096]]
                out[done : done + len(rows)] = rows
                done += len(rows)
            del out
    elif not path.is_file():
        _wait_for(path)
    train = torch.from_file(str(path), shared=False, size=count * width, dtype=torch.int32)
    return train.view(count, width), blocks[held].clone()


# ---- planning ----------------------------------------------------------------------------------------------
def _plan(files: list[Path], tokenizer: Tokenizer) -> tuple[list[Piece], str]:
    """The pieces of `files`, and the cache key: a hash of the files' contents and of the tokenizer."""
    key = hashlib.sha256(_FORMAT.encode())
    key.update(tokenizer.backend_tokenizer.to_str().encode())
    key.update(repr(tokenizer.eos_token_id).encode())
    pieces: list[Piece] = []
    for path in files:
        if path.suffix in JSONL_SUFFIXES:
            found, digest = _jsonl_pieces(path)
        else:
            found = _parquet_pieces(path) if path.suffix in PARQUET_SUFFIXES else [Piece("text", path)]
            digest = _file_hash(path)
        pieces += found
        key.update(f"{found[0].kind if found else 'empty'}:{digest}\n".encode())
    return pieces, key.hexdigest()[:32]


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


def _parquet_pieces(path: Path) -> list[Piece]:
    parquet = _pyarrow_parquet()
    try:
        file = parquet.ParquetFile(path)
    except Exception as err:  # pyarrow's ArrowInvalid and friends
        raise ValueError(f"{path} is not a Parquet file pyarrow can read ({err}).") from err
    _check_text_column(path, file.schema_arrow)
    return [Piece("parquet", path, group) for group in range(file.metadata.num_row_groups)]


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as parquet
    except ImportError as err:
        raise ImportError(
            "Reading Parquet files needs pyarrow: pip install 'stablelm[train]' (or pip install pyarrow)."
        ) from err
    return parquet


def _check_text_column(path: Path, schema: Any) -> None:
    import pyarrow as pa

    if "text" not in schema.names:
        raise ValueError(
            f'{path} has no "text" column (its columns: {", ".join(schema.names)}); training reads the '
            '"text" column of Parquet files.'
        )
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f'{path}: the "text" column holds {kind}, not strings.')


def parquet_texts(path: Path, *, group: int | None = None) -> list[str]:
    """The "text" column of a Parquet file (or of one of its row groups); a null is an error naming the row."""
    parquet = _pyarrow_parquet()
    file = parquet.ParquetFile(path)
    _check_text_column(path, file.schema_arrow)
    groups = range(file.metadata.num_row_groups) if group is None else [group]
    first = sum(file.metadata.row_group(g).num_rows for g in range(groups[0])) if groups else 0
    texts: list[str] = []
    for g in groups:
        texts += file.read_row_group(g, columns=["text"]).column("text").to_pylist()
    for row, text in enumerate(texts):
        if text is None:
            raise ValueError(f'{path}: row {first + row} has a null "text"; fill or drop that row.')
    return texts


# ---- tokenizing --------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}  # a worker process's tokenizer, set once when the pool starts it


def _start_worker(tokenizer_json: str, eos: int | None) -> None:
    # One process per core already: the tokenizers library's own thread pool would only compete.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer as Backend

    _WORKER.update(backend=Backend.from_str(tokenizer_json), eos=eos)


def _tokenize_in_worker(piece: Piece) -> tuple[bytes, int]:
    return _tokenize_piece(piece, _WORKER["backend"], _WORKER["eos"])


def _tokenize_piece(piece: Piece, backend: Any, eos: int | None) -> tuple[bytes, int]:
    """(the piece's ids as int32 bytes, its number of non-empty documents)."""
    texts = [text for text in _read_piece(piece) if text.strip()]
    ids = array.array("i", token_ids(backend, texts, eos=eos) if texts else [])
    return ids.tobytes(), len(texts)


def _read_piece(piece: Piece) -> list[str]:
    if piece.kind == "text":
        return [read_text(piece.path)]
    if piece.kind == "parquet":
        return parquet_texts(piece.path, group=piece.offset)
    with open(piece.path, "rb") as f:
        f.seek(piece.offset)
        data = f.read(piece.length)
    lines = data.splitlines(keepends=True)
    return jsonl_texts(piece.path, lines, first_line=piece.first_line, offset=piece.offset)


def _build(
    pieces: list[Piece],
    tokenizer: Tokenizer,
    tokens_path: Path,
    meta_path: Path,
    *,
    workers: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    sizes = [_piece_bytes(piece) for piece in pieces]
    documents = tokens = done = 0
    with atomic_path(tokens_path) as tmp, open(tmp, "wb") as out:
        for size, (ids, count) in zip(sizes, _map(pieces, tokenizer, workers, sum(sizes)), strict=True):
            out.write(ids)
            documents, tokens = documents + count, tokens + len(ids) // 4
            done += size
            if progress is not None:
                progress(done, sum(sizes))
    write_text_atomic(meta_path, json.dumps({"documents": documents, "tokens": tokens}) + "\n")


def _map(pieces: list[Piece], tokenizer: Tokenizer, workers: int, total: int) -> Iterator[tuple[bytes, int]]:
    backend, eos = tokenizer.backend_tokenizer, tokenizer.eos_token_id
    if workers <= 1 or len(pieces) < 2 or total < _PARALLEL_BYTES:
        yield from (_tokenize_piece(piece, backend, eos) for piece in pieces)
        return
    # Spawned, not forked: the parent's torch and tokenizers thread pools do not survive a fork.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, _start_worker, (backend.to_str(), eos)) as pool:
        yield from pool.imap(_tokenize_in_worker, pieces)


def _piece_bytes(piece: Piece) -> int:
    if piece.kind == "jsonl":
        return piece.length
    if piece.kind == "text":
        return piece.path.stat().st_size
    return _pyarrow_parquet().ParquetFile(piece.path).metadata.row_group(piece.offset).total_byte_size


def _wait_for(path: Path) -> None:
    import time

    # Another process writes it; if that process fails, torchrun stops this one.
    while not path.is_file():
        time.sleep(0.5)
