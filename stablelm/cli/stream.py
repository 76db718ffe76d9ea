"""Text out of the decode loop: detokenized as it comes, cut at stop strings, timed for --verbose."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..generation import GenerationConfig, stream_tokens
from ..tokenizer import StreamingDetokenizer


class StopFilter:
    """Passes text through until a stop string appears, and never lets a stop string out.

    Text that could be the start of a stop string is held back until the next text shows it is not;
    the first stop string ends the text just before it, and `stopped` turns True.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> str:
        """Add `text`; return what can be shown now."""
        if self.stopped:
            return ""
        text = self._held + text
        cut = min((i for i in (text.find(stop) for stop in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return text[:cut]
        keep = max((self._prefix_overlap(text, stop) for stop in self.stops), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The text still held back, once no more will come."""
        held, self._held = self._held, ""
        return held

    @staticmethod
    def _prefix_overlap(text: str, stop: str) -> int:
        """Length of the longest end of `text` that begins `stop` (shorter than `stop` itself)."""
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop.startswith(text[-length:]):
                return length
        return 0


@dataclass
class Stats:
    """Counts and times of one generation; `finish` is "eos", "stop string", "length" or "interrupted"."""

    prompt_tokens: int
    new_tokens: int = 0
    prefill_s: float = 0.0  # the prompt's forward and the first token
    decode_s: float = 0.0  # every later token
    finish: str | None = None

    def describe(self) -> list[str]:
        """Lines for --verbose."""
        prefill = self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0
        lines = [f"prompt: {self.prompt_tokens} tokens, prefill {prefill:.1f} tokens/s"]
        decode = (self.new_tokens - 1) / self.decode_s if self.decode_s else 0.0
        lines.append(
            f"generated: {self.new_tokens} tokens, decode {decode:.1f} tokens/s (finished: {self.finish})"
        )
        return lines


class TextStream:
    """Iterate to get the new text of one generation (batch of one), chunk by chunk, as it is made.

    Special tokens (EOS) are left out, as `tokenizer.decode(..., skip_special_tokens=True)` does; the chunks
    join to exactly that text, cut before the first stop string. `stats` fills in as it runs.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        input_ids: torch.Tensor,
        *,
        config: GenerationConfig,
        generator: torch.Generator | None = None,
        stops: Sequence[str] = (),
        draft: Any = None,
    ) -> None:
        self.model, self.input_ids, self.config, self.generator = model, input_ids, config, generator
        self.draft = draft  # a speculative drafter, or None
        self.detokenizer = StreamingDetokenizer(tokenizer, skip_special_tokens=True)
        self.stop = StopFilter(stops)
        self.stats = Stats(prompt_tokens=input_ids.shape[1])

    def __iter__(self) -> Iterator[str]:
        start = time.perf_counter()
        steps = stream_tokens(
            self.model, self.input_ids, config=self.config, generator=self.generator, draft=self.draft
        )
        for step in steps:
            text = self.stop.push(self.detokenizer.push(int(step.tokens[0])))  # int() waits for the device
            self._count(start)
            reason = step.finish_reasons[0]  # "stop" is EOS here: stop strings are this class's business
            self.stats.finish = "stop string" if self.stop.stopped else "eos" if reason == "stop" else reason
            if text:
                yield text
            if self.stop.stopped:
                steps.close()
                return
        text = self.stop.push(self.detokenizer.flush())
        text += self.stop.flush()
        if self.stop.stopped:
            self.stats.finish = "stop string"
        if text:
            yield text

    def _count(self, start: float) -> None:
        elapsed = time.perf_counter() - start
        if self.stats.new_tokens == 0:
            self.stats.prefill_s = elapsed
        self.stats.new_tokens += 1
        self.stats.decode_s = elapsed - self.stats.prefill_s
