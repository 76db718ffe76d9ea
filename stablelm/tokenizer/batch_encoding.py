"""The tokenizer's output: a dict of lists, tensors or arrays, with the `tokenizers` encodings behind it.

As the reference's `BatchEncoding`, it answers `tokens(i)`, `word_ids(i)`, `char_to_token(...)` and the other
maps between characters, words and tokens from the `tokenizers.Encoding` of each row. A call that did not track
character offsets (the faster path) leaves a recipe instead, and the encodings are made from it on first use.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from tokenizers import Encoding

TENSOR_TYPES = (None, "pt", "np")


class CharSpan(NamedTuple):
    """Characters `start` to `end` (exclusive) of the original text."""

    start: int
    end: int


class TokenSpan(NamedTuple):
    """Tokens `start` to `end` (exclusive) of an encoded row."""

    start: int
    end: int


class BatchEncoding(dict):
    """The tokenizer's output (`input_ids`, `attention_mask`, ...), read as keys or as attributes."""

    def __init__(
        self,
        data: Mapping[str, Any] | None = None,
        *,
        encodings: list[Encoding] | None = None,
        make_encodings: Callable[[], list[Encoding]] | None = None,
        n_sequences: int | None = None,
    ) -> None:
        super().__init__(data or {})
        self._encodings = encodings
        self._make_encodings = make_encodings
        self._n_sequences = n_sequences

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not set yet (while unpickling): never a key
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no {name!r}; it holds {sorted(self)}.") from None

    def __getitem__(self, item: str | int | slice) -> Any:
        """A value by key; as in the reference, an int (or a slice) gives that row's `tokenizers.Encoding`
        (those rows' encodings), and without encodings a slice gives those rows of every value."""
        if isinstance(item, str):
            return dict.__getitem__(self, item)
        if isinstance(item, (int, slice)) and self.encodings is not None:
            return self.encodings[item]
        if isinstance(item, slice):
            return {key: value[item] for key, value in self.items()}
        return dict.__getitem__(self, item)

    def __reduce__(self) -> tuple:
        # The recipe for the encodings is a closure over the tokenizer: pickles carry the data and any
        # encodings already made (batches cross process boundaries in DataLoader workers).
        return (
            BatchEncoding,
            (dict(self),),
            {"_encodings": self._encodings, "_n_sequences": self._n_sequences},
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._encodings, self._n_sequences = state["_encodings"], state["_n_sequences"]
        self._make_encodings = None

    def to(self, device: str | torch.device | int, *, non_blocking: bool = False) -> BatchEncoding:
        """Move every tensor to `device` (in place) and return the encoding, as in `tok(...).to("cuda")`."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device, non_blocking=non_blocking)
        return self

    # --- the maps kept by the `tokenizers` encodings -----------------------------------------------------

    @property
    def encodings(self) -> list[Encoding] | None:
        """The `tokenizers.Encoding` of each row, or None for an output of `pad`."""
        if self._encodings is None and self._make_encodings is not None:
            self._encodings, self._make_encodings = self._make_encodings(), None
        return self._encodings

    @property
    def is_fast(self) -> bool:
        """Whether the encodings are there (always, for the tokenizer's own output)."""
        return self.encodings is not None

    @property
    def n_sequences(self) -> int | None:
        """1 for single texts, 2 for pairs, None when unknown."""
        return self._n_sequences

    def _row(self, method: str, batch_index: int) -> Encoding:
        encodings = self.encodings
        if encodings is None:
            raise ValueError(
                f"{method}() needs the tokenizer's encodings, which this BatchEncoding does not hold (it was made "
                "by pad(), or unpickled): call the tokenizer on the text instead."
            )
        return encodings[batch_index]

    def tokens(self, batch_index: int = 0) -> list[str]:
        """The token strings of row `batch_index` (padding included)."""
        return self._row("tokens", batch_index).tokens

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        """For each token of the row: 0 (first text), 1 (second text of a pair) or None (special tokens)."""
        return self._row("sequence_ids", batch_index).sequence_ids

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        """For each token of the row: the index of its word, or None for special tokens and padding."""
        return self._row("word_ids", batch_index).word_ids

    def token_to_sequence(self, batch_or_token_index: int, token_index: int | None = None) -> int | None:
        """The sequence (0 or 1) of a token: `(token_index)` for row 0, or `(batch_index, token_index)`."""
        batch, token = _indices(batch_or_token_index, token_index)
        return self._row("token_to_sequence", batch).token_to_sequence(token)

    def token_to_word(self, batch_or_token_index: int, token_index: int | None = None) -> int | None:
        """The word of a token: `(token_index)` for row 0, or `(batch_index, token_index)`."""
        batch, token = _indices(batch_or_token_index, token_index)
        return self._row("token_to_word", batch).token_to_word(token)

    def word_to_tokens(
        self, batch_or_word_index: int, word_index: int | None = None, sequence_index: int = 0
    ) -> TokenSpan | None:
        """The tokens of a word, or None: `(word_index)` for row 0, or `(batch_index, word_index)`."""
        batch, word = _indices(batch_or_word_index, word_index)
        span = self._row("word_to_tokens", batch).word_to_tokens(word, sequence_index)
        return TokenSpan(*span) if span is not None else None

    def token_to_chars(self, batch_or_token_index: int, token_index: int | None = None) -> CharSpan | None:
        """The characters of a token, or None: `(token_index)` for row 0, or `(batch_index, token_index)`."""
        batch, token = _indices(batch_or_token_index, token_index)
        span = self._row("token_to_chars", batch).token_to_chars(token)
        return CharSpan(*span) if span is not None else None

    def char_to_token(
        self, batch_or_char_index: int, char_index: int | None = None, sequence_index: int = 0
    ) -> int | None:
        """The token holding a character, or None: `(char_index)` for row 0, or `(batch_index, char_index)`."""
        batch, char = _indices(batch_or_char_index, char_index)
        return self._row("char_to_token", batch).char_to_token(char, sequence_index)

    def word_to_chars(
        self, batch_or_word_index: int, word_index: int | None = None, sequence_index: int = 0
    ) -> CharSpan:
        """The characters of a word: `(word_index)` for row 0, or `(batch_index, word_index)`."""
        batch, word = _indices(batch_or_word_index, word_index)
        return CharSpan(*self._row("word_to_chars", batch).word_to_chars(word, sequence_index))

    def char_to_word(
        self, batch_or_char_index: int, char_index: int | None = None, sequence_index: int = 0
    ) -> int | None:
        """The word holding a character: `(char_index)` for row 0, or `(batch_index, char_index)`."""
        batch, char = _indices(batch_or_char_index, char_index)
        return self._row("char_to_word", batch).char_to_word(char, sequence_index)


def _indices(first: int, second: int | None) -> tuple[int, int]:
    return (0, first) if second is None else (first, second)


def check_tensor_type(return_tensors: Any) -> str | None:
    """`return_tensors` as one of None, "pt", "np" (an enum whose value is one of them passes too)."""
    value = getattr(return_tensors, "value", return_tensors)
    if value not in TENSOR_TYPES:
        raise ValueError(f"return_tensors must be None, 'pt' or 'np', not {return_tensors!r}.")
    if value == "np":
        try:
            import numpy  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "return_tensors='np' needs NumPy: `pip install numpy`, or ask for 'pt'."
            ) from err
    return value


def as_tensors(data: dict[str, Any], return_tensors: str | None, *, integers: bool = False) -> dict[str, Any]:
    """Each value of `data` (in place) as a tensor or array, built as the reference builds it.

    Lists of ints become int64, floats float32 ("pt") or float64 ("np"); empty lists int64. Rows of different
    lengths cannot make a tensor, but with "np" make an object array of rows, as in the reference. `integers`
    says every value holds ints, which makes torch's conversion twice as fast.

    Raises:
        ValueError: A value that makes no tensor (rows of different lengths with "pt", strings, ...).
    """
    if return_tensors is None:
        return data
    for key, value in data.items():
        if isinstance(value, torch.Tensor if return_tensors == "pt" else _numpy().ndarray):
            continue
        try:
            data[key] = _torch_tensor(value, integers) if return_tensors == "pt" else _numpy_array(value)
        except Exception as err:
            raise ValueError(
                f"Cannot make one tensor of `{key}` ({str(err)[:200]}): rows of different lengths need "
                "padding=True (and truncation=True for long texts), and values must be numbers."
            ) from err
    return data


def _torch_tensor(value: Any, integers: bool = False) -> torch.Tensor:
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, list) and value and isinstance(value[0], np.ndarray):
        return torch.from_numpy(np.array(value))
    return torch.tensor(value, dtype=torch.int64 if integers or _is_empty(value) else None)


def _numpy_array(value: Any, dtype: Any = None) -> Any:
    np = _numpy()
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple, np.ndarray)):
        if len({len(row) for row in value}) > 1 and dtype is None:  # ragged rows: an array of arrays
            value = _numpy_array([np.asarray(row) for row in value], dtype=object)
    if _is_empty(value) and dtype is None:
        dtype = np.int64
    return np.asarray(value, dtype=dtype)


def _is_empty(value: Any) -> bool:
    """True when `value` is a list (of lists...) without a single leaf; a TypeError for a value without a length
    (a number), which the reference cannot make a tensor of either."""
    if len(value) == 0:
        return True
    return isinstance(value[0], (list, tuple)) and all(_is_empty(row) for row in value)


def _numpy() -> Any:
    import numpy

    return numpy
