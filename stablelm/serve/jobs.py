"""What the engine is given and what it gives back: a `Job` per prompt, an `Event` per token made (or a
`Failure`), and the errors `submit` raises."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .sampling import SamplingOptions


class QueueFull(Exception):
    """The queue holds `max_queue` jobs already."""


class Unavailable(Exception):
    """The engine is loading, failed to load, or is shutting down."""


@dataclass
class TokenLogprob:
    """A drawn token's log-probability under the model, and the `top` most likely (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What one row made in one step. `index` is the choice's index in the HTTP response; `tokens` the
    token drawn (none for a job aborted before it started); `text` what may be shown now;
    `finish_reason` is set on a row's last event ("stop", "length" or "abort")."""

    index: int
    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None


@dataclass
class Failure:
    """The engine failed on this job; the job's rows are gone. `status` 500: an error inside the model's
    step; 400: the request's own settings made its token scores unusable (`SamplingError`)."""

    message: str
    status: int = 500


class SamplingError(ValueError):
    """A row's scores after its logits processors are NaN, or give no probabilities to draw from (a
    `repetition_penalty` or `logit_bias` that overflows float32): the request's fault, not the server's."""


@dataclass(eq=False)
class Job:
    """One prompt to continue `n` times.

    Attributes:
        prompt: The prompt's token ids.
        n: Choices (rows) to make.
        options: Sampling and stopping.
        stop_ids: Tokens that end a row (EOS, end of turn), unless `options.ignore_eos`.
        sink: Called from the engine's thread with each `Event` (or a `Failure`).
        first_index: Index of the job's first choice in the response (prompts of a batch follow each other).
    """

    prompt: list[int]
    n: int
    options: SamplingOptions
    stop_ids: frozenset[int]
    sink: Callable[[Event | Failure], None]
    first_index: int = 0
    cancelled: bool = field(default=False, init=False)
