"""Chat data at scale: conversations streamed in pieces, rendered and tokenized in worker processes, cached by
content hash and packed into a memory-mapped file, with the blocks, labels and errors of reading them all at
once."""

from __future__ import annotations

import json
import multiprocessing.pool
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from training_fixtures import write_jsonl

from stablelm import AutoTokenizer
from stablelm.cli import main
from stablelm.training import BlockOrder, chat, corpus, packing
from stablelm.training.chat import ChatEncoder, encode_conversations, pack_conversations, read_conversations

DEMO = Path(__file__).parents[1] / "stablelm" / "assets" / "demo"
WORDS = "the for statement iterates over the items of any sequence in the order that they appear".split()
BLOCK = 48


def _conversation(n: int, words: int = 0) -> dict:
    """A conversation whose turns differ in length with n (and `words` more words of reply)."""
    reply = " ".join(WORDS[: 1 + (n * 7) % len(WORDS)] + [WORDS[(n + i) % len(WORDS)] for i in range(words)])
    messages = [{"role": "user", "content": f"Question {n}?"}, {"role": "assistant", "content": reply}]
    if n % 3 == 0:
        messages = [{"role": "system", "content": "Be brief."}, *messages]
    return {"messages": messages}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO)


@pytest.fixture
def data(tmp_path) -> Path:
    """A folder with a JSON-lines chat file (a blank line in it) and a Parquet one (three row groups)."""
    folder = tmp_path / "data"
    folder.mkdir()
    lines = [json.dumps(_conversation(n)) for n in range(40)]
    lines[5:5] = [""]
    write_jsonl(folder / "a.jsonl", lines)
    rows = [_conversation(n)["messages"] for n in range(40, 60)]
    pq.write_table(
        pa.table({"messages": rows, "id": list(range(20))}), folder / "b.parquet", row_group_size=8
    )
    return folder


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(corpus, "PIECE_BYTES", 512)  # many pieces out of a small JSON-lines file


def _pack(stream, tmp_path, *, build=True):
    rows, report = packing.pack_on_disk(
        stream.streams,
        path=tmp_path / f"{stream.key}.packed.int32",
        block_size=BLOCK,
        pad_token_id=0,
        build=build,
    )
    return packing.LabelledBlocks.from_rows(rows), report


def _assert_same_blocks(got, expected) -> None:
    for name in ("input_ids", "labels", "position_ids"):
        assert torch.equal(getattr(got, name).long(), getattr(expected, name)), name


@pytest.mark.parametrize("workers", [1, 2], ids=["this-process", "worker-processes"])
def test_streamed_chat_blocks_equal_reading_everything_at_once(
    tokenizer, data, tmp_path, small_pieces, monkeypatch, workers
):
    monkeypatch.setattr(corpus, "_PARALLEL_BYTES", 0)  # workers even for this little data
    calls = []
    stream = corpus.tokenize_files(
        [data],
        encoder=ChatEncoder(tokenizer),
        cache_dir=tmp_path / "cache",
        workers=workers,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert stream.documents == 60 and not stream.cached
    assert len(calls) > 10 and calls[-1][0] == calls[-1][1]  # piece by piece, with progress
    blocks, report = _pack(stream, tmp_path)
    documents = encode_conversations(tokenizer, read_conversations([data]))
    expected, expected_report = pack_conversations(documents, block_size=BLOCK, pad_token_id=0)
    assert report == expected_report and len(blocks) == len(expected) > 10
    _assert_same_blocks(blocks, expected)
    # memory-mapped from the packed file, not copied into memory
    assert blocks.input_ids.dtype == torch.int32 and not blocks.input_ids.is_contiguous()


def test_a_rerun_reads_the_cache_and_tokenizes_nothing(tokenizer, data, tmp_path, small_pieces, monkeypatch):
    cache = tmp_path / "cache"
    first = corpus.tokenize_files([data], encoder=ChatEncoder(tokenizer), cache_dir=cache)
    blocks, _ = _pack(first, cache)

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized or packed again")

    monkeypatch.setattr(chat, "_encode", refuse)  # what renders and tokenizes a conversation
    monkeypatch.setattr(packing, "_best_fit", refuse)
    again = corpus.tokenize_files([data], encoder=ChatEncoder(tokenizer), cache_dir=cache)
    assert again.cached and again.key == first.key
    _assert_same_blocks(
        _pack(again, cache)[0], packing.LabelledBlocks(*(t.long() for t in vars(blocks).values()))
    )
    # Another loss, or a changed file, is another entry: tokenized again.
    with pytest.raises(AssertionError, match="tokenized or packed again"):
        corpus.tokenize_files([data], encoder=ChatEncoder(tokenizer, loss_on="all"), cache_dir=cache)
    write_jsonl(data / "a.jsonl", [_conversation(1)])
    with pytest.raises(AssertionError, match="tokenized or packed again"):
        corpus.tokenize_files([data], encoder=ChatEncoder(tokenizer), cache_dir=cache)


def _peak_memory(tokenizer, folder: Path, conversations: int) -> tuple[int, int]:
    """(the file's size, the peak of what Python allocated while reading, tokenizing and packing it)."""
    path = write_jsonl(
        folder / f"{conversations}.jsonl", [_conversation(n, words=1000) for n in range(conversations)]
    )
    encoder = ChatEncoder(tokenizer)
    tracemalloc.start()
    try:
        stream = corpus.tokenize_files([path], encoder=encoder, cache_dir=folder / "cache")
        blocks, _ = _pack(stream, folder / "cache")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stream.documents == conversations and len(blocks) == conversations  # each one cut to a block
    return path.stat().st_size, peak


def test_reading_streams_the_conversations(tokenizer, tmp_path, monkeypatch):
    """Reading five times more conversations takes no more memory: they are held a piece at a time (reading
    them all at once, as `read_conversations` + `encode_conversations` do, holds the file's text and two lists
    of token ids, about 11 bytes of Python objects per byte of this file)."""
    monkeypatch.setattr(corpus, "PIECE_BYTES", 16 * 1024)
    small, small_peak = _peak_memory(tokenizer, tmp_path, 60)
    large, large_peak = _peak_memory(tokenizer, tmp_path, 300)
    assert large > 1.5 * 2**20
    # measured: the larger file peaked 0.19 MB below the smaller (whose run pays one-time costs); read at
    # once, the conversations and their tokens take 11 times the bytes added
    assert large_peak - small_peak < (large - small) / 10, (small_peak, large_peak, large - small)


def test_bad_rows_name_the_file_and_line_also_from_a_worker_process(
    tokenizer, tmp_path, small_pieces, monkeypatch
):
    monkeypatch.setattr(corpus, "_PARALLEL_BYTES", 0)
    rows = [json.dumps(_conversation(n)) for n in range(30)]
    path = write_jsonl(
        tmp_path / "chat.jsonl", [*rows, '{"messages": [{"role": "robot", "content": "beep"}]}']
    )
    with pytest.raises(ValueError, match=r"chat\.jsonl:31: message 0 has role 'robot'") as raised:
        corpus.tokenize_files([path], encoder=ChatEncoder(tokenizer), cache_dir=tmp_path / "a", workers=2)
    # raised in a worker process: the pool re-raises it here with the worker's traceback as its cause
    assert isinstance(raised.value.__cause__, multiprocessing.pool.RemoteTraceback)
    assert not list((tmp_path / "a").glob("*.json"))  # no cache entry for failed data
    write_jsonl(path, [*rows[:20], '{"messages": [{"role": "tool", "content": "x"}]}'])
    with pytest.raises(ValueError, match=r"chat\.jsonl:21: the chat template refused it"):
        corpus.tokenize_files([path], encoder=ChatEncoder(tokenizer), cache_dir=tmp_path / "b", workers=2)
    rows = [_conversation(n)["messages"] for n in range(10)] + [[{"role": "user", "content": None}]]
    pq.write_table(pa.table({"messages": rows}), tmp_path / "chat.parquet", row_group_size=4)
    with pytest.raises(ValueError, match=r'chat\.parquet: row 10: message 0 \(user\) has no "content"'):
        corpus.tokenize_files(
            [tmp_path / "chat.parquet"], encoder=ChatEncoder(tokenizer), cache_dir=tmp_path / "c"
        )
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "text.parquet")
    with pytest.raises(ValueError, match='text.parquet has no "messages" column'):
        corpus.tokenize_files(
            [tmp_path / "text.parquet"], encoder=ChatEncoder(tokenizer), cache_dir=tmp_path / "c"
        )


def test_every_world_size_reads_the_same_blocks(tokenizer, data, tmp_path):
    """The first process of a machine packs the blocks; the others map its files (they tokenize nothing), and
    the ranks of any world size read the same blocks in each step as one process does."""
    cache = tmp_path / "cache"
    built = corpus.tokenize_files([data], encoder=ChatEncoder(tokenizer), cache_dir=cache, build=True)
    blocks, _ = _pack(built, cache, build=True)
    waited = corpus.tokenize_files([data], encoder=ChatEncoder(tokenizer), cache_dir=cache, build=False)
    other, _ = _pack(waited, cache, build=False)
    assert waited.cached
    _assert_same_blocks(other, packing.LabelledBlocks(*(t.long() for t in vars(blocks).values())))
    order = BlockOrder(len(blocks), seed=3)
    for step in range(5):  # past an epoch: 8 blocks a step
        one = order.micro_batches(step, batch_size=4, accumulation=2)
        two = [order.micro_batches(step, batch_size=2, accumulation=2, rank=r, world_size=2) for r in (0, 1)]
        read_by_one = sorted(map(tuple, blocks[torch.cat(one)].input_ids.tolist()))
        read_by_two = sorted(
            map(tuple, other[torch.cat([i for rank in two for i in rank])].input_ids.tolist())
        )
        assert read_by_one == read_by_two
        assert not set(torch.cat(two[0]).tolist()) & set(
            torch.cat(two[1]).tolist()
        )  # each rank its own share


def test_train_command_on_chat_data_reuses_the_cache(tokenizer, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STABLELM_DATA_CACHE", str(tmp_path / "cache"))
    from training_fixtures import save_checkpoint, tiny_causal_lm

    base = save_checkpoint(tmp_path / "base", tiny_causal_lm(len(tokenizer)), tokenizer)
    args = [
        "train",
        "--model",
        str(base),
        "--data",
        str(data),
        "--block-size",
        str(BLOCK),
        "--max-steps",
        "1",
    ]
    args += ["--warmup-steps", "0", "--eval-fraction", "0.2", "--batch-size", "2"]
    assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    err = capsys.readouterr().err
    assert "tokenized (" in err and "data: 60 conversations (loss on assistant tokens)" in err
    monkeypatch.setattr(chat, "_encode", lambda *a, **k: pytest.fail("tokenized again"))
    assert main([*args, "--output-dir", str(tmp_path / "two")]) == 0
    err = capsys.readouterr().err
    assert "read from the cache" in err and "held out" in err
