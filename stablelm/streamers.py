"""Streamers: receive token ids from `generate` and turn them into text as it is made."""

from __future__ import annotations

import queue
import sys
from typing import Any, TextIO

import torch

from .tokenizer import StreamingDetokenizer


class TextStreamer:
    """Print the text to a stream (stdout by default) as `generate` makes it.

    Args:
        tokenizer: The model's tokenizer.
        skip_prompt: Leave out the prompt (the first ids `generate` passes).
        stream: Where to write.
        **decode_kwargs: `skip_special_tokens`, `clean_up_tokenization_spaces`, as for `decode`.
    """

    def __init__(
        self, tokenizer: Any, skip_prompt: bool = True, *, stream: TextIO | None = None, **decode_kwargs: Any
    ):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.stream = stream
        self._detok = StreamingDetokenizer(tokenizer, **decode_kwargs)
        self._next_is_prompt = True

    def put(self, value: torch.Tensor) -> None:
        """Take the prompt (B=1, T) first, then each step's token (1,)."""
        if value.shape[0] > 1:
            raise ValueError("TextStreamer streams one sequence: generate with batch size 1 to use it.")
        is_prompt, self._next_is_prompt = self._next_is_prompt, False
        if is_prompt and self.skip_prompt:
            return
        text = "".join(self._detok.push(int(t)) for t in value.flatten().tolist())
        if text:
            self.on_finalized_text(text)

    def end(self) -> None:
        """Emit what is left and close the line."""
        self.on_finalized_text(self._detok.flush(), stream_end=True)
        self._detok = StreamingDetokenizer(self.tokenizer, **self.decode_kwargs)
        self._next_is_prompt = True

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        out = self.stream or sys.stdout
        print(text, flush=True, end="" if not stream_end else "\n", file=out)


class TextIteratorStreamer(TextStreamer):
    """Yield text chunks from another thread: run `generate` in a thread, iterate here.

    Example:
        >>> streamer = TextIteratorStreamer(tokenizer)
        >>> Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer)).start()
        >>> for chunk in streamer:
        ...     print(chunk, end="")

    Args:
        timeout: Seconds to wait for the next chunk before `queue.Empty` is raised (None waits forever).
    """

    _STOP = object()

    def __init__(
        self, tokenizer: Any, skip_prompt: bool = True, timeout: float | None = None, **decode_kwargs: Any
    ):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: queue.Queue = queue.Queue()
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self._STOP, timeout=self.timeout)

    def __iter__(self) -> TextIteratorStreamer:
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self._STOP:
            raise StopIteration
        return value
