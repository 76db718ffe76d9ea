"""Serve a model over HTTP with OpenAI's API, many requests decoded together.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (503 while the
model loads, then 200), GET /load. Requests that arrive while others decode join them at the next step
(up to --max-batch rows; beyond that up to --max-queue requests wait, and more get 429). A request's
tokens and logprobs do not depend on the other requests running beside it (batch-invariant): at
temperature 0, or with a seed, the same request gives the same answer, bit for bit, alone or in a crowd.
Listens on 127.0.0.1 unless --host says otherwise; Ctrl-C or SIGTERM stops it: requests in flight end
with finish_reason "abort", and it exits with status 0. Needs FastAPI and uvicorn (pip install
'stablelm[serve]'). See docs/server.md.

examples:
  stablelm serve
  stablelm serve -m stabilityai/stablelm-2-zephyr-1_6b --port 8080 --api-key "$KEY"
  stablelm serve -m ./base-model-tuned-on-chatml --chat-template chatml
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"prompt": "The for statement", "max_tokens": 32, "temperature": 0}'
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import Any

from .errors import CliError, UsageError
from .options import add_load_options, bounded
from .templates import BUILTIN, ChatFormat, chosen_template, find_template

API_KEY_ENV = "STABLELM_API_KEY"
DEMO_MODEL_ID = "stablelm-demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_load_options(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument(
        "--port",
        type=bounded(int, low=0, high=65535),
        default=8000,
        help="port (default: 8000; 0 picks a free one)",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"ask every request but /health for 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none)",
    )
    parser.add_argument(
        "--model-id",
        metavar="NAME",
        help=f"the model's name in the API (default: --model as given, or {DEMO_MODEL_ID} for the demo model)",
    )
    parser.add_argument(
        "--chat-template",
        metavar="FILE|NAME",
        help=f"the chat format of /v1/chat/completions, for a model without a template (or instead of its "
        f"own): a Jinja file, one of {', '.join(sorted(BUILTIN))}, or the name of one of the tokenizer's",
    )
    parser.add_argument(
        "--max-batch",
        type=bounded(int, low=1, high=256),
        default=8,
        metavar="N",
        help="most rows (choices of requests) decoded together (default: 8)",
    )
    parser.add_argument(
        "--max-queue",
        type=bounded(int, low=1),
        default=64,
        metavar="M",
        help="most requests waiting for a row; beyond them requests get 429 (default: 64)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=bounded(int, low=1),
        default=128,
        metavar="N",
        help="prompt tokens run in one step, between the decode steps of the others; a last piece of up to "
        "a quarter of that joins the chunk before it (default: 128)",
    )
    parser.add_argument(
        "--admit-wait",
        type=bounded(float, low=0.0, high=1.0),
        default=0.05,
        metavar="F",
        help="after a step that ended requests, wait up to F times that step's time (at most 0.1 s) for new "
        "ones before the next step, so that a client's next request is read at once; 0 never waits "
        "(default: 0.05)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise CliError(
            f"stablelm serve needs FastAPI and uvicorn ({err.name} is missing): pip install 'stablelm[serve]'"
        ) from None
    from ..serve.app import create_app
    from ..serve.engine import Engine
    from .loading import load, model_source

    source = model_source(args.model)  # no model and no demo: a usage error before anything starts
    model_id = args.model_id or (args.model if args.model else DEMO_MODEL_ID)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty: give a key, or leave the option out")
    chat_format = find_template(args.chat_template) if args.chat_template else None  # a bad file: now
    chat_variables: dict[str, str] = {}
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    server: Any = None

    def failed(err: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    def loader() -> Any:
        from ..checkpoint import huge_pages

        with huge_pages.preferred():  # loaded once, served for long: the weights in huge pages
            loaded = load(args)
        if args.chat_template:
            chat_variables.update(use_chat_template(loaded.tokenizer, args.chat_template, chat_format))
        dtype = str(loaded.model.dtype).removeprefix("torch.")
        print(
            f"stablelm: ready: {model_id} ({dtype} on {loaded.model.device}, {args.threads_used} thread{'' if args.threads_used == 1 else 's'}, "
            f"max batch {args.max_batch}) in {loaded.seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        return loaded

    engine = Engine(
        loader,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        admit_wait=args.admit_wait,
        on_failure=failed,
    )
    app = create_app(engine, model_id=model_id, api_key=api_key, chat_variables=chat_variables)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
        lifespan="off",
        loop="asyncio",
    )
    server = _Server(config, engine)
    print(
        f"stablelm: listening on {url} (OpenAI API at {url}/v1; {'API key required; ' if api_key else ''}"
        f"loading {source} as {model_id!r})",
        file=sys.stderr,
        flush=True,
    )
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        engine.join(timeout=30)
        sock.close()
    if engine.error is not None:
        raise engine.error
    print("stablelm: stopped", file=sys.stderr, flush=True)
    return 0


def use_chat_template(tokenizer: Any, value: str, chat_format: ChatFormat | None) -> dict[str, str]:
    """Make --chat-template the tokenizer's chat template; return the template variables to render with
    (a built-in's special tokens that the tokenizer does not define).

    Raises:
        UsageError: `value` names no file, built-in or template of the tokenizer.
    """
    tokenizer.chat_template, variables = chosen_template(tokenizer, value, chat_format)
    return variables


class _Server:
    """uvicorn's server, whose Ctrl-C/SIGTERM also aborts the engine's requests (so that their responses
    end and the connections close), and is not raised again once the server has stopped: exit status 0."""

    def __new__(cls, config: Any, engine: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True  # a second Ctrl-C: stop waiting for connections
                    return
                if not self.should_exit:
                    print("stablelm: shutting down: requests in flight end now", file=sys.stderr, flush=True)
                self.should_exit = True
                engine.stop()

        return Server(config)


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (bound here, so that the port is known before serving starts)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise UsageError(
            f"--host {host!r} is not an address this machine can listen on ({err.strerror})"
        ) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as err:
        sock.close()
        raise CliError(
            f"cannot listen on {host}:{port}: {err.strerror or err}"
            + (": pick another --port (0 picks a free one)" if err.errno in (98, 48) else "")
        ) from None
    return sock
