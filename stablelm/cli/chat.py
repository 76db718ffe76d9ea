"""Chat with a model in its chat template, keeping the conversation; replies stream as they are made.

Type a message and press Enter; /help lists the commands, /exit or Ctrl-D leaves. Ctrl-C stops a reply
(the part already shown stays in the conversation); at the prompt it only says how to leave.
Through a pipe, each line of stdin is one message and stdout gets each reply on a line of its own.

examples:
  stablelm chat -m stabilityai/stablelm-2-zephyr-1_6b --system "You answer in one sentence."
  printf 'Hi!\\nWhat did I just say?\\n' | stablelm chat -m ./my-chat-model --temperature 0
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .errors import CliError
from .loading import Loaded, load
from .options import (
    add_load_options,
    add_output_options,
    add_sampling_options,
    describe_sampling,
    generation_config,
)
from .stream import TextStream

DEFAULT_NEW_TOKENS = 1024
PROMPT = ">>> "
EXIT_COMMANDS = ("/exit", "/quit", "/bye")
COMMAND_HELP = """\
/help   show this help
/reset  forget the conversation (the --system prompt stays)
/exit   leave (so do /quit, /bye and Ctrl-D)
Ctrl-C stops a reply; the part already shown stays in the conversation."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_load_options(parser)
    parser.add_argument("--system", metavar="TEXT", help="a system prompt that opens the conversation")
    add_sampling_options(parser, default_new_tokens=DEFAULT_NEW_TOKENS)
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    return Chat(load(args), args).loop()


class Chat:
    """One conversation: reads messages, streams replies, keeps the history the template renders."""

    def __init__(self, loaded: Loaded, args: argparse.Namespace) -> None:
        self.loaded, self.args = loaded, args
        self.generator = loaded.generator(args.seed)
        self.interactive = sys.stdin.isatty()
        self.messages = self._opening()
        self._check_template()

    def loop(self) -> int:
        """Read and answer messages until /exit or the end of input."""
        if self.interactive:
            try:
                import readline  # noqa: F401 - line editing and history for input()
            except ImportError:  # not on every platform
                pass
            print(f"Chatting with {self.loaded.source}. /help lists the commands.", file=sys.stderr)
        if self.args.verbose:
            print(self.loaded.describe(), file=sys.stderr)
        while (line := self._read()) is not None:
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self._command(text):
                    break
                continue
            self._reply(text)
        return 0

    def _opening(self) -> list[dict[str, Any]]:
        return [{"role": "system", "content": self.args.system}] if self.args.system else []

    def _check_template(self) -> None:
        """Fail before the first message on a model without a chat template (or one that rejects ours)."""
        tokenizer = self.loaded.tokenizer
        if tokenizer.chat_template is None:
            raise CliError(
                f"{self.loaded.source} has no chat template (tokenizer_config.json sets no chat_template), "
                "so it cannot chat: use 'stablelm generate' to continue text, or pick a chat model"
            )
        trial = [*self.messages, {"role": "user", "content": "Hello"}]
        tokenizer.apply_chat_template(trial, add_generation_prompt=True, tokenize=False)

    def _read(self) -> str | None:
        """The next line typed or piped in; None at the end of input."""
        try:
            if self.interactive and not sys.stdout.isatty():  # stdout is a file: keep the prompt out of it
                print(PROMPT, end="", file=sys.stderr, flush=True)
                return input()
            return input(PROMPT if self.interactive else "")
        except EOFError:
            if self.interactive:
                print()
            return None
        except KeyboardInterrupt:
            print("\n(Ctrl-C stops a reply; /exit or Ctrl-D leaves)", file=sys.stderr)
            return ""

    def _command(self, text: str) -> bool:
        """Run a /command; False means leave."""
        name = text.split()[0].lower()
        if name in EXIT_COMMANDS:
            return False
        if name == "/reset":
            self.messages = self._opening()
            print("(conversation reset)", file=sys.stderr)
        elif name in ("/help", "/?"):
            print(COMMAND_HELP, file=sys.stderr)
        else:
            print(f"unknown command {name}: /help lists the commands", file=sys.stderr)
        return True

    def _reply(self, text: str) -> None:
        """Answer `text`, streaming to stdout; Ctrl-C stops the reply and keeps what was shown."""
        self.messages.append({"role": "user", "content": text})
        shown: list[str] = []
        stream = None
        interrupted = False
        try:
            stream = self._stream()
            for chunk in stream or ():
                sys.stdout.write(chunk)
                sys.stdout.flush()
                shown.append(chunk)
        except KeyboardInterrupt:
            interrupted = True
        if shown:
            self.messages.append({"role": "assistant", "content": "".join(shown)})
        else:  # nothing was said: forget the message, so that the roles keep alternating
            self.messages.pop()
        sys.stdout.write("\n")  # one line per message, even an unanswered one, so that pipes stay aligned
        sys.stdout.flush()
        if interrupted:
            print("[reply stopped]", file=sys.stderr)
        if self.args.verbose and stream is not None:
            stream.stats.finish = "interrupted" if interrupted else stream.stats.finish
            print(*stream.stats.describe(), sep="\n", file=sys.stderr)

    def _stream(self) -> TextStream | None:
        """The reply to the conversation so far, or None (and a note) when it no longer fits the context."""
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        ids = tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids.to(model.device)
        context = model.config.max_position_embeddings
        if ids.shape[1] >= context:
            print(
                f"stablelm: the conversation ({ids.shape[1]} tokens) fills the model's context ({context}): "
                "/reset to start again",
                file=sys.stderr,
            )
            return None
        config = generation_config(
            model, tokenizer, self.args, prompt_tokens=ids.shape[1], default_new_tokens=DEFAULT_NEW_TOKENS
        )
        if self.args.verbose:
            print(f"sampling: {describe_sampling(config, seed=self.args.seed)}", file=sys.stderr)
        return TextStream(model, tokenizer, ids, config=config, generator=self.generator)
