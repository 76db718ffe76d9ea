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

Conversations are packed whole into blocks (best-fit decreasing, as TRL's padding-free packing does), a
conversation longer than a block is cut to the block, and each block's tail is padding with no labels.
Position ids restart at 0 for each conversation: the model then keeps the conversations of a block apart
(a block-diagonal causal mask, see `stablelm.attention.packed_mask`), as the reference does.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..tokenizer import Tokenizer
from ..tokenizer.chat_template import ChatTemplateError, render_chat_template
from ..tokenizer.generation_spans import GENERATION_TAG, assistant_mask, render_with_generation_spans
from .data import JSONL_SUFFIXES, find_files
from .wording import plural

IGNORE_INDEX = -100
LOSS_ON = ("assistant", "all")
ROLES = ("system", "user", "assistant", "tool")
_LAYOUT = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


@dataclass(frozen=True)
class Conversation:
    """One conversation of a chat data file, and where it came from ("file:line", for messages)."""

    messages: list[dict[str, str]]
    source: str


@dataclass
class LabelledBlocks:
    """Packed blocks with their labels and per-document positions, indexed like a (N, T) tensor of ids.

    Attributes:
        input_ids: (N, T) token ids.
        labels: (N, T) the ids where the loss is taken, -100 elsewhere (predicted from the position before).
        position_ids: (N, T) positions, restarting at 0 for each packed document.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: Any) -> LabelledBlocks:
        return LabelledBlocks(self.input_ids[index], self.labels[index], self.position_ids[index])

    def predicted(self) -> torch.Tensor:
        """(N,) the number of tokens each block is trained to predict (its labels other than -100 past the
        first position, which nothing predicts)."""
        return (self.labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def is_chat_data(paths: Sequence[str | os.PathLike]) -> bool:
    """Whether the data files of `paths` are chat data: JSON-lines files whose first record has "messages".

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
    """The conversations of the chat data files named by `paths`, each checked.

    Raises:
        FileNotFoundError: A path does not exist.
        ValueError: A line is not UTF-8 or not JSON, has no "messages" list, or a message is not an object
            with a known "role" and a string "content" (the message names the file and line); or there is
            no conversation at all.
    """
    conversations = []
    for path in find_files(paths):
        if path.suffix not in JSONL_SUFFIXES:
            raise ValueError(f"{path}: chat data is JSON lines (.jsonl), one {_LAYOUT} per line.")
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    source = f"{path}:{number}"
                    conversations.append(Conversation(_check_record(source, raw), source))
    if not conversations:
        raise ValueError(f"The chat data ({', '.join(map(str, paths))}) holds no conversation.")
    return conversations


def _check_record(source: str, raw: bytes) -> list[dict[str, str]]:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{source} is not UTF-8 text ({err.reason}); convert the file to UTF-8.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON ({err}); each line must be {_LAYOUT}.") from None
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
    template = tokenizer.get_chat_template()
    variables = dict(tokenizer.special_tokens_map)
    if GENERATION_TAG.search(template):
        text, spans = render_with_generation_spans(template, messages, variables=variables)
    else:
        text, spans = _incremental_spans(template, messages, variables)
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    ids = list(encoding.ids)
    if loss_on == "all":
        labels = list(ids)
    else:
        mask = assistant_mask(encoding.offsets, spans)
        labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask, strict=True)]
    if labels:
        labels[0] = IGNORE_INDEX
    return ids, labels


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
        try:
            encoded.append(encode_conversation(tokenizer, conversation.messages, loss_on=loss_on))
        except ChatTemplateError as err:
            raise ValueError(f"{conversation.source}: the chat template refused it: {err}") from err
        except ValueError as err:
            raise ValueError(f"{conversation.source}: {err}") from err
    return encoded


@dataclass(frozen=True)
class PackingReport:
    """What packing did: blocks made, conversations cut to the block size, blocks left out (nothing to learn)."""

    blocks: int
    truncated: int
    dropped: int

    def describe(self) -> str:
        notes = []
        if self.truncated:
            notes.append(f"{plural(self.truncated, 'conversation')} cut to the block size")
        if self.dropped:
            notes.append(f"{plural(self.dropped, 'block')} without labelled tokens left out")
        return "; ".join(notes)


def pack_conversations(
    documents: Sequence[tuple[list[int], list[int]]], *, block_size: int, pad_token_id: int
) -> tuple[LabelledBlocks, PackingReport]:
    """Pack (ids, labels) documents whole into blocks of `block_size`, best-fit decreasing.

    Documents longer than a block are cut to it. Each block's unused tail is `pad_token_id` with no labels;
    its positions restart at 0 too, so that it is a document of its own. Blocks with no labelled token to
    predict are left out (they would teach nothing).

    Raises:
        ValueError: No block has a token to learn.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}.")
    lengths = [min(len(ids), block_size) for ids, _ in documents]
    order = sorted((i for i in range(len(documents)) if lengths[i] > 0), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted: the best fit is the first with enough room
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            room, index = block_size - lengths[i], len(bins) - 1
        else:
            room, index = free.pop(at)
            bins[index].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, index))
    rows = [_block(documents, members, lengths, block_size, pad_token_id) for members in bins]
    blocks = LabelledBlocks(*(torch.tensor([row[k] for row in rows], dtype=torch.int64) for k in range(3)))
    keep = blocks.predicted() > 0
    report = PackingReport(
        blocks=int(keep.sum()),
        truncated=sum(len(ids) > block_size for ids, _ in documents),
        dropped=int((~keep).sum()),
    )
    if report.blocks == 0:
        raise ValueError(
            "No conversation has a token to learn: every labelled token was cut off or there were none "
            "(do the conversations have assistant messages? use --loss-on all, or a larger --block-size)."
        )
    return blocks[keep], report


def _block(
    documents: Sequence[tuple[list[int], list[int]]],
    members: list[int],
    lengths: list[int],
    block_size: int,
    pad_token_id: int,
) -> tuple[list[int], list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for i in members:
        n = lengths[i]
        ids += documents[i][0][:n]
        labels += documents[i][1][:n]
        positions += range(n)
    pad = block_size - len(ids)
    return ids + [pad_token_id] * pad, labels + [IGNORE_INDEX] * pad, positions + list(range(pad))
