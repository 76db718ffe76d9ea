"""Load an OpenAI-compatible server with concurrent streaming clients; print latency and throughput.

N requests (chat completions by default) are sent by C clients at once, each client sending its next
request when the previous one ends. Each request streams; per request the script records the time to
the first token (the first chunk with text), the gaps between later chunks (inter-token latency) and
the tokens generated (the final usage chunk, asked for with stream_options.include_usage, else the count
of chunks with text). It prints TTFT p50/p99, ITL p50/p99, aggregate generated tokens/s (all tokens over
the wall time of the run) and the errors (HTTP errors, error chunks, broken connections).

Any server with OpenAI's API works: `stablelm serve`, llama.cpp's `llama-server` (on a GGUF of the same
weights), vLLM. Every request asks for exactly --max-tokens tokens (`ignore_eos`, which vLLM and
llama-server also take; --no-ignore-eos drops it) at temperature 0, after a prompt of about
--prompt-tokens tokens (random common words, as many as one untimed request first shows to make that
many tokens on this server's tokenizer, chat template included), each prompt starting with its own
number so that no server can reuse another's prompt cache.

Run:  stablelm serve -m MODEL --max-batch 8 &
      python benchmarks/serve.py --base-url http://127.0.0.1:8000 --model stablelm-demo --concurrency 8 --requests 32
      python benchmarks/serve.py --base-url http://127.0.0.1:8080 --model any --concurrency 8 --requests 32 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue"
).split()


@dataclass
class Result:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None


def prompt_text(index: int, words: int, rng: random.Random) -> str:
    return f"{index}. " + " ".join(rng.choice(WORDS) for _ in range(max(words - 1, 0)))


async def one_request(client, args: argparse.Namespace, index: int, rng: random.Random) -> Result:  # noqa: ANN001
    text = prompt_text(index, getattr(args, "words", args.prompt_tokens), rng)
    body = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if not args.no_ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
        path = "/chat/completions"
    else:
        body["prompt"] = text
        path = "/completions"
    result = Result()
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", args.base_url + path, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:200]
                result.error = f"HTTP {response.status_code}: {detail}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data.strip() == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"error chunk: {event['error']}"
                    return result
                if event.get("usage"):
                    result.tokens = event["usage"].get("completion_tokens") or result.tokens
                    result.prompt_tokens = event["usage"].get("prompt_tokens")
                for choice in event.get("choices") or []:
                    piece = (
                        (choice.get("delta") or {}).get("content")
                        if args.endpoint == "chat"
                        else choice.get("text")
                    )
                    if piece:
                        now = time.perf_counter()
                        if result.ttft is None:
                            result.ttft = now - start
                        else:
                            result.gaps.append(now - last)
                        last = now
                        chunks += 1
    except Exception as err:  # noqa: BLE001 - a broken connection is one error of the run
        result.error = f"{type(err).__name__}: {err}"
        return result
    if not result.tokens:
        result.tokens = chunks
    if result.ttft is None:
        result.error = "no text streamed"
    return result


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linearly interpolated; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def calibrate(client, args: argparse.Namespace) -> None:  # noqa: ANN001
    """Set `args.words` so that prompts come to about --prompt-tokens tokens here (one untimed request,
    which also warms the server up)."""
    args.words = args.prompt_tokens
    saved = args.max_tokens
    args.max_tokens = 1
    probe = await one_request(client, args, -1, random.Random(-1))
    args.max_tokens = saved
    if probe.error is None and probe.prompt_tokens:
        args.words = max(1, round(args.prompt_tokens * args.prompt_tokens / probe.prompt_tokens))


async def run(args: argparse.Namespace) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    timeout = httpx.Timeout(args.timeout, connect=30)
    results: list[Result] = []
    next_index = iter(range(args.requests))
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        await calibrate(client, args)

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            for index in next_index:
                results.append(await one_request(client, args, index, rng))

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
        wall = time.perf_counter() - start
    good = [r for r in results if r.error is None]
    ttfts = [r.ttft for r in good]
    gaps = [g for r in good for g in r.gaps]
    tokens = sum(r.tokens for r in good)
    prompts = [r.prompt_tokens for r in good if r.prompt_tokens is not None]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {
        "base_url": args.base_url,
        "model": args.model,
        "endpoint": args.endpoint,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "errors": len(results) - len(good),
        "first_errors": [r.error for r in results if r.error][:3],
        "prompt_tokens_mean": round(sum(prompts) / len(prompts), 1) if prompts else None,
        "generated_tokens": tokens,
        "wall_s": round(wall, 3),
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "itl_p50_ms": ms(percentile(gaps, 50)),
        "itl_p99_ms": ms(percentile(gaps, 99)),
        "tokens_per_s": round(tokens / wall, 2) if wall else None,
    }


def report(summary: dict) -> str:
    return "\n".join(
        [
            f"server {summary['base_url']}  model {summary['model']}  {summary['endpoint']}  "
            f"concurrency {summary['concurrency']}  requests {summary['requests']}  errors {summary['errors']}",
            f"prompt tokens (mean) {summary['prompt_tokens_mean']}  generated tokens {summary['generated_tokens']}"
            f"  in {summary['wall_s']} s",
            f"TTFT  p50 {summary['ttft_p50_ms']} ms  p99 {summary['ttft_p99_ms']} ms",
            f"ITL   p50 {summary['itl_p50_ms']} ms  p99 {summary['itl_p99_ms']} ms",
            f"aggregate {summary['tokens_per_s']} generated tokens/s",
            *[f"error: {e}" for e in summary["first_errors"]],
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000 (with or without /v1)"
    )
    parser.add_argument("--model", required=True, help="the model id the server knows")
    parser.add_argument("--concurrency", type=int, default=1, help="clients sending at once (default 1)")
    parser.add_argument("--requests", type=int, default=16, help="requests in all (default 16)")
    parser.add_argument(
        "--prompt-tokens", type=int, default=128, help="words in each prompt, about one token each"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=64, help="tokens each request generates (default 64)"
    )
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--no-ignore-eos", action="store_true", help="let requests end at EOS (lengths then vary)"
    )
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a request may take (default 600)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = parser.parse_args(argv)
    for name in ("concurrency", "requests", "max_tokens", "prompt_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.base_url = args.base_url.rstrip("/")
    if not args.base_url.endswith("/v1"):
        args.base_url += "/v1"
    summary = asyncio.run(run(args))
    print(json.dumps(summary) if args.json else report(summary))
    return 1 if summary["errors"] == summary["requests"] else 0


if __name__ == "__main__":
    sys.exit(main())
