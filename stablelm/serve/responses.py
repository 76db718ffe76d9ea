"""Pieces of OpenAI's response bodies: token logprobs as text and bytes, and usage counts."""

from __future__ import annotations

from typing import Any

from .jobs import TokenLogprob


class Tokens:
    """Token ids as OpenAI's logprobs show them: text, and bytes."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        decoder = getattr(tokenizer.backend_tokenizer, "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._byte_map = _unicode_to_bytes() if self._byte_level else {}

    def text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = self.tokenizer.decode([token])
        return self._text[token]

    def bytes(self, token: int) -> list[int]:
        if token not in self._bytes:
            piece = self.tokenizer.convert_ids_to_tokens(token) or ""
            if self._byte_level and piece and all(c in self._byte_map for c in piece):
                raw = bytes(self._byte_map[c] for c in piece)
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                raw = bytes([int(piece[3:5], 16)])
            else:
                raw = self.text(token).encode("utf-8")
            self._bytes[token] = list(raw)
        return self._bytes[token]


def _unicode_to_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the byte each character of a token stands for."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def chat_logprobs(tokens: Tokens, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """`choices[i].logprobs.content` of a chat response."""
    return [
        {
            "token": tokens.text(e.token),
            "logprob": e.logprob,
            "bytes": tokens.bytes(e.token),
            "top_logprobs": [
                {"token": tokens.text(t), "logprob": lp, "bytes": tokens.bytes(t)} for t, lp in e.top
            ],
        }
        for e in entries
    ]


def completion_logprobs(tokens: Tokens, entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """`choices[i].logprobs` of a completion: tokens, token_logprobs, top_logprobs, text_offset (counted
    from `offset`)."""
    texts = [tokens.text(e.token) for e in entries]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [e.logprob for e in entries],
        # the k most likely and the chosen token (OpenAI's legacy field: "up to logprobs+1 elements")
        "top_logprobs": [
            {tokens.text(t): lp for t, lp in e.top} | {tokens.text(e.token): e.logprob} for e in entries
        ],
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
