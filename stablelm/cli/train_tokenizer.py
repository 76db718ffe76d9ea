"""Train a byte-level BPE tokenizer on text files or JSON lines, for `stablelm train --tokenizer`.

Reads the same --data as `stablelm train` (.txt/.md/.rst files, .jsonl files with a "text" field per line,
or folders of them) and writes tokenizer.json, tokenizer_config.json and special_tokens_map.json to
--output-dir, which this package and the reference both load. The special tokens are <|endoftext|>
(id 0: bos, eos and unk) and <|padding|> (id 1: pad), then --extra-special-tokens. The same data gives the
same tokenizer.

examples:
  stablelm train-tokenizer --data docs/ --vocab-size 4096 --output-dir tok
  stablelm train-tokenizer --data chat.jsonl --vocab-size 8192 --extra-special-tokens "<|user|>" "<|assistant|>" \\
      --model-max-length 2048 --output-dir tok
"""

from __future__ import annotations

import argparse
import sys

from .options import bounded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", nargs="+", required=True, metavar="PATH", help="text files or folders to learn from"
    )
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="where the tokenizer files go")
    parser.add_argument(
        "--vocab-size",
        type=bounded(int, low=258),
        default=8192,
        metavar="N",
        help="tokens in the vocabulary, special tokens included (default: 8192)",
    )
    parser.add_argument(
        "--min-frequency",
        type=bounded(int, low=1),
        default=2,
        metavar="N",
        help="merge only pairs seen at least this often (default: 2)",
    )
    parser.add_argument(
        "--model-max-length",
        type=bounded(int, low=1),
        metavar="N",
        help="the model's context, which truncation=True cuts to (default: none)",
    )
    parser.add_argument(
        "--extra-special-tokens", nargs="+", default=[], metavar="TOKEN", help="further special tokens"
    )


def run(args: argparse.Namespace) -> int:
    from ..training import read_documents, train_tokenizer  # here, so that --help does not load torch
    from ..training.checkpoints import check_output_dir
    from ..training.wording import plural

    check_output_dir(args.output_dir, name="--output-dir")  # before training, which can take minutes
    documents = read_documents(args.data)
    tokenizer = train_tokenizer(
        documents,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        model_max_length=args.model_max_length,
        extra_special_tokens=args.extra_special_tokens,
    )
    tokenizer.save_pretrained(args.output_dir)
    print(
        f"trained a {len(tokenizer):,}-token tokenizer on {plural(len(documents), 'document')}; saved in "
        f"{args.output_dir}",
        file=sys.stderr,
    )
    return 0
