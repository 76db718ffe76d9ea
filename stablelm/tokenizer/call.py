"""Calling the tokenizer: `tokenizer(text, text_pair, ...)` and `tokenizer.pad(...)`, with the reference's options.

`Tokenizer` inherits `EncodeMixin`; it reads the tokenizer's state (`_backend`, the pad token, the sides and
`model_max_length`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from .batch_encoding import BatchEncoding, as_tensors, check_tensor_type
from .encoding import Padding, encode, pad_encodings, padded_length, resolve_shape, rows
from .padding import pad_features

TextInput = str | Sequence[str]


class EncodeMixin:
    """`__call__` (encode texts, pairs or word lists) and `pad` (pad what was encoded earlier)."""

    def __call__(
        self,
        text: TextInput | Sequence[TextInput],
        text_pair: TextInput | Sequence[TextInput] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        stride: int = 0,
        return_overflowing_tokens: bool = False,
        verbose: bool = True,
    ) -> BatchEncoding:
        """Encode one text or a batch of texts (or pairs of texts), as the reference does.

        Args:
            text: A string, or a list of strings (a batch); with `is_split_into_words`, a list of words or a
                batch of such lists.
            text_pair: The second text of a pair (a list of them for a batch), joined to `text` by the
                tokenizer's post-processor (`token_type_ids` 1 for its tokens).
            add_special_tokens: Apply the post-processor's special tokens (bos/eos, when the tokenizer adds them).
            padding: False; True or "longest" to pad to the longest row of the batch; "max_length" to pad to
                `max_length` (default `model_max_length`). Needs a pad token.
            truncation: True or "longest_first" cuts each row to `max_length` (default `model_max_length`)
                tokens on `truncation_side`, the longer text of a pair first; "only_first" / "only_second" cut
                one text of a pair; None truncates only when `max_length` is given without padding.
            max_length: The length for truncation and for `padding="max_length"`.
            is_split_into_words: `text` (and `text_pair`) are lists of words, each pre-tokenized on its own.
            pad_to_multiple_of: Round the padded length up to a multiple of this.
            padding_side: "left" or "right" for this call (default: the tokenizer's `padding_side`).
            return_tensors: None for Python lists (flat lists for a single text), "pt" for torch tensors or "np"
                for NumPy arrays of shape (batch, length).
            return_token_type_ids: Also return `token_type_ids` (0 for the first text, 1 for the second).
            return_attention_mask: Return `attention_mask` (1 for tokens, 0 for padding); default True.
            return_special_tokens_mask: Also return `special_tokens_mask` (1 for added special tokens and padding).
            return_offsets_mapping: Also return `offset_mapping`: each token's (start, end) characters in
                its text, (0, 0) for special tokens and padding.
            return_length: Also return `length`, each row's length (padding included).
            stride, return_overflowing_tokens: Taken at 0 and False (what example code passes); the
                reference's overflowing windows are not made here, and asking for them is a ValueError.
            verbose: Accepted and not used (this tokenizer warns through exceptions only).

        Returns:
            A `BatchEncoding`; `tokens(i)`, `word_ids(i)`, `char_to_token(...)` and the like read its encodings.

        Raises:
            TypeError: `text` or `text_pair` is not text of the expected form.
            ValueError: Padding without a pad token, an unknown option, texts of different lengths with
                `return_tensors="pt"` and no padding, or a truncation that cannot be done.
        """
        del verbose
        if return_overflowing_tokens or stride:
            raise ValueError(
                f"return_overflowing_tokens={return_overflowing_tokens!r}, stride={stride!r}: the windows of "
                "overflowing tokens are not made by this tokenizer; cut long texts yourself (or pass "
                "truncation=True to keep the first max_length tokens)."
            )
        inputs, batched, pairs = _inputs(text, text_pair, is_split_into_words)
        return_tensors = check_tensor_type(return_tensors)
        shape = resolve_shape(
            padding, truncation, max_length, pad_to_multiple_of, model_max_length=self.model_max_length
        )
        side = self._call_side(padding_side)
        if shape.pad_to is not None and self.pad_token_id is None:
            raise ValueError(
                "Asked to pad, but the tokenizer has no pad token. Set one first, for example "
                "`tokenizer.pad_token = tokenizer.eos_token`."
            )
        run = functools.partial(
            encode,
            self._backend,
            inputs,
            pairs=pairs,
            pretokenized=is_split_into_words,
            add_special_tokens=add_special_tokens,
            shape=shape,
            truncation_side=self.truncation_side,
        )
        # Without offsets the backend's faster path serves; the encodings behind tokens() are made on demand.
        # That path leaves a pair's type ids at 0 when the backend has no post-processor (one can be unset
        # after loading), so pairs asking for them take the full path.
        track = return_offsets_mapping or (pairs and bool(return_token_type_ids))
        encodings = run(track=track)
        length = padded_length(encodings, shape)
        pad = Padding(side, self.pad_token_id, self.pad_token) if length is not None else None
        data = rows(
            encodings,
            token_type_ids=bool(return_token_type_ids),
            attention_mask=return_attention_mask is not False,
            special_tokens_mask=return_special_tokens_mask,
            offsets=return_offsets_mapping,
            length=return_length,
            pad_to=length,
            padding=pad,
        )
        if return_tensors == "pt" and len({len(row) for row in data["input_ids"]}) > 1:
            raise ValueError(
                "Cannot make one tensor of texts with different lengths: pass padding=True (and set a pad token, "
                "e.g. tokenizer.pad_token = tokenizer.eos_token), or return_tensors=None for lists."
            )
        if not batched and return_tensors is None:  # a single text: flat lists, as in the reference
            data = {
                key: value[0] if value and isinstance(value[0], list) else value
                for key, value in data.items()
            }
        as_tensors(data, return_tensors, integers=True)
        if track:
            return BatchEncoding(data, encodings=pad_encodings(encodings, length, pad), n_sequences=1 + pairs)
        lazy = functools.partial(_padded_encodings, run, length, pad)
        return BatchEncoding(data, make_encodings=lazy, n_sequences=1 + pairs)

    def pad(
        self,
        encoded_inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        padding: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """Pad encoded rows to one length, as the reference's `pad` (what data collators call).

        Pads `input_ids` (with the pad token), `attention_mask` (0; made when missing), `token_type_ids` (0) and
        `special_tokens_mask` (1); other keys such as `labels` are passed through as they are.

        Args:
            encoded_inputs: One example (a dict of lists of ids) or a batch: a dict of lists of rows, or a list
                of dicts (as a DataLoader gives a collator). Values may be lists, tensors or arrays.
            padding: True or "longest" (the longest row), "max_length" (`max_length`, default
                `model_max_length`), or False.
            max_length: The length for `padding="max_length"`.
            pad_to_multiple_of: Round the padded length up to a multiple of this.
            padding_side: "left" or "right" (default: the tokenizer's `padding_side`).
            return_attention_mask: Make and pad `attention_mask` (default True).
            return_tensors: None for lists, "pt" or "np"; tensors or arrays given make that the default.

        Raises:
            ValueError: No `input_ids`, values of different batch sizes, padding without a pad token, an unknown
                option, or rows that make no tensor.
            TypeError: `encoded_inputs` is neither a dict nor a list of dicts.
        """
        return pad_features(
            encoded_inputs,
            shape=resolve_shape(
                padding, None, max_length, pad_to_multiple_of, model_max_length=self.model_max_length
            ),
            side=self._call_side(padding_side),
            pad_id=self.pad_token_id,
            return_attention_mask=return_attention_mask,
            return_tensors=check_tensor_type(return_tensors),
        )

    def _call_side(self, padding_side: str | None) -> str:
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left', 'right' or None, not {padding_side!r}.")
        return padding_side or self.padding_side


def _padded_encodings(run: Any, length: int | None, padding: Padding | None) -> list:
    return pad_encodings(run(track=True), length, padding)


def _inputs(text: Any, text_pair: Any, words: bool) -> tuple[list[Any], bool, bool]:
    """(the backend's inputs, whether a batch was given, whether they are pairs), checked."""
    is_one = _is_words if words else _is_text
    form = "a list of words (strings) or a list of such lists" if words else "a string or a list of strings"
    batched = isinstance(text, (list, tuple)) and not is_one(text)
    if not (is_one(text) or batched and all(is_one(item) for item in text)):
        raise TypeError(f"text must be {form}, not {text!r:.80}.")
    if not batched:
        if text_pair is not None and not is_one(text_pair):
            raise TypeError(f"text_pair must be of the same form as text, not {text_pair!r:.80}.")
        # as in the reference, an empty pair ("" or []) means no pair
        return ([(text, text_pair)] if text_pair else [text]), False, bool(text_pair)
    if text_pair is None:
        return list(text), True, False
    if not isinstance(text_pair, (list, tuple)):
        raise TypeError(
            "when tokenizing batches of text, `text_pair` must be a list or tuple with the same length as `text`."
        )
    if len(text_pair) != len(text):
        raise ValueError(
            f"batch length of `text`: {len(text)} does not match batch length of `text_pair`: {len(text_pair)}."
        )
    if not all(is_one(item) for item in text_pair):
        raise TypeError(
            f"text_pair must hold one item of the same form as text's per row, not {text_pair!r:.80}."
        )
    return list(zip(text, text_pair, strict=True)), True, True


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_words(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(word, str) for word in value)
