"""One response being assembled from the engine's events: OpenAI's whole body for a request, or its
stream chunks one event at a time."""

from __future__ import annotations

from typing import Any

from .engine import Event
from .protocol import Parsed
from .responses import Tokens, chat_logprobs, completion_logprobs, usage


class Answer:
    """One response being assembled from engine events: the whole body, or one stream chunk per event."""

    def __init__(self, parsed: Parsed, tokens: Tokens, choices: int, model: str) -> None:
        self.parsed, self.tokens, self.model = parsed, tokens, model
        self.chat = parsed.kind == "chat"
        self.texts = [""] * choices
        self.logprobs: list[list[Any]] = [[] for _ in range(choices)]
        self.pending: list[list[Any]] = [[] for _ in range(choices)]  # logprobs not streamed yet
        self.counts = [0] * choices
        self.finish: list[str | None] = [None] * choices
        self.finished = 0
        self.prompt_tokens = sum(len(p) for p in parsed.prompts)

    @property
    def done(self) -> bool:
        return self.finished == len(self.finish)

    def add(self, event: Event) -> dict[str, Any] | None:
        """Record `event`; return the stream chunk it makes (None when it has nothing to show yet)."""
        i = event.index
        self.texts[i] += event.text
        self.counts[i] += len(event.tokens)
        if event.logprobs:
            self.logprobs[i].extend(event.logprobs)
            self.pending[i].extend(event.logprobs)
        if event.finish_reason is not None:
            self.finish[i] = event.finish_reason
            self.finished += 1
        if not event.text and event.finish_reason is None:
            return None  # held back: the logprobs wait for the text they belong to
        entries, self.pending[i] = self.pending[i], []
        return self._chunk(i, event.text, entries, event.finish_reason)

    def _logprobs(self, i: int, entries: list[Any], offset: int = 0) -> Any:
        if self.parsed.options.logprobs is None:
            return None
        if self.chat:
            return {"content": chat_logprobs(self.tokens, entries)}
        return completion_logprobs(self.tokens, entries, offset)

    def opening(self) -> list[dict[str, Any]]:
        """A chat stream's first chunks: the role, one per choice."""
        if not self.chat:
            return []
        return [
            self._wrap(
                "chat.completion.chunk",
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            )
            for i in range(len(self.finish))
        ]

    def _chunk(self, i: int, text: str, entries: list[Any], finish: str | None) -> dict[str, Any]:
        if self.chat:
            delta = {"content": text} if text or finish is None else {}
            choice = {
                "index": i,
                "delta": delta,
                "logprobs": self._logprobs(i, entries),
                "finish_reason": finish,
            }
            return self._wrap("chat.completion.chunk", [choice])
        offset = len(self.texts[i]) - len(text)
        choice = {
            "index": i,
            "text": text,
            "logprobs": self._logprobs(i, entries, offset),
            "finish_reason": finish,
        }
        return self._wrap("text_completion", [choice])

    def _wrap(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = {
            "id": self.parsed.id,
            "object": kind,
            "created": self.parsed.created,
            "model": self.model,
            "choices": choices,
        }
        if self.parsed.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {
            "id": self.parsed.id,
            "object": kind,
            "created": self.parsed.created,
            "model": self.model,
            "choices": [],
            "usage": usage(self.prompt_tokens, sum(self.counts)),
        }

    def body(self) -> dict[str, Any]:
        """The non-streamed response."""
        choices = []
        for i, text in enumerate(self.texts):
            if self.chat:
                choice = {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": self._logprobs(i, self.logprobs[i]),
                    "finish_reason": self.finish[i],
                }
            else:
                choice = {
                    "index": i,
                    "text": text,
                    "logprobs": self._logprobs(i, self.logprobs[i]),
                    "finish_reason": self.finish[i],
                }
            choices.append(choice)
        return {
            "id": self.parsed.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.parsed.created,
            "model": self.model,
            "choices": choices,
            "usage": usage(self.prompt_tokens, sum(self.counts)),
            "system_fingerprint": None,
        }
