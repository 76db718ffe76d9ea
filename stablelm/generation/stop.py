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
        from ..tokenizer import StreamingDetokenizer

        self.stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not self.stops or any(not isinstance(s, str) or not s for s in self.stops):
            raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}.")
        self.keep = max(len(s) for s in self.stops) - 1
        self.streams = [StreamingDetokenizer(tokenizer) for _ in range(batch_size)]
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
