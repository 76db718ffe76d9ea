"""Stop strings: end a row when its text reaches one of them, across token boundaries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class StopStringChecker:
    """Detects, per row, the text of the new tokens reaching the end of one of `stop_strings`.

    Matches across token boundaries: each row's new text is rebuilt by a streaming detokenizer, and a stop
    string counts when an occurrence ends in the text the latest token completed.
    """

    def __init__(self, tokenizer: Any, stop_strings: str | Sequence[str], batch_size: int) -> None:
        self.stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not self.stops or any(not isinstance(s, str) or not s for s in self.stops):
            raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}.")
        self.keep = max(len(s) for s in self.stops) - 1
        self.streams = [_text_stream(tokenizer) for _ in range(batch_size)]
        self.tails = [""] * batch_size

    def __call__(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        hits = torch.zeros(len(rows), dtype=torch.bool)
        for i, (row, token) in enumerate(zip(rows.tolist(), tokens.tolist(), strict=True)):
            new = self.streams[row].push(token)
            if not new:
                continue
            window = self.tails[row] + new
            hits[i] = any(stop in window for stop in self.stops)
            self.tails[row] = window[-self.keep :] if self.keep else ""
        return hits


def _text_stream(tokenizer: Any) -> Any:
    """A row's text as its tokens come: stablelm's streaming detokenizer, or for another tokenizer
    (transformers' own, say) its public `decode`."""
    from ..tokenizer import StreamingDetokenizer, Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return StreamingDetokenizer(tokenizer)
    if callable(getattr(tokenizer, "decode", None)):
        return _DecodedRow(tokenizer.decode)
    kind = type(tokenizer)
    raise TypeError(
        f"stop_strings need a tokenizer with decode(ids) -> str, got {kind.__module__}.{kind.__qualname__}: pass "
        "stablelm's (stablelm.AutoTokenizer.from_pretrained(path)) as tokenizer=."
    )


class _DecodedRow:
    """A row's new text through a tokenizer's public `decode(ids)`: the row decoded whole at each token,
    O(length) a step, where stablelm's tokenizer streams at O(1)."""

    def __init__(self, decode: Any) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.done = 0  # the length of the text returned so far

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.decode(self.ids)
        if not isinstance(text, str):
            raise TypeError(f"the tokenizer's decode returned {type(text).__name__}, not the text (a str).")
        # A trailing U+FFFD is a character whose remaining bytes are still to come.
        if len(text) <= self.done or text.endswith("\ufffd"):
            return ""
        new, self.done = text[self.done :], len(text)
        return new
