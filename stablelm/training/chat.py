"""Chat fine-tuning data: conversations rendered with the chat template, labelled, packed apart.

A chat data file is JSON lines of `{"messages": [{"role": ..., "content": ...}, ...]}` (the layout of the
field's chat datasets). Each conversation is rendered with the tokenizer's chat template and tokenized; its
labels are its token ids where the loss is taken and -100 elsewhere: on the assistant's tokens only
(`loss_on="assistant"`, the default), or on every token (`"all"`). The first token of each conversation is
never a label, so no conversation is predicted from the one packed before it.

The assistant's tokens are found as the reference finds them. A template with `{% generation %}` blocks
marks them itself (as `apply_chat_template(..., return_assistant_tokens_mask=True)` reads them); for any
other template, each assistant message's text is what rendering the conversation up to that message adds
to rendering it up to the message before with the generation prompt (the incremental rendering of TRL's
SFT trainer): the reply and the template's end of turn, not the header the generation prompt writes.

Conversations are then packed whole into blocks by `packing` (best-fit decreasing, positions restarting at
0 for each conversation). At scale, `ChatEncoder` is the chat data's encoder for `corpus.tokenize_files`:
the files are streamed in pieces, rendered and tokenized in worker processes and cached by content hash
like text, and `packing.pack_on_disk` packs the cached conversations into a memory-mapped file. A chat data
file is JSON lines, or Parquet with a "messages" column (a list of {"role", "content"} structs per row).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..tokenizer import Tokenizer
from ..tokenizer.chat_template import ChatTemplateError, render_chat_template
from ..tokenizer.generation_spans import GENERATION_TAG, assistant_mask, render_with_generation_spans
from .corpus import Piece, backend_of, json_digest, jsonl_lines, parquet_pieces
from .data import JSONL_SUFFIXES, PARQUET_SUFFIXES, find_files
from .packing import IGNORE_INDEX, LabelledBlocks, PackingReport, pack_conversations
from .parquet import parquet_columns, parquet_rows

__all__ = [
    "IGNORE_INDEX",
    "LOSS_ON",
    "ChatEncoder",
    "Conversation",
    "LabelledBlocks",
    "PackingReport",
    "encode_conversation",
    "encode_conversations",
    "is_chat_data",
    "pack_conversations",
    "read_conversations",
]

LOSS_ON = ("assistant", "all")
ROLES = ("system", "user", "assistant", "tool")
_LAYOUT = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


@dataclass(frozen=True)
class Conversation:
    """One conversation of a chat data file, and where it came from ("file:line", for messages)."""

    messages: list[dict[str, str]]
    source: str


def is_chat_data(paths: Sequence[str | os.PathLike]) -> bool:
    """Whether the data files of `paths` are chat data: JSON-lines files whose first record has "messages", or
    Parquet files with a "messages" column.

    Raises:
        ValueError: Some files are chat data and others are not (a run trains on one kind).
    """
    kinds = {path: _first_record_is_chat(path) for path in find_files(paths)}
    if len(set(kinds.values())) > 1:
        chat = next(str(p) for p, is_chat in kinds.items() if is_chat)
        text = next(str(p) for p, is_chat in kinds.items() if not is_chat)
        raise ValueError(
            f'The data mixes chat conversations ({chat} has "messages") with plain text ({text}); train on '
            "one kind at a time (convert the text to conversations, or the conversations to text)."
        )
    return any(kinds.values())


def _first_record_is_chat(path: Path) -> bool:
    if path.suffix in PARQUET_SUFFIXES:
        try:
            return "messages" in parquet_columns(path)
        except (ImportError, ValueError):
            return False  # tokenize_files names the problem
    if path.suffix not in JSONL_SUFFIXES:
        return False
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    record = json.loads(raw)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    return False  # read_documents names the problem
                return isinstance(record, dict) and "messages" in record
    return False


def read_conversations(paths: Sequence[str | os.PathLike]) -> list[Conversation]:
    """The conversations of the chat data files named by `paths`, each checked, in memory (for small data;
    `stablelm train` streams them through `corpus.tokenize_files` with a `ChatEncoder`).

    Raises:
        FileNotFoundError: A path does not exist.
        ValueError: A line is not UTF-8 or not JSON, has no "messages" list, or a message is not an object
            with a known "role" and a string "content" (the message names the file and line); or there is
            no conversation at all.
    """
    conversations = []
    for path in find_files(paths):
        if path.suffix in PARQUET_SUFFIXES:
            pieces = parquet_pieces(path, "messages")
        else:
            pieces = [
                Piece("jsonl" if path.suffix in JSONL_SUFFIXES else "text", path, 0, path.stat().st_size)
            ]
        for piece in pieces:
            conversations += _piece_conversations(piece)
    if not conversations:
        raise _no_conversation(paths)
    return conversations


def _no_conversation(paths: Sequence[str | os.PathLike]) -> ValueError:
    return ValueError(f"The chat data ({', '.join(map(str, paths))}) holds no conversation.")


def _piece_conversations(piece: Piece) -> Iterator[Conversation]:
    """The checked conversations of a piece of a chat data file, one at a time."""
    if piece.kind == "parquet":
        first, rows = parquet_rows(piece.path, "messages", group=piece.offset)
        for number, messages in enumerate(rows, start=first):
            source = f"{piece.path}: row {number}"
            yield Conversation(check_messages(source, {"messages": messages}), source)
        return
    if piece.kind != "jsonl":
        raise ValueError(
            f"{piece.path}: chat data is JSON lines (.jsonl), one {_LAYOUT} per line, or Parquet with a "
            '"messages" column.'
        )
    for number, line in jsonl_lines(piece):
        if line.strip():
            source = f"{piece.path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{source} is not valid JSON ({err}); each line must be {_LAYOUT}."
                ) from None
            yield Conversation(check_messages(source, record), source)


def check_messages(source: str, record: Any) -> list[dict[str, str]]:
    """The messages of a chat record (a JSON line's object, a Parquet row), checked; errors name `source`.

    Raises:
        ValueError: No "messages" list, an empty one, or a message that is not an object with a known "role"
            and a string "content".
    """
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list):
        raise ValueError(f'{source} has no "messages" list; each line must be {_LAYOUT}.')
    if not messages:
        raise ValueError(f'{source}: "messages" is empty; a conversation needs at least one message.')
    for index, message in enumerate(messages):
        where = f"{source}: message {index}"
        if not isinstance(message, dict):
            raise ValueError(
                f'{where} is a {type(message).__name__}, not an object with "role" and "content".'
            )
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{where} has role {role!r}; use one of {', '.join(ROLES)}.")
        if not isinstance(content, str):
            raise ValueError(
                f'{where} ({role}) has {"no" if content is None else "a non-string"} "content"; it must be '
                "a string."
            )
    return [dict(message) for message in messages]


def encode_conversation(
    tokenizer: Tokenizer, messages: Sequence[dict[str, str]], *, loss_on: str = "assistant"
) -> tuple[list[int], list[int]]:
    """A conversation's token ids and labels (-100 where no loss is taken, and on the first token).

    Raises:
        ValueError: No chat template, `loss_on` unknown, or a template that the incremental rendering cannot
            split into turns.
        ChatTemplateError: The template refused the conversation.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r} (--loss-on).")
    template, variables = tokenizer.get_chat_template(), dict(tokenizer.special_tokens_map)
    return _encode(tokenizer.backend_tokenizer, template, variables, messages, loss_on=loss_on)


def _encode(
    backend: Any,
    template: str,
    variables: dict[str, Any],
    messages: Sequence[dict[str, str]],
    *,
    loss_on: str,
) -> tuple[list[int], list[int]]:
    if GENERATION_TAG.search(template):
        text, spans = render_with_generation_spans(template, messages, variables=variables)
    else:
        text, spans = _incremental_spans(template, messages, variables)
    encoding = backend.encode(text, add_special_tokens=False)
    ids = list(encoding.ids)
    if loss_on == "all":
        labels = list(ids)
    else:
        mask = assistant_mask(encoding.offsets, spans)
        labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask, strict=True)]
    if labels:
        labels[0] = IGNORE_INDEX
    return ids, labels


class ChatEncoder:
    """Chat data for `corpus.tokenize_files`: each conversation rendered with the chat template and
    tokenized into three streams, "ids", "labels" (-100 where no loss is taken) and "lengths" (one per
    conversation), which `packing.pack_on_disk` packs. Errors name the file and line (or Parquet row)."""

    kind, streams, column = "chat", ("ids", "labels", "lengths"), "messages"

    def __init__(self, tokenizer: Tokenizer, *, loss_on: str = "assistant") -> None:
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r} (--loss-on).")
        self.backend = tokenizer.backend_tokenizer
        self.tokenizer_json, self.loss_on = self.backend.to_str(), loss_on
        self.tokenizer_digest = json_digest(self.tokenizer_json)
        self.template, self.variables = tokenizer.get_chat_template(), dict(tokenizer.special_tokens_map)

    def __getstate__(self) -> dict[str, Any]:  # workers rebuild the tokenizer from its JSON
        return {**self.__dict__, "backend": None}

    def fingerprint(self) -> bytes:
        parts = (
            self.tokenizer_digest,
            self.template,
            json.dumps(self.variables, sort_keys=True),
            self.loss_on,
        )
        return "\n".join(parts).encode()

    def encode(self, piece: Piece) -> tuple[list[bytes], int]:
        ids, labels, lengths = array.array("i"), array.array("i"), array.array("i")
        backend = backend_of(self)
        for conversation in _piece_conversations(piece):
            with _naming(conversation):
                tokens, targets = _encode(
                    backend, self.template, self.variables, conversation.messages, loss_on=self.loss_on
                )
            ids.extend(tokens)
            labels.extend(targets)
            lengths.append(len(tokens))
        return [ids.tobytes(), labels.tobytes(), lengths.tobytes()], len(lengths)

    def empty_error(self, paths: Sequence[str | os.PathLike]) -> ValueError:
        return _no_conversation(paths)


@contextlib.contextmanager
def _naming(conversation: Conversation) -> Iterator[None]:
    """Errors of rendering a conversation, as ValueErrors that name its file and line."""
    try:
        yield
    except ChatTemplateError as err:
        raise ValueError(f"{conversation.source}: the chat template refused it: {err}") from None
    except ValueError as err:
        raise ValueError(f"{conversation.source}: {err}") from None


def _incremental_spans(
    template: str, messages: Sequence[dict[str, str]], variables: dict[str, Any]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and each assistant message's span: what rendering up to that message adds
    to rendering the messages before it with the generation prompt."""
    text = render_chat_template(template, messages, variables=variables)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_prefix(template, messages[:index], variables)
        upto = render_chat_template(template, messages[: index + 1], variables=variables)
        if not upto.startswith(before) or not text.startswith(upto):
            raise ValueError(
                "The chat template renders a conversation differently from its beginning (the text up to "
                f"assistant message {index} is not a prefix of the whole), so its assistant tokens cannot be "
                "found by rendering turn by turn; use a template that marks them with {% generation %} "
                "blocks, or --loss-on all."
            )
        spans.append((len(before), len(upto)))
    return text, spans


def _render_prefix(template: str, messages: Sequence[dict[str, str]], variables: dict[str, Any]) -> str:
    if messages:
        return render_chat_template(template, messages, add_generation_prompt=True, variables=variables)
    # A conversation that opens with the assistant: only the generation prompt comes before it, which is
    # what the prompt adds after any first message (an empty conversation is not rendered).
    probe = [{"role": "user", "content": ""}]
    plain = render_chat_template(template, probe, variables=variables)
    prompted = render_chat_template(template, probe, add_generation_prompt=True, variables=variables)
    if not prompted.startswith(plain):
        raise ValueError(
            "The chat template's generation prompt changes the text before it, so the assistant tokens of a "
            "conversation that opens with the assistant cannot be found; use --loss-on all."
        )
    return prompted[len(plain) :]


def encode_conversations(
    tokenizer: Tokenizer, conversations: Sequence[Conversation], *, loss_on: str = "assistant"
) -> list[tuple[list[int], list[int]]]:
    """`encode_conversation` of each, with the conversation's file and line in any error."""
    encoded = []
    for conversation in conversations:
        with _naming(conversation):
            encoded.append(encode_conversation(tokenizer, conversation.messages, loss_on=loss_on))
    return encoded
