"""`stablelm serve`: an OpenAI-compatible HTTP server with continuous batching, batch-invariant.

- `engine`: the scheduler thread (queue, admission, chunked prefill, one decode step for all rows);
- `forward`: the model's forward as the engine runs it, each row computed the same in any batch;
- `jobs`: what the engine is given (a `Job` per prompt) and gives back (`Event`s);
- `sampling`: a request's sampling options, its logits processors and the checkpoint's defaults;
- `protocol`: request validation (OpenAI's shapes), with `fields` reading single fields and raising
  OpenAI's errors, and `responses` shaping logprobs and usage;
- `app`: the FastAPI app (endpoints, streaming, API key, disconnects).

FastAPI and uvicorn are imported by `app` only (`pip install 'stablelm[serve]'`).
"""

from __future__ import annotations

from .engine import Engine
from .jobs import Event, Job, QueueFull, Unavailable
from .sampling import SamplingOptions

__all__ = ["Engine", "Event", "Job", "QueueFull", "SamplingOptions", "Unavailable"]
