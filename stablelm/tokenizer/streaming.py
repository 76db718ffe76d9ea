"""Streaming detokenization: text from token ids that arrive one at a time, emitted once it is complete."""

from __future__ import annotations

from .tokenizer import CLEAN_UP_JOINS, Tokenizer, clean_up_tokenization


class StreamingDetokenizer:
    """Turns token ids, fed one at a time, into text as soon as that text is complete.

    It never emits part of a multi-byte character, and the concatenation of everything `push` and `flush`
    return equals `tokenizer.decode(all_ids)` with the same options. Each step decodes only the tokens since
    the previous emission (as vLLM and text-generation-inference do), so a whole stream costs O(n).

    Example:
        >>> stream = StreamingDetokenizer(tokenizer, skip_special_tokens=True)
        >>> for token_id in generated_ids:
        ...     print(stream.push(token_id), end="")
        >>> print(stream.flush())
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> None:
        """Start an empty stream.

        Args:
            tokenizer: The tokenizer whose ids will be fed.
            skip_special_tokens: Leave special tokens out of the text, as `decode` does.
            clean_up_tokenization_spaces: As in `decode` (never applied to BPE tokenizers).
        """
        self._decode = tokenizer.backend_tokenizer.decode
        self._skip_special_tokens = skip_special_tokens
        self._clean_up = tokenizer._cleans_up(clean_up_tokenization_spaces)
        self._ids: list[int] = []
        # Tokens [start, read) gave the text emitted last. Decoding from `start` rather than from `read`
        # keeps decoders that treat the first token of a sequence specially in agreement with `decode`.
        self._start = self._read = 0
        self._tail = ""  # the text of tokens [start, read)
        self._held = ""  # emitted text held back until clean-up can no longer change it

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes ("" while a character is unfinished)."""
        self._ids.append(int(token_id))
        text = self._window()
        # A trailing U+FFFD is a character whose remaining bytes are still to come.
        if len(text) <= len(self._tail) or text.endswith("\ufffd"):
            return ""
        return self._emit(text, final=False)

    def flush(self) -> str:
        """Return the text still held back; call it once, at the end of the stream."""
        return self._emit(self._window(), final=True)

    def _window(self, end: int | None = None) -> str:
        return self._decode(self._ids[self._start : end], skip_special_tokens=self._skip_special_tokens)

    def _emit(self, text: str, *, final: bool) -> str:
        new = text[len(self._tail) :]
        self._start, self._read = self._read, len(self._ids)
        self._tail = self._window(self._read)
        if not self._clean_up:
            return new
        # Clean-up patterns join a few characters; text up to a character that joins nothing is final.
        self._held += new
        cut = len(self._held)
        while not final and cut and self._held[cut - 1] in CLEAN_UP_JOINS:
            cut -= 1
        ready, self._held = self._held[:cut], self._held[cut:]
        return clean_up_tokenization(ready)
