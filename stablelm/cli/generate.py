"""Continue a prompt, streaming the new text to stdout as the model makes it.

The prompt is the argument, or stdin (UTF-8) when there is none (or it is "-"), its final newline
dropped. Only the new text goes to stdout, followed by a newline; everything else goes to stderr. With
--json, stdout gets one JSON object instead: {"prompt", "text", "prompt_tokens", "tokens",
"finish_reason"} ("stop": the model's end token or a --stop string; "length": -n or the context ran out).
The text never goes past the model's context: a prompt that fills it is an error, and -n is lowered to
the room left.

examples:
  stablelm generate "The for statement"
  stablelm generate -m stabilityai/stablelm-2-1_6b -n 64 --temperature 0 "The capital of France is"
  echo "def fibonacci(n):" | stablelm generate -m ./my-model --stop "\\n\\n" --seed 0 -v
  stablelm generate --json -n 32 "The for statement" | jq -r .text
  stablelm generate --temperature 0 --prompt-lookup 10 "$(cat notes.txt)"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from .errors import UsageError
from .options import (
    add_compile_option,
    add_load_options,
    add_output_options,
    add_sampling_options,
    bounded,
    compile_notice,
    describe_sampling,
    generation_config,
)

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
    add_compile_option(parser)
    group = parser.add_argument_group(
        "speculative decoding",
        "Draft tokens cheaply and check them in one pass of the model: the same text at --temperature 0,\n"
        "the same distribution when sampling; faster when the drafts are often right.",
    )
    group.add_argument(
        "--prompt-lookup",
        type=bounded(int, low=1),
        metavar="N",
        help="draft up to N tokens from what followed the last words earlier in the prompt or text (for "
        "output that repeats the prompt: summaries, edits, quotes)",
    )
    group.add_argument(
        "--draft-model",
        metavar="PATH",
        help="draft with this smaller model, which must share the model's tokenizer",
    )
    add_output_options(
        parser,
        json_help='print one JSON object {"prompt", "text", "prompt_tokens", "tokens", "finish_reason"} '
        "at the end instead of the text",
    )


def run(args: argparse.Namespace) -> int:
    from .loading import load
    from .stream import TextStream

    prompt = read_prompt(args.prompt)
    stops = [unescape(stop) for stop in args.stop]
    if not all(stops):
        raise UsageError("--stop needs a non-empty string")
    if args.prompt_lookup is not None and args.draft_model:
        raise UsageError("pass one of --prompt-lookup and --draft-model: both draft tokens")
    if args.compile and (args.prompt_lookup is not None or args.draft_model):
        raise UsageError(
            "--compile compiles the one-token step, which --prompt-lookup and --draft-model do not use"
        )
    loaded = load(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    draft = load_draft(args, loaded)
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    config = generation_config(  # a prompt that fills the context is an error, with what to do
        model, tokenizer, args, prompt_tokens=input_ids.shape[1], default_new_tokens=DEFAULT_NEW_TOKENS
    )
    stream = TextStream(
        model,
        tokenizer,
        input_ids,
        config=config,
        generator=loaded.generator(args.seed),
        stops=stops,
        draft=draft,
    )
    if args.verbose:
        print(loaded.describe(), file=sys.stderr)
        print(args.threads_note, file=sys.stderr)
        print(f"sampling: {describe_sampling(config, seed=args.seed)}", file=sys.stderr)
    if args.compile:
        compile_notice()
    if args.json:
        text = "".join(stream)
        record = {
            "prompt": prompt,
            "text": text,
            "prompt_tokens": stream.stats.prompt_tokens,
            "tokens": stream.stats.new_tokens,
            "finish_reason": finish_reason(stream.stats.finish),
        }
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    elif args.no_stream:
        sys.stdout.write("".join(stream) + "\n")
    else:
        for chunk in stream:
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
    sys.stdout.flush()
    if stream.stats.new_tokens <= 1 and stream.stats.finish == "eos" and not args.json:
        print(EMPTY_NOTE if config.do_sample else EMPTY_NOTE_GREEDY, file=sys.stderr)
    if args.verbose:
        print(*stream.stats.describe(), sep="\n", file=sys.stderr)
        if draft is not None:
            s = draft.stats
            print(
                f"speculative: {s.accepted} of {s.drafted} draft tokens kept ({s.acceptance:.0%}), "
                f"{s.tokens} tokens in {s.passes} passes of the model",
                file=sys.stderr,
            )
    return 0


def load_draft(args: argparse.Namespace, loaded: Any) -> Any:
    """The drafter --prompt-lookup or --draft-model asks for (None without them).

    Raises:
        UsageError: The draft model cannot be loaded, or its tokenizer or vocabulary is not the model's.
    """
    from ..generation import GenerationConfig
    from ..generation.drafts import make_draft

    if args.prompt_lookup is not None:
        return make_draft(loaded.model, GenerationConfig(prompt_lookup_num_tokens=args.prompt_lookup))
    if not args.draft_model:
        return None
    from ..fast import optimize_for_inference
    from ..heads import StableLmForCausalLM
    from ..tokenizer import AutoTokenizer

    path = Path(args.draft_model)
    try:
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            if AutoTokenizer.from_pretrained(path).get_vocab() != loaded.tokenizer.get_vocab():
                raise ValueError(
                    "its tokenizer is not the model's; drafts must use the model's tokens: pass a draft "
                    "model trained with the same tokenizer"
                )
        draft_model = StableLmForCausalLM.from_pretrained(path, dtype=args.dtype, device=args.device)
        return make_draft(loaded.model, GenerationConfig(), optimize_for_inference(draft_model))
    except (OSError, ValueError) as err:
        raise UsageError(f"--draft-model {args.draft_model}: {err}") from None


EMPTY_NOTE = (
    "(the model ended the text at once: its end-of-text token came first; run again for another sample, "
    "or pass --temperature 0 for the most likely continuation)"
)
EMPTY_NOTE_GREEDY = (
    "(the model ended the text at once: its end-of-text token is the most likely continuation of this "
    "prompt; change the prompt, or sample with a --temperature above 0)"
)


def finish_reason(finish: str | None) -> str:
    """The JSON output's finish_reason (OpenAI's words): "stop" for the model's end token or a stop
    string, "length" for -n or the end of the context, and "interrupted"."""
    return "stop" if finish in ("eos", "stop string") else finish or "length"


def read_prompt(argument: str | None) -> str:
    """The prompt argument, or stdin's text (UTF-8) without its final line break.

    Raises:
        UsageError: The prompt is empty or only whitespace, stdin is closed, or it is not UTF-8 text.
    """
    if argument is None or argument == "-":
        argument = read_stdin_text("the prompt")
        argument = argument.removesuffix("\n").removesuffix("\r")
    elif any("\udc80" <= c <= "\udcff" for c in argument):  # bytes Python could not decode from argv
        decode_utf8(os.fsencode(argument), "the prompt argument")
    if not argument.strip():
        raise UsageError("the prompt is empty: pass it as an argument or on stdin")
    return argument


def read_stdin_text(what: str) -> str:
    """All of stdin, decoded as UTF-8; a clear UsageError when stdin is closed or is not UTF-8."""
    stdin = sys.stdin
    if stdin is None or getattr(stdin, "buffer", None) is None:
        raise UsageError(f"stdin is closed, and {what} is read from it: pass {what} as an argument")
    if stdin.isatty():
        print(f"stablelm: reading {what} from the terminal; end it with Ctrl-D", file=sys.stderr)
    try:
        data = stdin.buffer.read()
    except OSError as err:  # a closed or unreadable descriptor
        raise UsageError(f"cannot read {what} from stdin ({err.strerror or err})") from None
    return decode_utf8(data, f"{what} on stdin")


def decode_utf8(data: bytes, what: str) -> str:
    """`data` as UTF-8 text; a UsageError naming `what` and the first bad byte when it is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(
            f"{what} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}): "
            "convert it, e.g. with iconv -t UTF-8"
        ) from None


def unescape(text: str) -> str:
    r"""`text` with \n, \t, \r and \\ turned into the characters they name (so a shell can pass them)."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[0]), text)
