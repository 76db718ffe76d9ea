"""Reading chat data at scale: tokens/s of rendering and tokenizing in 1 and 2 worker processes, a rerun from
the cache, and packing, on a generated chat JSON-lines file.

The file holds --conversations conversations (a system turn in one of three, a user question, an assistant
reply of 20-120 words drawn from Python's documentation), rendered with the demo tokenizer's chat template
(stablelm/assets/demo, ChatML-like, no {% generation %} blocks: the assistant tokens are found by rendering
turn by turn, three renders per reply). Each configuration tokenizes into a fresh cache folder with
`corpus.tokenize_files(..., encoder=ChatEncoder(tokenizer), workers=N)`; "rerun" reads the same data again
(the cache: nothing tokenized); "pack" packs the cached conversations into blocks of --block tokens
(`packing.pack_on_disk`). Reported: seconds, conversations/s, tokens/s (the conversations' tokens) and MB/s
of the file.

Run: python benchmarks/chat_data.py [--conversations 60000] [--workers 1 2] [--block 2048]
The figures are ratios within one run; on a shared machine the absolute rates drift run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import pydoc_data.topics
import random
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
            start = time.perf_counter()
            stream = corpus.tokenize_files(
                [data], encoder=ChatEncoder(tokenizer), cache_dir=cache, workers=workers
            )
            rows.append(
                (f"tokenize, {workers} worker{'s' if workers > 1 else ''}", time.perf_counter() - start)
            )
            assert not stream.cached
        start = time.perf_counter()
        again = corpus.tokenize_files([data], encoder=ChatEncoder(tokenizer), cache_dir=cache)
        rows.append(("rerun (cache)", time.perf_counter() - start))
        assert again.cached
        start = time.perf_counter()
        _, report = packing.pack_on_disk(
            stream.streams, path=cache / "packed.int32", block_size=args.block, pad_token_id=0
        )
        rows.append((f"pack into {report.blocks:,} blocks of {args.block}", time.perf_counter() - start))
        tokens = stream.tokens.numel()
        print(f"{tokens:,} tokens")
        print("| | seconds | conversations/s | tokens/s | MB/s |")
        print("|---|---|---|---|---|")
        for name, seconds in rows:
            print(
                f"| {name} | {seconds:.2f} | {args.conversations / seconds:,.0f} | {tokens / seconds:,.0f} | "
                f"{size / 1e6 / seconds:.1f} |"
            )


if __name__ == "__main__":
    main()
