"""Chat with a model in its chat template, keeping the conversation; replies stream as they are made.

Type a message and press Enter; /help lists the commands, /exit or Ctrl-D leaves. Ctrl-C stops a reply
(the part already shown stays in the conversation); at the prompt it only says how to leave.
A model without a chat template needs --chat-template: a Jinja file, or a built-in format, chatml
(stablelm-2-*-chat) or zephyr (stablelm-zephyr-3b, stablelm-2-zephyr-1_6b).

Through a pipe (stdin not a terminal), each line of stdin (UTF-8) is one message and each reply is one
line of stdout: a line break inside a reply is written as the two characters \\n (and a carriage return
as \\r). For the exact text, use --json: each reply is then one JSON object {"role": "assistant",
"content", "prompt_tokens", "tokens", "finish_reason"}, and an input line may be a JSON object
{"role": "user", "content": ...}, so that a message can hold line breaks. A message that cannot be
answered still gets its line (empty, or with an "error" field); empty lines and /commands are not
messages, and get none.

When the conversation outgrows the model's context, the oldest messages are forgotten (the --system
prompt stays), with a note on stderr; -n is lowered to the room left.

examples:
  stablelm chat -m stabilityai/stablelm-2-zephyr-1_6b --system "You answer in one sentence."
  stablelm chat -m ./base-model-tuned-on-chatml --chat-template chatml
  printf 'Hi!\\nWhat did I just say?\\n' | stablelm chat -m ./my-chat-model --temperature 0
  echo '{"role": "user", "content": "Two lines:\\nfirst, second"}' | stablelm chat --json -m ./my-chat-model
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import CliError, UsageError, one_line
from .options import (
    add_load_options,
    add_output_options,
    add_sampling_options,
    context_room,
    describe_sampling,
    generation_config,
)
from .templates import BUILTIN, ChatFormat, chosen_template, find_template

if TYPE_CHECKING:
    from .loading import Loaded
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
    parser.add_argument(
        "--chat-template",
        metavar="FILE|NAME",
        help=f"the chat format, for a model without a template (or instead of its own): a Jinja file, "
        f"or one of {', '.join(sorted(BUILTIN))}",
    )
    add_sampling_options(parser, default_new_tokens=DEFAULT_NEW_TOKENS)
    add_output_options(
        parser,
        json_help='write each reply as one JSON object {"role", "content", "prompt_tokens", "tokens", '
        '"finish_reason"}; read input lines that are JSON objects {"role": "user", "content": ...}',
    )


def run(args: argparse.Namespace) -> int:
    from .loading import load

    if sys.stdin is None or getattr(sys.stdin, "buffer", None) is None:
        raise UsageError(
            "stdin is closed: chat reads its messages from stdin (a terminal, or a pipe with a message a line)"
        )
    chat_format = find_template(args.chat_template) if args.chat_template else None
    return Chat(load(args), args, chat_format).loop()


@dataclass
class BadLine:
    """A line of input that is not a message (not UTF-8, or a JSON message of the wrong shape)."""

    error: str


class Chat:
    """One conversation: reads messages, streams replies, keeps the history the template renders."""

    def __init__(
        self, loaded: Loaded, args: argparse.Namespace, chat_format: ChatFormat | None = None
    ) -> None:
        self.loaded, self.args = loaded, args
        self.generator = loaded.generator(args.seed)
        self.interactive = sys.stdin.isatty()
        self.json = bool(getattr(args, "json", False))
        self.messages = self._opening()
        self.line_number = 0
        self.answered = 0
        self.template_variables: dict[str, str] = {}
        self.template, self.stops = self._choose_template(chat_format)
        self._check_template()
        self._check_system()

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
            print(self.args.threads_note, file=sys.stderr)
        while (line := self._read()) is not None:
            if isinstance(line, BadLine):
                self._unanswered(line.error)
                continue
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self._command(text):
                    break
                continue
            message = self._message(text)
            if isinstance(message, BadLine):
                self._unanswered(message.error)
                continue
            self._reply(message)
        if not self.interactive and self.line_number == 0:
            print("stablelm: stdin is empty: no message to answer", file=sys.stderr)
        return 0

    # --- the template ---------------------------------------------------------------------------------

    def _check_system(self) -> None:
        """A --system prompt that leaves no room in the context for any message fails at start-up (else
        every message would be refused for it).

        Raises:
            UsageError: The system prompt with an empty message fills the context.
        """
        if not self.args.system:
            return
        try:
            tokens = self._render([*self._opening(), {"role": "user", "content": ""}]).shape[1]
        except Exception:  # noqa: BLE001 - a template that refuses an empty message: checked per message
            return
        room = context_room(self.loaded.model.config, tokens)
        if room is not None and room < 1:
            context = self.loaded.model.config.max_position_embeddings
            raise UsageError(
                f"--system takes {tokens} tokens with the chat template, and the model's context holds "
                f"{context}: shorten it, leaving room for messages and replies"
            )

    def _opening(self) -> list[dict[str, Any]]:
        return [{"role": "system", "content": self.args.system}] if self.args.system else []

    def _choose_template(self, chat_format: ChatFormat | None) -> tuple[str | None, list[str]]:
        """The template to render with (None: the tokenizer's own) and the strings that end a reply.

        Raises:
            UsageError: --chat-template names no file, built-in or template of the tokenizer.
            CliError: No --chat-template, and the tokenizer has no chat template.
        """
        tokenizer = self.loaded.tokenizer
        value = self.args.chat_template
        if value:  # a file, a built-in, or one of the tokenizer's named templates
            template, self.template_variables = chosen_template(tokenizer, value, chat_format)
            stops = chat_format.stops if chat_format is not None else ()
            self._stop_tokens(stops)
            return template, list(stops)
        if tokenizer.chat_template is None:
            raise CliError(
                f"{self.loaded.source} has no chat template (tokenizer_config.json sets no chat_template): "
                f"pass --chat-template with {' or '.join(sorted(BUILTIN))} (the formats StableLM's chat "
                "models use) or a Jinja file, or use 'stablelm generate' to continue text"
            )
        return None, []

    def _stop_tokens(self, stops: tuple[str, ...]) -> None:
        """End replies at those of `stops` the vocabulary holds as single tokens: they may be special
        tokens, which the reply's text leaves out, so that the stop strings would never see them."""
        tokenizer = self.loaded.tokenizer
        ids = []
        for stop in stops:
            found = tokenizer.convert_tokens_to_ids(stop)
            if found is not None and (stop == tokenizer.unk_token or found != tokenizer.unk_token_id):
                ids.append(found)
        self.args.extra_eos_ids = ids

    def _check_template(self) -> None:
        """Fail before the first message on a template that does not render a conversation."""
        trial = [*self.messages, {"role": "user", "content": "Hello"}]
        try:
            self._render(trial, tokenize=False)
        except (ValueError, TypeError) as err:
            where = (
                f"--chat-template {self.args.chat_template}"
                if self.args.chat_template
                else "the chat template"
            )
            raise CliError(f"{where} does not render a conversation: {one_line(str(err))}") from None

    def _render(self, messages: list[dict[str, Any]], *, tokenize: bool = True) -> Any:
        return self.loaded.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=tokenize,
            return_tensors="pt" if tokenize else None,
            return_dict=False,
            chat_template=self.template,
            **self.template_variables,
        )

    # --- input --------------------------------------------------------------------------------------

    def _read(self) -> str | BadLine | None:
        """The next line typed or piped in; None at the end of input."""
        if not self.interactive:
            raw = sys.stdin.buffer.readline()
            if not raw:
                return None
            self.line_number += 1
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return BadLine(
                    f"line {self.line_number} of stdin is not UTF-8 text (byte 0x{raw[err.start]:02x} at "
                    f"offset {err.start}): skipped"
                )
        try:
            if not sys.stdout.isatty():  # stdout is a file: keep the prompt out of it
                print(PROMPT, end="", file=sys.stderr, flush=True)
                line = input()
            else:
                line = input(PROMPT)
            self.line_number += 1
            return line
        except EOFError:
            print()
            return None
        except UnicodeDecodeError:
            return BadLine("that line is not UTF-8 text: check the terminal's encoding")
        except KeyboardInterrupt:
            print("\n(Ctrl-C stops a reply; /exit or Ctrl-D leaves)", file=sys.stderr)
            return ""

    def _message(self, text: str) -> dict[str, Any] | BadLine:
        """The user message a line holds: the line itself, or with --json a JSON object's content."""
        if self.json and text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, dict):
                content, role = value.get("content"), value.get("role", "user")
                if role != "user" or not isinstance(content, str) or not content.strip():
                    return BadLine(
                        f'line {self.line_number}: a JSON message needs "role": "user" and a non-empty '
                        f'"content" string, got {one_line(text)[:80]}'
                    )
                return {"role": "user", "content": content}
        return {"role": "user", "content": text}

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

    # --- output -------------------------------------------------------------------------------------

    def _write(self, text: str) -> None:
        """Reply text to stdout: as it is on a terminal; through a pipe with line breaks escaped, so
        that each reply stays on one line."""
        if not self.interactive:
            text = text.replace("\r", "\\r").replace("\n", "\\n")
        sys.stdout.write(text)
        sys.stdout.flush()

    def _unanswered(self, error: str) -> None:
        """A message that gets no reply: the error on stderr, and its (empty) line on stdout."""
        print(f"stablelm: error: {error}", file=sys.stderr)
        if self.json:
            record = {
                "role": "assistant",
                "content": "",
                "tokens": 0,
                "finish_reason": "error",
                "error": error,
            }
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            sys.stdout.write("\n")  # one line per message, so that pipes stay aligned
        sys.stdout.flush()

    def _reply(self, message: dict[str, Any]) -> None:
        """Answer `message`, streaming to stdout; Ctrl-C stops the reply and keeps what was shown."""
        self.messages.append(message)
        try:
            stream = self._stream()
        except CliError as err:  # this message does not fit: it gets no answer, the chat goes on
            self.messages.pop()
            self._unanswered(str(err))
            return
        shown: list[str] = []
        interrupted = False
        try:
            for chunk in stream:
                # kept before it is shown: a Ctrl-C that lands between the two (a busy machine can hold the
                # process right after its write) must not drop text the user already saw
                shown.append(chunk)
                if not self.json:
                    self._write(chunk)
        except KeyboardInterrupt:
            interrupted = True
        text = "".join(shown)
        if text:
            self.messages.append({"role": "assistant", "content": text})
        else:  # nothing was said: forget the message, so that the roles keep alternating
            self.messages.pop()
        finish = "interrupted" if interrupted else stream.stats.finish
        if self.json:
            record = {
                "role": "assistant",
                "content": text,
                "prompt_tokens": stream.stats.prompt_tokens,
                "tokens": stream.stats.new_tokens,
                "finish_reason": "stop" if finish in ("eos", "stop string") else finish or "length",
            }
            sys.stdout.write(json.dumps(record, ensure_ascii=False))
        sys.stdout.write("\n")  # one line per message, even an unanswered one, so that pipes stay aligned
        sys.stdout.flush()
        if interrupted:
            print("[reply stopped]", file=sys.stderr)
        if self.args.verbose:
            stream.stats.finish = finish
            print(*stream.stats.describe(), sep="\n", file=sys.stderr)

    # --- the context --------------------------------------------------------------------------------

    def _stream(self) -> TextStream:
        """The reply to the conversation so far, after forgetting the oldest turns it takes to leave the
        reply room in the context (-n tokens, or a quarter of the context when -n is more).

        Raises:
            CliError: The last message, with the system prompt, does not fit the context by itself.
        """
        from .stream import TextStream

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        context = model.config.max_position_embeddings
        requested = self.args.max_new_tokens or DEFAULT_NEW_TOKENS
        reserve = max(1, min(requested, context // 4))
        alone = [*self._opening(), self.messages[-1]]
        smallest = self._render(alone).shape[1]
        room = context_room(model.config, smallest)
        if room is not None and room < 1:
            what = "this message and the --system prompt take" if self.args.system else "this message takes"
            raise CliError(
                f"{what} {smallest} tokens, and the model's context holds {context}: "
                "send a shorter message (it was not answered; the chat goes on)"
            )
        ids = self._render(self.messages)
        forgotten = 0
        while (room := context_room(model.config, ids.shape[1])) is not None and room < reserve:
            dropped = self._forget_oldest_turn()
            if not dropped:
                break
            forgotten += dropped
            ids = self._render(self.messages)
        if forgotten:
            print(
                f"stablelm: the conversation outgrew the model's context ({context} tokens): forgot the "
                f"{forgotten} oldest message{'s' if forgotten > 1 else ''}"
                + (" (the --system prompt stays)" if self.args.system else ""),
                file=sys.stderr,
            )
        ids = ids.to(model.device)
        config = generation_config(
            model, tokenizer, self.args, prompt_tokens=ids.shape[1], default_new_tokens=DEFAULT_NEW_TOKENS
        )
        if self.args.verbose:
            print(f"sampling: {describe_sampling(config, seed=self.args.seed)}", file=sys.stderr)
        return TextStream(model, tokenizer, ids, config=config, generator=self.generator, stops=self.stops)

    def _forget_oldest_turn(self) -> int:
        """Drop the oldest user message and the reply to it (never the system prompt, nor the message
        being answered); return how many messages went."""
        start = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        if len(self.messages) - start <= 1:
            return 0
        end = start + 1
        if end < len(self.messages) - 1 and self.messages[end]["role"] == "assistant":
            end += 1
        del self.messages[start:end]
        return end - start
