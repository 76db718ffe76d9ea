"""A row of the serving engine: one choice being decoded (its KV cache, generator, tokens and text
state), and giving the memory of finished rows' caches back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import secrets
from typing import Any

from .jobs import Job


class Row:
    """One choice being decoded: its cache, generator, tokens so far and text state."""

    def __init__(self, engine: Any, job: Job, index: int, cache: Any) -> None:
        import torch

        from ..cli.stream import StopFilter
        from ..tokenizer import StreamingDetokenizer

        self.job, self.index, self.cache = job, index, cache
        options = job.options
        self.generator = None
        if not options.greedy:
            seed = secrets.randbits(63) if options.seed is None else (options.seed + index) % 2**64
            self.generator = torch.Generator(device=engine.forward.device).manual_seed(seed)
        self.generated: list[int] = []
        self.counts = None  # per-token counts of the generated tokens, for presence/frequency penalties
        if options.presence_penalty or options.frequency_penalty:
            self.counts = torch.zeros(engine.vocab_size, dtype=torch.float32, device=engine.forward.device)
        self.detokenizer = StreamingDetokenizer(engine.tokenizer, skip_special_tokens=True)
        self.stops = StopFilter(options.stop)
        self.token: int | None = None  # the last drawn token: the next step feeds it
        self.finish: str | None = None


_LIBC: Any = None


def trim_memory() -> None:
    """Return freed heap memory to the system (glibc keeps large freed blocks otherwise)."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC else None
    if trim is not None:
        trim(0)
