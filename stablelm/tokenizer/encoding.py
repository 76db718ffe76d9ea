"""Encoding texts as the reference does: its padding and truncation options, then the `tokenizers` encodings
cut, given their special tokens and padded by the rules the reference's backend applies.

Truncation and padding happen here on each call's own encodings rather than through `enable_truncation` and
`enable_padding` on the shared backend, so that concurrent calls with different options cannot see each other's
settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any

from tokenizers import Encoding, processors
from tokenizers import Tokenizer as Backend

VERY_LARGE_INTEGER = int(1e30)  # the reference's model_max_length when a checkpoint sets none
_LARGE_INTEGER = int(1e20)  # a model_max_length above this means "no limit"
_PADDING = {
    False: None,
    "do_not_pad": None,
    True: "longest",
    "longest": "longest",
    "max_length": "max_length",
}
_TRUNCATION = {
    None: None,
    False: None,
    "do_not_truncate": None,
    True: "longest_first",
    "longest_first": "longest_first",
    "only_first": "only_first",
    "only_second": "only_second",
}
# What padding adds to each field besides input_ids (the pad token's id), as the reference's backend pads.
_FILLS = {"token_type_ids": 0, "attention_mask": 0, "special_tokens_mask": 1, "offset_mapping": (0, 0)}
# What joins a pair when the backend has no post-processor: the backend's own default (types 0 and 1).
_PLAIN_PAIR = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])


@dataclass(frozen=True)
class Shape:
    """A call's padding and truncation, resolved.

    Attributes:
        pad_to: "longest", a length, or None (no padding).
        multiple: Round the padded length up to a multiple of this.
        cut_to: The length to truncate to (special tokens included), or None.
        strategy: How a pair is cut: "longest_first", "only_first" or "only_second".
    """

    pad_to: int | str | None = None
    multiple: int | None = None
    cut_to: int | None = None
    strategy: str = "longest_first"


def resolve_shape(
    padding: Any,
    truncation: Any,
    max_length: int | None,
    pad_to_multiple_of: int | None,
    *,
    model_max_length: int,
) -> Shape:
    """Resolve the options as the reference does (its `_get_padding_truncation_strategies`).

    Raises:
        ValueError: An unknown option, or truncation and padding to a length that is not a multiple of
            `pad_to_multiple_of`.
    """
    padding, truncation = getattr(padding, "value", padding), getattr(truncation, "value", truncation)
    if not _known(padding, _PADDING):
        raise ValueError(
            f"padding must be one of False, True, 'longest', 'max_length', 'do_not_pad'; got {padding!r}."
        )
    if not _known(truncation, _TRUNCATION):
        raise ValueError(
            "truncation must be one of None, False, True, 'longest_first', 'only_first', 'only_second', "
            f"'do_not_truncate'; got {truncation!r}."
        )
    max_length = _count("max_length", max_length, minimum=0)
    pad_to_multiple_of = _count("pad_to_multiple_of", pad_to_multiple_of, minimum=1)
    if max_length is not None and padding is False and truncation is None:
        truncation = True  # the reference's rule: max_length alone means truncate
    pad, strategy = _PADDING[padding], _TRUNCATION[truncation]
    if max_length is None:
        max_length = model_max_length if model_max_length <= _LARGE_INTEGER else None
        pad = None if pad == "max_length" and max_length is None else pad
        strategy = strategy if max_length is not None else None
    if strategy and pad and pad_to_multiple_of and max_length is not None and max_length % pad_to_multiple_of:
        raise ValueError(
            f"Truncation and padding are both activated but truncation length ({max_length}) is not a multiple of "
            f"pad_to_multiple_of ({pad_to_multiple_of})."
        )
    return Shape(
        pad_to="longest" if pad == "longest" else max_length if pad else None,
        multiple=pad_to_multiple_of,
        cut_to=max_length if strategy else None,
        strategy=strategy or "longest_first",
    )


def _known(value: Any, table: dict) -> bool:
    # 0 and 1 would find False and True; only the bools themselves and the strings are options.
    return (isinstance(value, bool) or value is None or isinstance(value, str)) and value in table


def _count(name: str, value: Any, *, minimum: int) -> int | None:
    """`value` as an int (NumPy's integers too), checked."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < minimum):
        raise ValueError(f"{name} must be None or an integer >= {minimum}, not {value!r}.")
    return None if value is None else int(value)


@dataclass(frozen=True)
class Padding:
    """How rows are padded: the side and the pad token (its id, and its string in `tokens()`)."""

    side: str
    pad_id: int
    pad_token: str


def encode(
    backend: Backend,
    inputs: list[Any],
    *,
    pairs: bool,
    pretokenized: bool,
    add_special_tokens: bool,
    shape: Shape,
    truncation_side: str,
    track: bool,
) -> list[Encoding]:
    """The encodings of `inputs` (texts, word lists, or pairs of them), cut and post-processed (not padded).

    Args:
        track: Keep character offsets, tokens and word ids (slower); without it the encodings hold only ids,
            masks and type ids.

    Raises:
        ValueError: `shape.cut_to` leaves no room for the special tokens, or the asked truncation cannot reach it.
    """
    added = backend.num_special_tokens_to_add(pairs) if add_special_tokens else 0
    if shape.cut_to is not None and shape.cut_to < added:
        raise ValueError(f"max_length={shape.cut_to} leaves no room for the {added} special tokens added.")
    if shape.cut_to is not None and (pairs or added):
        return _cut_pieces(
            backend, inputs, pairs, pretokenized, add_special_tokens, shape, truncation_side, track
        )
    run = backend.encode_batch if track else backend.encode_batch_fast
    encodings = run(inputs, is_pretokenized=pretokenized, add_special_tokens=add_special_tokens)
    if shape.cut_to is not None:  # no special tokens: cutting the result is cutting the text's tokens
        for encoding in encodings:
            cut(encoding, None, shape.cut_to, shape.strategy, truncation_side)
    return encodings


def padded_length(encodings: list[Encoding], shape: Shape) -> int | None:
    """The length the rows are padded to (rows already longer stay as they are), or None for no padding."""
    if shape.pad_to is None:
        return None
    length = max(map(len, encodings), default=0) if shape.pad_to == "longest" else shape.pad_to
    if shape.multiple and length % shape.multiple:
        length += shape.multiple - length % shape.multiple
    return length


def pad_encodings(encodings: list[Encoding], length: int | None, padding: Padding | None) -> list[Encoding]:
    """Pad the encodings in place (their tokens, word ids, offsets ... too), as the reference's backend does."""
    if length is not None:
        assert padding is not None
        for encoding in encodings:
            encoding.pad(length, direction=padding.side, pad_id=padding.pad_id, pad_token=padding.pad_token)
    return encodings


def _cut_pieces(
    backend: Backend,
    inputs: list[Any],
    pairs: bool,
    pretokenized: bool,
    add_special_tokens: bool,
    shape: Shape,
    side: str,
    track: bool,
) -> list[Encoding]:
    """Encode each text (each text of a pair) alone, cut them to fit beside the special tokens, and join them with
    the post-processor: the order of the reference's backend, which truncates before it post-processes."""
    raw = _without_post_processor(backend)
    run = raw.encode_batch if track else raw.encode_batch_fast
    firsts = run([item[0] for item in inputs] if pairs else inputs, is_pretokenized=pretokenized)
    seconds = (
        run([item[1] for item in inputs], is_pretokenized=pretokenized) if pairs else [None] * len(firsts)
    )
    room = shape.cut_to - (backend.num_special_tokens_to_add(pairs) if add_special_tokens else 0)
    processor = backend.post_processor or (_PLAIN_PAIR if pairs else None)
    encodings = []
    for first, second in zip(firsts, seconds, strict=True):
        cut(first, second, room, shape.strategy, side)
        encodings.append(processor.process(first, second, add_special_tokens) if processor else first)
    return encodings


def _without_post_processor(backend: Backend) -> Backend:
    """A tokenizer sharing `backend`'s model, normalizer, pre-tokenizer and added tokens, with no post-processor:
    its encodings are the texts' tokens before the special tokens are added and the offsets trimmed."""
    raw = Backend(backend.model)  # shares the model's vocabulary (cheap: no copy)
    if backend.normalizer is not None:
        raw.normalizer = backend.normalizer
    if backend.pre_tokenizer is not None:
        raw.pre_tokenizer = backend.pre_tokenizer
    added = backend.get_added_tokens_decoder()
    raw.add_tokens([added[i] for i in sorted(added)])  # in id order, so each gets its id again
    raw.encode_special_tokens = backend.encode_special_tokens
    assert raw.get_vocab_size(True) == backend.get_vocab_size(True)
    return raw


def cut(first: Encoding, second: Encoding | None, max_length: int, strategy: str, side: str) -> None:
    """Truncate a text's tokens (or a pair's) to `max_length` in all, in place, as `tokenizers` does.

    "longest_first" shortens the longer text of a pair first; "only_first" and "only_second" cut that text alone.

    Raises:
        ValueError: "only_second" without a pair, or the text to cut is too short to reach `max_length`.
    """
    if max_length == 0:
        first.truncate(0, direction=side)
        if second is not None:
            second.truncate(0, direction=side)
        return
    total = len(first) + (len(second) if second is not None else 0)
    if total <= max_length:
        return
    if strategy == "longest_first":
        if second is None:
            first.truncate(max_length, direction=side)
            return
        short, long = sorted((len(first), len(second)))
        long = short if short > max_length else max(short, max_length - short)
        if short + long > max_length:
            short, long = max_length // 2, max_length // 2 + max_length % 2
        n1, n2 = (long, short) if len(first) > len(second) else (short, long)
        first.truncate(n1, direction=side)
        second.truncate(n2, direction=side)
        return
    target = first if strategy == "only_first" else second
    if target is None:
        raise ValueError(
            "truncation='only_second' cuts the second text of pairs, but the input has no pairs: pass text_pair, "
            "or use truncation=True."
        )
    if len(target) <= total - max_length:
        raise ValueError(
            f"truncation={strategy!r} cannot fit max_length={max_length}: the text it may cut is too short; use "
            "truncation='longest_first' or a larger max_length."
        )
    target.truncate(len(target) - (total - max_length), direction=side)


def rows(
    encodings: list[Encoding],
    *,
    token_type_ids: bool,
    attention_mask: bool,
    special_tokens_mask: bool,
    offsets: bool,
    length: bool,
    pad_to: int | None = None,
    padding: Padding | None = None,
) -> dict[str, list]:
    """The output's fields from the (unpadded) encodings, in the reference's order, padded to `pad_to` with
    the values the reference's backend pads with (padding lists here is faster than padding the encodings)."""
    data: dict[str, list] = {"input_ids": [e.ids for e in encodings]}
    if token_type_ids:
        data["token_type_ids"] = [e.type_ids for e in encodings]
    if attention_mask:
        data["attention_mask"] = [[1] * len(row) for row in data["input_ids"]]
    if special_tokens_mask:
        data["special_tokens_mask"] = [e.special_tokens_mask for e in encodings]
    if offsets:
        data["offset_mapping"] = [e.offsets for e in encodings]
    if pad_to is not None:
        assert padding is not None
        fills = {**_FILLS, "input_ids": padding.pad_id}
        for key, values in data.items():
            fill = fills[key]
            if padding.side == "left":
                data[key] = [[fill] * (pad_to - len(row)) + row for row in values]
            else:
                data[key] = [row + [fill] * (pad_to - len(row)) for row in values]
    if length:
        data["length"] = [len(row) for row in data["input_ids"]]
    return data


def _as_python(ids: Any) -> Any:
    """Token ids as Python ints and lists (tensors and arrays converted)."""
    if hasattr(ids, "tolist"):
        return ids.tolist()
    if isinstance(ids, (list, tuple)) and ids and not isinstance(ids[0], int):
        return [_as_python(row) for row in ids]
    return list(ids) if isinstance(ids, tuple) else ids


def decode_error(ids: Any, err: Exception) -> Exception:
    """The error for token ids the tokenizer's backend refused with `err` (a TypeError or OverflowError
    that names no argument): which id, where, and what ids must be. `ids` as `_as_python` gives them."""
    rows = ids if ids and isinstance(ids[0], list) else [ids]
    for r, row in enumerate(rows):
        for i, value in enumerate(row if isinstance(row, list) else [row]):
            where = f"position {i}" + (f" of sequence {r}" if len(rows) > 1 else "")
            if not isinstance(value, int):
                return TypeError(
                    f"token_ids must hold integer token ids; got {value!r} ({type(value).__name__}) at {where}"
                )
            if not 0 <= value < 2**32:
                return ValueError(
                    f"token_ids must hold token ids from 0 to 2**32 - 1; got {value} at {where}"
                )
    return err
