"""Reading chat data at scale: tokens/s of rendering and tokenizing in 1 and 2 worker processes, a rerun from
the cache, and packing, on a generated chat JSON-lines file.

The file holds --conversations conversations (a system turn in one of three, a user question, an assistant
reply of 20-120 words drawn from Python's documentation), rendered with the demo tokenizer's chat template
(stablelm/assets/demo, ChatML-like, no {% generation %} blocks: the assistant tokens are found by rendering
turn by turn, three renders per reply). Each configuration tokenizes into a fresh cache folder with
`corpus.tokenize_files(..., encoder=ChatEncoder(tokenizer), workers=N)`; "rerun" reads the same data again
(the cache: nothing tokenized); "pack" packs the cached conversations into blocks of --block tokens
(`packing.pack_on_disk`). Reported: seconds, conversations/s, tokens/s (the conversations' tokens), MB/s of
the file, and the CPU seconds of this process and its workers (with tokens per CPU second: on a machine
that other work shares, the rate per wall-clock second depends on what else runs, the rate per CPU second
far less).

Run: python benchmarks/chat_data.py [--conversations 60000] [--workers 1 2] [--block 2048]
The figures are ratios within one run; on a shared machine the absolute rates drift run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import pydoc_data.topics
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stablelm import AutoTokenizer  # noqa: E402
from stablelm.training import corpus, packing  # noqa: E402
from stablelm.training.chat import ChatEncoder  # noqa: E402

DEMO = ROOT / "stablelm" / "assets" / "demo"


def write_chat_file(path: Path, conversations: int, *, seed: int = 0) -> None:
    words = " ".join(pydoc_data.topics.topics.values()).split()
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for n in range(conversations):
            start = rng.randrange(len(words) - 200)
            reply = " ".join(words[start : start + rng.randint(20, 120)])
            question = " ".join(words[start + 150 : start + 150 + rng.randint(5, 25)]) + "?"
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
            if n % 3 == 0:
                messages.insert(0, {"role": "system", "content": "You answer questions about Python."})
            f.write(json.dumps({"messages": messages}) + "\n")


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the pool's workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=60000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--block", type=int, default=2048)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        data = folder / "chat.jsonl"
        write_chat_file(data, args.conversations)
        size = data.stat().st_size
        print(
            f"{data.name}: {args.conversations:,} conversations, {size / 2**20:.1f} MiB; cpus {os.cpu_count()}"
        )
        rows, stream = [], None
        for workers in args.workers:
            cache = folder / f"cache-{workers}"
            start, cpu = time.perf_counter(), _cpu_seconds()
            stream = corpus.tokenize_files(
                [data], encoder=ChatEncoder(tokenizer), cache_dir=cache, workers=workers
            )
            name = f"tokenize, {workers} worker{'s' if workers > 1 else ''}"
            rows.append((name, time.perf_counter() - start, _cpu_seconds() - cpu))
            assert not stream.cached
        start, cpu = time.perf_counter(), _cpu_seconds()
        again = corpus.tokenize_files([data], encoder=ChatEncoder(tokenizer), cache_dir=cache)
        rows.append(("rerun (cache)", time.perf_counter() - start, _cpu_seconds() - cpu))
        assert again.cached
        start, cpu = time.perf_counter(), _cpu_seconds()
        _, report = packing.pack_on_disk(
            stream.streams, path=cache / "packed.int32", block_size=args.block, pad_token_id=0
        )
        name = f"pack into {report.blocks:,} blocks of {args.block}"
        rows.append((name, time.perf_counter() - start, _cpu_seconds() - cpu))
        tokens = stream.tokens.numel()
        print(f"{tokens:,} tokens")
        print("| | seconds | conversations/s | tokens/s | MB/s | CPU s | tokens per CPU s |")
        print("|---|---|---|---|---|---|---|")
        for name, seconds, cpu in rows:
            print(
                f"| {name} | {seconds:.2f} | {args.conversations / seconds:,.0f} | {tokens / seconds:,.0f} | "
                f"{size / 1e6 / seconds:.1f} | {cpu:.1f} | {tokens / max(cpu, 1e-9):,.0f} |"
            )


if __name__ == "__main__":
    main()
