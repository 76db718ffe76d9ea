"""`stablelm serve`: an OpenAI-compatible HTTP server with continuous batching, batch-invariant.

- `engine`: the scheduler thread (queue, admission, chunked prefill, one decode step for all rows);
- `forward`: the model's forward as the engine runs it, each row computed the same in any batch;
- `protocol`: request validation and response bodies (OpenAI's shapes and errors);
- `app`: the FastAPI app (endpoints, streaming, API key, disconnects).

FastAPI and uvicorn are imported by `app` only (`pip install 'stablelm[serve]'`).
"""

from __future__ import annotations

from .engine import Engine, Event, Job, QueueFull, SamplingOptions, Unavailable

__all__ = ["Engine", "Event", "Job", "QueueFull", "SamplingOptions", "Unavailable"]
