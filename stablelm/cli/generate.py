"""Continue a prompt, streaming the new text to stdout as the model makes it.

The prompt is the argument, or stdin when there is none (or it is "-"), its final newline dropped.
Only the new text goes to stdout, followed by a newline; everything else goes to stderr.

examples:
  stablelm generate "The for statement"
  stablelm generate -m stabilityai/stablelm-2-1_6b -n 64 --temperature 0 "The capital of France is"
  echo "def fibonacci(n):" | stablelm generate -m ./my-model --stop "\\n\\n" --seed 0 -v
"""

from __future__ import annotations

import argparse
import re
import sys

from .errors import UsageError
from .loading import load
from .options import (
    add_load_options,
    add_output_options,
    add_sampling_options,
    describe_sampling,
    generation_config,
)
from .stream import TextStream

DEFAULT_NEW_TOKENS = 256
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the text to continue (default: read from stdin)")
    add_load_options(parser)
    add_sampling_options(parser, default_new_tokens=DEFAULT_NEW_TOKENS)
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STRING",
        help=r"end the text just before STRING; repeat for several (\n and \t mean newline and tab)",
    )
    parser.add_argument(
        "--no-stream", action="store_true", help="print the text at the end instead of as it is made"
    )
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    prompt = read_prompt(args.prompt)
    stops = [unescape(stop) for stop in args.stop]
    if not all(stops):
        raise UsageError("--stop needs a non-empty string")
    loaded = load(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    config = generation_config(
        model, tokenizer, args, prompt_tokens=input_ids.shape[1], default_new_tokens=DEFAULT_NEW_TOKENS
    )
    stream = TextStream(
        model, tokenizer, input_ids, config=config, generator=loaded.generator(args.seed), stops=stops
    )
    if args.verbose:
        print(loaded.describe(), file=sys.stderr)
        print(f"sampling: {describe_sampling(config, seed=args.seed)}", file=sys.stderr)
    if args.no_stream:
        sys.stdout.write("".join(stream))
    else:
        for chunk in stream:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose:
        print(*stream.stats.describe(), sep="\n", file=sys.stderr)
    return 0


def read_prompt(argument: str | None) -> str:
    """The prompt argument, or stdin's text without its final line break.

    Raises:
        UsageError: The prompt is empty or only whitespace.
    """
    if argument is None or argument == "-":
        if sys.stdin.isatty():
            print("stablelm: reading the prompt from the terminal; end it with Ctrl-D", file=sys.stderr)
        argument = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    if not argument.strip():
        raise UsageError("the prompt is empty: pass it as an argument or on stdin")
    return argument


def unescape(text: str) -> str:
    r"""`text` with \n, \t, \r and \\ turned into the characters they name (so a shell can pass them)."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[0]), text)
