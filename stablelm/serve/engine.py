"""The serving engine: one model in one thread, many requests decoded together (continuous batching).

A request becomes one `Job` per prompt; a job takes `n` rows (one per choice). Rows are what the engine
decodes together, at most `max_batch` of them. A job is admitted at once when it has rows free and
nobody waits before it; else it waits in a queue of at most `max_queue` jobs (beyond it, `submit`
raises `QueueFull`). Each step of the engine's thread:

1. drops cancelled jobs (a client went away): their rows and caches are freed at once;
2. runs one prefill chunk (`prefill_chunk` tokens; the last piece of a prompt joins the chunk before
   it when it is at most a quarter of that) of the oldest admitted job still prefilling; chunks are cut
   from the prompt's start, so they depend on the prompt alone. After its last
   chunk the job's `n` rows draw their first token and join the running rows;
3. runs one decode step of every running row together (`RowForward.decode`, batch-invariant);
4. samples each row's next token with the row's own settings and generator, turns it into text
   (incomplete UTF-8 and text that may begin a stop string held back), and sends an `Event` to the
   job's sink; a finished row leaves, and its rows go to the next job waiting.

After a step that ended requests, with rows free and no job waiting for them, the engine waits a moment
(`admit_wait` of that step's time, at most `ADMIT_WAIT_MAX` seconds; it goes on as soon as a job
comes) before the next step: a client that sends its next request as soon as it has an answer (a
worker pool, an agent) is then read at once. Without the wait that request lands a few milliseconds
into a step that began without it, and under load waits for another's prompt and a decode step first
(docs/server.md, "Time to first token").

Events reach the asyncio side through `Job.sink` (the app passes `loop.call_soon_threadsafe`). `stop()`
aborts everything (finish_reason "abort") and ends the thread.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from .jobs import Event, Failure, Job, QueueFull, SamplingError, TokenLogprob, Unavailable
from .rows import Row, trim_memory
from .sampling import process_scores, sampling_defaults, unusable_scores


@dataclass
class _Prefill:
    job: Job
    cache: Any
    done: int = 0


ADMIT_WAIT_MAX = 0.1  # seconds: the longest wait for new requests after a step that ended some


class Engine:
    """Owns the model and runs the scheduler in a background thread (see the module docstring).

    Args:
        load: Called in the engine's thread; returns an object with `model` and `tokenizer` (the CLI's
            `Loaded`). Until it returns, `state` is "loading".
        max_batch: Most rows decoded together.
        max_queue: Most jobs waiting for rows.
        prefill_chunk: Prompt tokens run in one step; a last piece of at most a quarter of that goes with
            the chunk before it (a 129-token prompt is one chunk of 129 at the default 128).
        admit_wait: After a step that ended requests, how long to wait for new ones before the next
            step, as a fraction of that step's time (at most `ADMIT_WAIT_MAX` seconds); 0: never wait.
        on_failure: Called (from the engine's thread) if loading fails; the error is kept in `error`.
    """

    def __init__(
        self,
        load: Callable[[], Any],
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 128,
        admit_wait: float = 0.05,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        for name, value in (
            ("max_batch", max_batch),
            ("max_queue", max_queue),
            ("prefill_chunk", prefill_chunk),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if (
            isinstance(admit_wait, bool)
            or not isinstance(admit_wait, (int, float))
            or not 0 <= admit_wait <= 1
        ):
            raise ValueError(f"admit_wait must be a number from 0 to 1, got {admit_wait!r}.")
        self.admit_wait = float(admit_wait)
        self._load = load
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self._on_failure = on_failure
        self.state = "loading"  # loading, ready, failed, stopping, stopped
        self.error: BaseException | None = None
        self.loaded: Any = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.forward: Any = None
        self.context = 0
        self.vocab_size = 0
        self.eos_ids: frozenset[int] = frozenset()
        self.sampling_defaults: dict[str, float] = {}
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()  # jobs without rows yet
        self._admitted: deque[Job] = deque()  # jobs given rows, not yet taken up by the thread
        self._free_rows = max_batch
        self._stop_requested = False
        self._wake = False  # a cancellation to act on
        self._prefilling: list[_Prefill] = []  # the thread's own from here on
        self._rows: list[Row] = []
        self.counters = {"steps": 0, "finished": 0, "cancelled": 0, "aborted": 0, "failed": 0}
        self._thread = threading.Thread(target=self._main, name="stablelm-engine", daemon=True)

    # --- the asyncio side ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, jobs: Iterable[Job]) -> None:
        """Queue `jobs` (all of them or none).

        Raises:
            Unavailable: Not ready (loading, failed, stopping).
            QueueFull: They do not fit in the queue now.
            ValueError: A job asks for more rows than `max_batch`.
        """
        jobs = list(jobs)
        for job in jobs:
            if not 1 <= job.n <= self.max_batch:
                raise ValueError(
                    f"n must be between 1 and {self.max_batch} (the server's --max-batch), got {job.n}."
                )
        with self._cond:
            if self.state != "ready" or self._stop_requested:
                raise Unavailable(self.state)
            free, waiting = self._free_rows, len(self._waiting)
            admit = []
            for job in jobs:  # admitted now while rows are free and nobody waits before them
                if waiting == 0 and job.n <= free:
                    admit.append(job)
                    free -= job.n
                else:
                    waiting += 1
            if waiting > self.max_queue:
                raise QueueFull(
                    f"the queue holds {_count(self.max_queue, 'request')} waiting for rows already"
                )
            self._free_rows = free
            self._admitted.extend(admit)
            self._waiting.extend(job for job in jobs if job not in admit)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop `job` (its client went away): its rows are freed at the start of the next step."""
        if not job.cancelled:
            job.cancelled = True
            with self._cond:
                self._wake = True
                self._cond.notify()

    def stop(self) -> None:
        """Stop taking jobs, abort the ones in flight (finish_reason "abort") and end the thread."""
        with self._cond:
            self._stop_requested = True
            if self.state == "ready":
                self.state = "stopping"
            self._cond.notify()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def load(self) -> dict[str, int]:
        """Rows running, jobs prefilling and waiting, and the step counters (for /load and tests)."""
        with self._cond:
            waiting, admitted, free = len(self._waiting), len(self._admitted), self._free_rows
        caches = [row.cache for row in list(self._rows)] + [p.cache for p in list(self._prefilling)]
        return {
            "rows_running": len(self._rows),
            "kv_cache_bytes": sum(c.nbytes() for c in caches if c is not None),
            "rows_free": free,
            "prefilling": len(self._prefilling) + admitted,
            "waiting": waiting,
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            **self.counters,
        }

    # --- the engine's thread -------------------------------------------------------------------------

    def _main(self) -> None:
        import torch

        with torch.inference_mode():
            try:
                self._setup(self._load())
            except BaseException as err:  # noqa: BLE001 - reported to the caller, who ends the server
                self.error = err
                with self._cond:
                    self.state = "failed"
                if self._on_failure is not None:
                    self._on_failure(err)
                return
            try:
                self._loop()
            finally:
                with self._cond:
                    self.state = "stopped"

    def _setup(self, loaded: Any) -> None:
        from ..generation import resolve_config
        from .forward import RowForward

        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.model.eval()
        self.forward = RowForward(self.model)
        self.context = self.forward.context
        self.vocab_size = self.model.lm_head.weight.shape[0]
        eos = resolve_config(self.model, None).eos_token_id
        ids = set([eos] if isinstance(eos, int) else list(eos or []))
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(int(i) for i in ids)
        self.sampling_defaults = sampling_defaults(getattr(self.model, "generation_config", None))
        with self._cond:
            if self.state == "loading":
                self.state = "stopping" if self._stop_requested else "ready"

    def _loop(self) -> None:
        trimmed = True
        wait_for_new = 0.0  # seconds: after a step that ended requests, how long to wait for new ones
        while True:
            with self._cond:
                if wait_for_new > 0 and self._free_rows > 0 and not self._waiting:
                    self._cond.wait_for(
                        lambda: self._admitted or self._stop_requested or self._wake, timeout=wait_for_new
                    )
                while not (
                    self._stop_requested or self._wake or self._admitted or self._prefilling or self._rows
                ):
                    if not trimmed:
                        trim_memory()  # idle: give the freed caches back to the system
                        trimmed = True
                    self._cond.wait()
                trimmed = False
                self._wake = False
                if self._stop_requested:
                    self._abort_all()
                    return
                self._drop_cancelled()
                self._prefilling.extend(_Prefill(job, None) for job in self._admitted)
                self._admitted.clear()
            self.counters["steps"] += 1
            started = time.perf_counter()
            if self._prefilling:
                self._guarded([self._prefilling[0].job], self._prefill_step)
            decoding = [row for row in self._rows if row.token is not None and row.finish is None]
            if decoding:
                self._guarded([row.job for row in decoding], partial(self._decode_step, decoding))
            finished = [row for row in self._rows if row.finish is not None]
            if finished:
                self.counters["finished"] += len(finished)
                self._rows = [row for row in self._rows if row.finish is None]
                with self._cond:
                    self._recount()
            wait_for_new = (
                min(ADMIT_WAIT_MAX, self.admit_wait * (time.perf_counter() - started)) if finished else 0.0
            )

    def _guarded(self, jobs: list[Job], work: Callable[[], None]) -> None:
        """Run `work`; if it raises, fail `jobs` (their rows go) and keep serving the others."""
        try:
            work()
        except SamplingError as err:  # the request's own settings: a 400 for it alone
            failure = Failure(str(err), status=400)
        except Exception as err:  # noqa: BLE001 - a bug or out of memory: the server keeps running
            print(f"stablelm: error in the engine's step: {type(err).__name__}: {err}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            failure = Failure(f"the server failed to generate: {type(err).__name__}: {err}")
        else:
            return
        failed = {id(job) for job in jobs}
        for job in {id(job): job for job in jobs}.values():
            job.cancelled = True
            job.sink(failure)
        self.counters["failed"] += len(failed)
        self._prefilling = [p for p in self._prefilling if id(p.job) not in failed]
        self._rows = [row for row in self._rows if id(row.job) not in failed]
        with self._cond:
            self._recount()

    def _drop_cancelled(self) -> None:
        """(Under the lock.) Forget cancelled jobs: waiting, admitted, prefilling, and their rows."""
        dropped = {id(job) for job in (*self._waiting, *self._admitted) if job.cancelled}
        dropped |= {id(p.job) for p in self._prefilling if p.job.cancelled}
        dropped |= {id(row.job) for row in self._rows if row.job.cancelled}
        if not dropped:
            return
        self.counters["cancelled"] += len(dropped)
        self._waiting = deque(job for job in self._waiting if not job.cancelled)
        self._admitted = deque(job for job in self._admitted if not job.cancelled)
        self._prefilling = [p for p in self._prefilling if not p.job.cancelled]
        self._rows = [row for row in self._rows if not row.job.cancelled]
        self._recount()

    def _recount(self) -> None:
        """(Under the lock.) The rows free now, given to the jobs waiting, in order."""
        held = sum(job.n for job in self._admitted) + sum(p.job.n for p in self._prefilling) + len(self._rows)
        self._free_rows = self.max_batch - held
        while self._waiting and self._waiting[0].n <= self._free_rows:
            job = self._waiting.popleft()
            self._free_rows -= job.n
            self._admitted.append(job)

    def _abort_all(self) -> None:
        """(Under the lock.) Every job in flight or waiting ends now, with finish_reason "abort"."""
        jobs = {}
        for row in self._rows:
            if not row.job.cancelled:
                jobs[id(row.job)] = row.job
                self._finish(row, "abort", token=None, logprob=None)
        for job in [*self._waiting, *self._admitted, *(p.job for p in self._prefilling)]:
            if not job.cancelled and id(job) not in jobs:
                jobs[id(job)] = job
                for i in range(job.n):
                    job.sink(
                        Event(
                            job.first_index + i,
                            "",
                            [],
                            [] if job.options.logprobs is not None else None,
                            "abort",
                        )
                    )
        self.counters["aborted"] += len(jobs)
        self._rows.clear()
        self._prefilling.clear()
        self._waiting.clear()
        self._admitted.clear()
        self._free_rows = self.max_batch

    def _prefill_step(self) -> None:
        prefill = self._prefilling[0]
        job = prefill.job
        prompt = job.prompt
        if prefill.cache is None:
            prefill.cache = self.forward.new_cache(len(prompt) + job.options.max_tokens)
        end = prefill.done + self.prefill_chunk
        if len(prompt) - end <= self.prefill_chunk // 4:  # a short last piece goes with this chunk:
            end = len(prompt)  # a step of its own would cost the others a decode step for a few tokens
        chunk = prompt[prefill.done : end]
        hidden = self.forward.prefill(prefill.cache, chunk, prompt_length=len(prompt))
        prefill.done += len(chunk)
        if prefill.done < len(prompt):
            return
        self._prefilling.pop(0)
        logits = self.forward.logits(hidden)[0]
        for index in range(job.n):
            cache = prefill.cache if index == job.n - 1 else prefill.cache.copy()
            row = Row(self, job, index, cache)
            self._rows.append(row)
            self._next(row, logits)

    def _decode_step(self, rows: list[Row]) -> None:
        logits = self.forward.decode([row.cache for row in rows], [row.token for row in rows])
        for row, row_logits in zip(rows, logits, strict=True):
            if (
                not row.job.cancelled
            ):  # a row's failure (its own settings) fails its job, not the step's others
                self._guarded([row.job], partial(self._next, row, row_logits))

    # --- one row's next token --------------------------------------------------------------------------

    def _next(self, row: Row, logits: Any) -> None:
        """Draw `row`'s next token from its fp32 logits (V,), and send what it makes."""
        import torch

        options = row.job.options
        scores = logits[None]
        logprob = None
        if options.logprobs is not None:
            logprobs = torch.log_softmax(scores, dim=-1)[0]
        scores = process_scores(
            options,
            scores,
            prompt=row.job.prompt,
            generated=row.generated,
            counts=row.counts,
            stop_ids=row.job.stop_ids,
        )
        if options.greedy:
            if bool(torch.isnan(scores).any()):
                raise SamplingError(unusable_scores(options, "NaN"))
            token = int(torch.argmax(scores, dim=-1)[0])
        else:
            probs = torch.softmax(scores, dim=-1)
            if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
                raise SamplingError(unusable_scores(options, "no probabilities to draw from"))
            token = int(torch.multinomial(probs, 1, generator=row.generator)[0, 0])
        if options.logprobs is not None:
            top = []
            if options.logprobs:
                values, ids = torch.topk(logprobs, min(options.logprobs, logprobs.shape[0]))
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            logprob = TokenLogprob(token, float(logprobs[token]), top)
        row.generated.append(token)
        if row.counts is not None:
            row.counts[token] += 1
        row.token = token
        job = row.job
        if token in job.stop_ids and not options.ignore_eos:
            self._finish(row, "stop", token=token, logprob=logprob)
            return
        piece = row.detokenizer.push(token)
        # stop strings count from min_tokens on (as in vLLM)
        text = row.stops.push(piece) if len(row.generated) >= options.min_tokens else piece
        if row.stops.stopped or token in options.stop_token_ids:  # vLLM: the token's text is kept
            self._finish(row, "stop", token=token, logprob=logprob, text=text)
        elif len(row.generated) >= options.max_tokens:
            self._finish(row, "length", token=token, logprob=logprob, text=text)
        else:
            job.sink(
                Event(job.first_index + row.index, text, [token], None if logprob is None else [logprob])
            )

    def _finish(
        self, row: Row, reason: str, *, token: int | None, logprob: TokenLogprob | None, text: str = ""
    ) -> None:
        """End `row`: the text still held back (unless a stop string ended it) goes with its last event."""
        if not row.stops.stopped:
            text += row.stops.push(row.detokenizer.flush())
            if row.stops.stopped:
                reason = "stop"
            else:
                text += row.stops.flush()
        row.finish = reason
        job = row.job
        tokens = [] if token is None else [token]
        logprobs = None if logprob is None else [logprob]
        if job.options.logprobs is not None and logprobs is None:
            logprobs = []
        job.sink(Event(job.first_index + row.index, text, tokens, logprobs, reason))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
