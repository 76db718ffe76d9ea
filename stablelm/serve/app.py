"""The HTTP side: a FastAPI app with OpenAI's endpoints over an `Engine`.

Endpoints: `GET /health` (503 while the model loads, 200 when ready; never needs the API key),
`GET /v1/models` (and `/v1/models/{id}`), `POST /v1/completions`, `POST /v1/chat/completions`,
`GET /load` (rows running, jobs waiting) and `GET /version`.

Each request is checked (`protocol`), becomes one engine job per prompt, and its events come back
through an asyncio queue. Streams are server-sent events: `data: {json}\\n\\n` chunks, one id for the
whole stream, then `data: [DONE]\\n\\n`. A client that goes away (a closed stream, or a dropped
connection while a non-streamed request runs) cancels its jobs, which frees their rows at the next step.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .answer import Answer
from .engine import Engine, Event, Failure, Job, QueueFull, Unavailable
from .fields import ApiError, parse_json
from .protocol import Parsed, ServerInfo, parse_chat, parse_completion
from .responses import Tokens

MAX_BODY_BYTES = 8 * 2**20


RETRY_AFTER_SECONDS = 1  # what a 429 (queue full) asks clients to wait: a step frees rows within it


def error_response(err: ApiError) -> JSONResponse:
    headers = (
        {"WWW-Authenticate": "Bearer"}
        if err.status == 401
        else {"Retry-After": str(RETRY_AFTER_SECONDS)}
        if err.status == 429
        else None
    )
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def failure_error(failure: Failure) -> ApiError:
    """The error a job's `Failure` answers: a 400 for the request's own settings, else a 500."""
    kind = "invalid_request_error" if failure.status == 400 else "server_error"
    return ApiError(failure.status, failure.message, type=kind)


class EventStream(StreamingResponse):
    """A streaming response that also listens for the client going away while nothing is sent (a long
    prefill, a queue wait), so that its jobs are cancelled at once rather than at the next send."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def stream() -> None:
            try:
                await self.stream_response(send)
            except OSError:  # the client went away mid-send
                pass

        async with anyio.create_task_group() as group:

            async def run(func: Callable[[], Awaitable[None]]) -> None:
                await func()
                group.cancel_scope.cancel()

            group.start_soon(run, stream)
            await run(partial(self.listen_for_disconnect, receive))


def create_app(
    engine: Engine,
    *,
    model_id: str,
    api_key: str | None = None,
    created: int | None = None,
    chat_variables: dict[str, str] | None = None,
) -> FastAPI:
    """The app serving `engine`'s model as `model_id`; with `api_key`, every endpoint but /health and
    /version asks for `Authorization: Bearer <api_key>`. `chat_variables`: further variables for the chat
    template (read when the first request comes, so the loader may fill them in)."""
    app = FastAPI(title="stablelm", docs_url=None, redoc_url=None, openapi_url=None)
    created = created or int(time.time())
    state: dict[str, Any] = {}

    def info() -> ServerInfo:
        if "info" not in state:
            tokenizer = engine.tokenizer
            state["info"] = ServerInfo(
                model_id=model_id,
                tokenizer=tokenizer,
                context=engine.context,
                vocab_size=engine.model.get_input_embeddings().num_embeddings,
                max_batch=engine.max_batch,
                eos_ids=engine.eos_ids,
                defaults=engine.sampling_defaults,
                chat_stop_ids=chat_stop_ids(tokenizer),
                chat_variables=dict(chat_variables or {}),
            )
            state["tokens"] = Tokens(tokenizer)
        return state["info"]

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(
                401,
                "Invalid or missing API key: send the header 'Authorization: Bearer <key>' with the key the "
                "server was started with (--api-key).",
                code="invalid_api_key",
            )

    def check_ready() -> None:
        if engine.state == "loading":
            raise ApiError(503, "Loading model", type="unavailable_error", code="model_loading")
        if engine.state != "ready":
            raise ApiError(
                503, "The server is shutting down.", type="unavailable_error", code="shutting_down"
            )

    def guarded(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        """Errors become OpenAI's error body: an ApiError as it says, anything else a 500 (logged)."""

        @functools.wraps(handler)
        async def wrapper(*args: Any, **kwargs: Any) -> Response:
            try:
                return await handler(*args, **kwargs)
            except ApiError as err:
                return error_response(err)
            except Exception as err:  # noqa: BLE001 - a bug: logged, answered without a traceback
                traceback.print_exc(file=sys.stderr)
                return error_response(
                    ApiError(500, f"Internal server error ({type(err).__name__}).", type="server_error")
                )

        return wrapper

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(ApiError(exc.status_code, message, type=kind))

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: uptime checkers
    async def health() -> Response:
        if engine.state == "loading":
            return error_response(
                ApiError(503, "Loading model", type="unavailable_error", code="model_loading")
            )
        if engine.state != "ready":
            return error_response(
                ApiError(503, f"The server is {engine.state}.", type="unavailable_error", code=engine.state)
            )
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> Response:
        from .. import __version__

        return JSONResponse({"version": __version__})

    def model_card() -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "stablelm",
            "root": model_id,
            "parent": None,
            "max_model_len": engine.context,
        }

    @app.get("/v1/models")
    @guarded
    async def models(request: Request) -> Response:
        check_key(request)
        check_ready()
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{name:path}")
    @guarded
    async def model(request: Request, name: str) -> Response:
        check_key(request)
        check_ready()
        if name != model_id:
            raise ApiError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return JSONResponse(model_card())

    @app.get("/load")
    @guarded
    async def load(request: Request) -> Response:
        check_key(request)
        return JSONResponse({"state": engine.state, **engine.load()})

    async def read_body(request: Request) -> dict[str, Any]:
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":  # as vLLM; and a browser's form or text/plain post is refused
            raise ApiError(
                415,
                "Unsupported Media Type: Only 'application/json' is allowed (send the body with the header "
                f"'Content-Type: application/json'; got {media_type or 'none'}).",
            )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise ApiError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
        return parse_json(bytes(raw))

    @app.post("/v1/completions")
    @guarded
    async def completions(request: Request) -> Response:
        check_key(request)
        body = await read_body(request)
        check_ready()
        max_prompts = engine.max_batch + engine.max_queue
        parsed = await asyncio.to_thread(parse_completion, body, info(), max_prompts=max_prompts)
        return await serve(request, parsed)

    @app.post("/v1/chat/completions")
    @guarded
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        body = await read_body(request)
        check_ready()
        template = engine.tokenizer.chat_template
        parsed = await asyncio.to_thread(parse_chat, body, info(), chat_template=template)
        return await serve(request, parsed)

    async def serve(request: Request, parsed: Parsed) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event | Failure] = asyncio.Queue()

        def sink(event: Event | Failure) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        jobs = [
            Job(prompt, parsed.n, parsed.options, parsed.stop_ids, sink, first_index=i * parsed.n)
            for i, prompt in enumerate(parsed.prompts)
        ]
        try:
            engine.submit(jobs)
        except QueueFull as err:
            raise ApiError(
                429, f"The server is busy: {err}. Retry later.", type="rate_limit_error", code="queue_full"
            ) from None
        except Unavailable:
            check_ready()
            raise
        except ValueError as err:
            raise ApiError(400, str(err), param="n") from None
        answer = Answer(parsed, state["tokens"], len(jobs) * parsed.n, model_id)
        if parsed.stream:
            return EventStream(
                stream(answer, queue, jobs),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return await collect(request, answer, queue, jobs)

    async def collect(request: Request, answer: Answer, queue: asyncio.Queue, jobs: list[Job]) -> Response:
        """The whole response, unless the client goes away first (then the jobs are cancelled)."""

        async def gather() -> Response:
            while not answer.done:
                event = await queue.get()
                if isinstance(event, Failure):
                    raise failure_error(event)
                answer.add(event)
            return JSONResponse(answer.body())

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            return Response(status_code=499)  # nobody is listening
        finally:
            for task in (work, watch):
                task.cancel()
            if not answer.done:
                for job in jobs:
                    engine.cancel(job)

    async def stream(answer: Answer, queue: asyncio.Queue, jobs: list[Job]) -> AsyncIterator[str]:
        try:
            for chunk in answer.opening():
                yield sse(chunk)
            while not answer.done:
                event = await queue.get()
                if isinstance(event, Failure):
                    yield sse(failure_error(event).body())
                    break
                chunk = answer.add(event)
                if chunk is not None:
                    yield sse(chunk)
            else:
                if answer.parsed.include_usage:
                    yield sse(answer.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            if not answer.done:  # a stream cut short: its rows are freed at the next step
                for job in jobs:
                    engine.cancel(job)

    return app


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def chat_stop_ids(tokenizer: Any) -> frozenset[int]:
    """End-of-turn tokens of the model's chat template (ChatML's `<|im_end|>`, ...) that the vocabulary holds
    as single tokens: a chat reply ends there even where the tokenizer's EOS is another token."""
    from ..cli.templates import BUILTIN

    template = tokenizer.chat_template
    sources = template.values() if isinstance(template, dict) else [template] if template else []
    ids = set()
    for chat_format in BUILTIN.values():
        for stop in chat_format.stops:
            if not any(stop in source for source in sources) or stop == "<|im_start|>":
                continue
            found = tokenizer.convert_tokens_to_ids(stop)
            if found is not None and (stop == tokenizer.unk_token or found != tokenizer.unk_token_id):
                ids.add(int(found))
    return frozenset(ids)
