"""Encoding and decoding a 100 KB document: this package's tokenizer against the reference's fast tokenizer.

Both run the same tokenizer.json in one process, loaded from the same checkpoint folder (the test fixtures
plus a config.json, as a StableLM checkpoint ships). Each timing is the best of several repeats.
Run: python benchmarks/tokenizer_speed.py [--repeats 20] [--file document.txt]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import transformers

from stablelm.tokenizer import AutoTokenizer

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def mixed_document(size: int = 100_000, seed: int = 0) -> str:
    """About `size` bytes of prose, code, numbers, CJK and emoji."""
    rng = random.Random(seed)
    words = "the of and a to in is you that it he was for on are as with his they at be this have".split()
    parts, length = [], 0
    while length < size:
        piece = rng.choice(
            [
                " ".join(rng.choice(words) for _ in range(rng.randrange(5, 40))).capitalize() + ". ",
                f"\n{' ' * rng.randrange(9)}x_{rng.randrange(10**6)} =\t{rng.random() * 1e4:.3f}  # note\n",
                "".join(chr(rng.choice([0x4E00, 0x1F600, 0x00E0]) + rng.randrange(64)) for _ in range(9)),
            ]
        )
        parts.append(piece)
        length += len(piece.encode())
    return "".join(parts)


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def cases(ours, ref, document: str, ids: list[int]) -> list[tuple[str, Callable, Callable]]:
    """(label, our call, the reference's call) for each timed operation."""
    return [
        ("encode (lists)", lambda: ours(document), lambda: ref(document)),
        (
            "encode (pt)",
            lambda: ours(document, return_tensors="pt"),
            lambda: ref(document, return_tensors="pt"),
        ),
        ("decode", lambda: ours.decode(ids), lambda: ref.decode(ids)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--file", type=Path, help="a text file to encode instead of the generated document")
    args = parser.parse_args()
    document = args.file.read_text(encoding="utf-8") if args.file else mixed_document()
    transformers.logging.set_verbosity_error()
    print(f"document: {len(document.encode()) / 1000:.1f} KB, transformers {transformers.__version__}")
    for name in ("gpt-neox-20b", "cl100k-dolma2"):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(shutil.copytree(FIXTURES / name, Path(tmp) / name))
            (folder / "config.json").write_text(json.dumps({"model_type": "stablelm"}))
            ours, ref = (
                AutoTokenizer.from_pretrained(folder),
                transformers.AutoTokenizer.from_pretrained(folder),
            )
        ids = ours(document)["input_ids"]
        assert ids == ref(document)["input_ids"], "the two tokenizers disagree"
        print(f"\n{name}: {len(ids)} tokens")
        for label, ours_fn, ref_fn in cases(ours, ref, document, ids):
            t_ours, t_ref = best_seconds(ours_fn, args.repeats), best_seconds(ref_fn, args.repeats)
            print(
                f"  {label:15s} ours {t_ours * 1e3:7.2f} ms   reference {t_ref * 1e3:7.2f} ms   "
                f"speed-up x{t_ref / t_ours:.2f}"
            )


if __name__ == "__main__":
    main()
