"""Training data at scale (stablelm.training.corpus): text, JSON lines and Parquet streamed in pieces, tokenized
in worker processes, cached by content hash; the same token stream as reading everything at once."""

from __future__ import annotations

import json
import pydoc_data.topics
import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stablelm.cli import main
from stablelm.training import corpus, pack, read_documents, split_blocks, tokenize, train_tokenizer

TEXTS = [pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)[:40]]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS[:12], vocab_size=300, model_max_length=64)


@pytest.fixture
def data(tmp_path):
    """A folder with a text file, a JSON-lines file (blank lines, an empty record) and a Parquet file (three
    row groups, an empty row)."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXTS[0])
    lines = [json.dumps({"text": text}) for text in TEXTS[1:20]]
    lines[3:3] = ["", json.dumps({"text": ""})]
    (folder / "b.jsonl").write_text("\n".join(lines) + "\n")
    table = pa.table({"text": TEXTS[20:] + [""], "id": list(range(len(TEXTS) - 19))})
    pq.write_table(table, folder / "c.parquet", row_group_size=8)
    return folder


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(corpus, "PIECE_BYTES", 2048)  # many pieces out of a small JSON-lines file


def test_streamed_tokens_equal_reading_everything_at_once(tokenizer, data, tmp_path, small_pieces):
    calls = []
    stream = corpus.tokenize_files(
        [data],
        tokenizer,
        cache_dir=tmp_path / "cache",
        progress=lambda done, total: calls.append((done, total)),
    )
    expected = tokenize(tokenizer, read_documents([data]))
    assert stream.tokens.dtype == torch.int32 and not stream.cached
    assert torch.equal(stream.tokens.long(), expected)
    assert stream.documents == len(TEXTS) == len(read_documents([data]))
    assert len(calls) > 10 and calls[-1][0] == calls[-1][1]  # read and tokenized piece by piece
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_worker_processes_give_the_same_tokens(tokenizer, data, tmp_path, small_pieces, monkeypatch):
    monkeypatch.setattr(corpus, "_PARALLEL_BYTES", 0)
    parallel = corpus.tokenize_files([data], tokenizer, cache_dir=tmp_path / "a", workers=2)
    assert torch.equal(parallel.tokens.long(), tokenize(tokenizer, read_documents([data])))
    # An error in a worker reaches the caller as the same message, naming the file and line.
    (data / "b.jsonl").write_text((data / "b.jsonl").read_text() + '{"text": oops}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:22 is not valid JSON"):
        corpus.tokenize_files([data], tokenizer, cache_dir=tmp_path / "b", workers=2)


def test_held_out_split_of_cached_blocks_equals_split_blocks_without_a_copy_in_memory(
    tokenizer, data, tmp_path
):
    stream = corpus.tokenize_files([data], tokenizer, cache_dir=tmp_path / "cache")
    blocks = pack(stream.tokens, 32)
    train, held = corpus.split_on_disk(blocks, 0.1, source=stream.path)
    expected_train, expected_held = split_blocks(blocks, 0.1)
    assert torch.equal(train, expected_train) and torch.equal(held, expected_held)
    written = list((tmp_path / "cache").glob(f"*.train-{len(blocks)}x32-0.1.int32"))
    assert len(written) == 1 and written[0].stat().st_size == train.numel() * 4
    # The training blocks are read from that file (a mapping of it), not copied into this process.
    assert train.untyped_storage().data_ptr() != blocks.untyped_storage().data_ptr()
    written[0].write_bytes(b"\0" * written[0].stat().st_size)  # a second split maps the file as it is
    assert int(corpus.split_on_disk(blocks, 0.1, source=stream.path)[0].abs().sum()) == 0
    with pytest.raises(ValueError, match="too few to hold out"):
        corpus.split_on_disk(blocks[:1], 0.1, source=stream.path)


def test_a_rerun_reads_the_cache_by_content(tokenizer, data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = corpus.tokenize_files([data], tokenizer, cache_dir=cache)
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)

    def no_tokenizing(*args):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(corpus, "_tokenize_piece", no_tokenizing)
    again = corpus.tokenize_files([copy], tokenizer, cache_dir=cache)  # same content, other paths
    assert again.cached and again.path == first.path and torch.equal(again.tokens, first.tokens)
    (copy / "a.txt").write_text(TEXTS[0] + " changed")
    with pytest.raises(AssertionError, match="tokenized again"):
        corpus.tokenize_files([copy], tokenizer, cache_dir=cache)
    other = train_tokenizer(TEXTS[:12], vocab_size=320, model_max_length=64)
    with pytest.raises(AssertionError, match="tokenized again"):
        corpus.tokenize_files([data], other, cache_dir=cache)


def test_an_interrupted_tokenization_leaves_no_cache_entry(
    tokenizer, data, tmp_path, small_pieces, monkeypatch
):
    real, seen = corpus._tokenize_piece, []

    def failing(piece, encoder):
        seen.append(piece)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(piece, encoder)

    monkeypatch.setattr(corpus, "_tokenize_piece", failing)
    with pytest.raises(KeyboardInterrupt):
        corpus.tokenize_files([data], tokenizer, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == []
    monkeypatch.setattr(corpus, "_tokenize_piece", real)
    assert not corpus.tokenize_files([data], tokenizer, cache_dir=tmp_path / "cache").cached


def test_bad_data_gets_the_same_clear_errors(tokenizer, data, tmp_path, small_pieces, monkeypatch):
    cache = tmp_path / "cache"
    lines = [json.dumps({"text": text}) for text in TEXTS] + ['{"content": "x"}']
    (tmp_path / "late.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f'late.jsonl:{len(TEXTS) + 1} has no string "text" field'):
        corpus.tokenize_files([tmp_path / "late.jsonl"], tokenizer, cache_dir=cache)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl:2 is not UTF-8 text: byte offset 28") as streamed:
        corpus.tokenize_files([tmp_path / "latin1.jsonl"], tokenizer, cache_dir=cache)
    with pytest.raises(ValueError) as at_once:
        read_documents([tmp_path / "latin1.jsonl"])
    assert str(streamed.value) == str(at_once.value)
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="holds no text"):
        corpus.tokenize_files([tmp_path / "empty.jsonl"], tokenizer, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="missing.parquet' does not exist"):
        corpus.tokenize_files([tmp_path / "missing.parquet"], tokenizer, cache_dir=cache)

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match='nocol.parquet has no "text" column \\(its columns: body\\)'):
        corpus.tokenize_files([tmp_path / "nocol.parquet"], tokenizer, cache_dir=cache)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match='ints.parquet: the "text" column holds int64, not strings'):
        corpus.tokenize_files([tmp_path / "ints.parquet"], tokenizer, cache_dir=cache)
    pq.write_table(pa.table({"text": ["a", "b", None]}), tmp_path / "null.parquet", row_group_size=2)
    with pytest.raises(ValueError, match='null.parquet: row 2 has a null "text"'):
        corpus.tokenize_files([tmp_path / "null.parquet"], tokenizer, cache_dir=cache)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="fake.parquet is not a Parquet file pyarrow can read"):
        corpus.tokenize_files([tmp_path / "fake.parquet"], tokenizer, cache_dir=cache)

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as without pyarrow installed
    with pytest.raises(ImportError, match=r"Parquet files needs pyarrow: pip install 'stablelm\[train\]'"):
        corpus.tokenize_files([data / "c.parquet"], tokenizer, cache_dir=cache)
    assert len(corpus.tokenize_files([data / "b.jsonl"], tokenizer, cache_dir=cache).tokens) > 0


def test_train_command_reads_parquet_and_reuses_the_cache(tokenizer, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STABLELM_DATA_CACHE", str(tmp_path / "cache"))
    tokenizer.save_pretrained(tmp_path / "tok")
    config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    (tmp_path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    args = ["train", "--config", str(tmp_path / "config.json"), "--tokenizer", str(tmp_path / "tok")]
    args += [
        "--data",
        str(data / "c.parquet"),
        "--block-size",
        "32",
        "--max-steps",
        "1",
        "--warmup-steps",
        "0",
    ]
    assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    assert "tokenized (" in capsys.readouterr().err
    assert main([*args, "--output-dir", str(tmp_path / "two")]) == 0
    err = capsys.readouterr().err
    assert f"tokens read from the cache ({tmp_path / 'cache'}" in err
    assert "data: 20 documents" in err
