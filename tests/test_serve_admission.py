"""When the serving engine reads a new request: after a step that ended requests it waits a moment for
the clients' next ones (`Engine(admit_wait=...)`, `stablelm serve --admit-wait`)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from test_serve_invariance import _Tokenizer, tiny_model

from stablelm import cli
from stablelm.cli.options import bounded
from stablelm.serve import Engine, Event, Job, SamplingOptions
from stablelm.serve.forward import RowForward

pytestmark = pytest.mark.usefixtures("plans_of_the_session")  # see conftest

STEP = 0.3  # seconds each decode step is made to take: the others' step a late request would wait for
CLIENT = 0.03  # seconds between a request's end and its client's next one (an HTTP round trip)


@pytest.fixture(scope="module")
def model():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model(torch.float32)
    torch.set_num_threads(before)


def _next_request_after_an_ending(model, monkeypatch, admit_wait):
    """A long request keeps the engine decoding; a short one ends, and its client sends the next one
    CLIENT seconds later. Returns the engine's operations in order ("prefill X" / "decode") and the
    next request's time to its first event."""
    log, lock = [], threading.Lock()
    real_prefill, real_decode = RowForward.prefill, RowForward.decode

    def prefill(self, cache, chunk, **kwargs):
        with lock:
            log.append(f"prefill {chunk[0]}")
        return real_prefill(self, cache, chunk, **kwargs)

    def decode(self, caches, tokens):
        with lock:
            log.append("decode")
        time.sleep(STEP)
        return real_decode(self, caches, tokens)

    monkeypatch.setattr(RowForward, "prefill", prefill)
    monkeypatch.setattr(RowForward, "decode", decode)
    engine = Engine(
        lambda: SimpleNamespace(model=model, tokenizer=_Tokenizer()),
        max_batch=2,
        max_queue=4,
        admit_wait=admit_wait,
    )
    engine.start()
    while engine.state == "loading":
        time.sleep(0.01)
    ended, first_of_next, done = threading.Event(), threading.Event(), threading.Event()

    def short_sink(event):
        if isinstance(event, Event) and event.finish_reason:
            ended.set()

    def next_sink(event):
        first_of_next.set()
        if isinstance(event, Event) and event.finish_reason:
            done.set()

    greedy = SamplingOptions(max_tokens=2, temperature=0.0)
    engine.submit(
        [Job([7, 1, 2], 1, SamplingOptions(max_tokens=12, temperature=0.0), frozenset(), lambda e: None)]
    )
    engine.submit([Job([8, 1, 2], 1, greedy, frozenset(), short_sink)])
    try:
        assert ended.wait(30)
        time.sleep(CLIENT)
        sent = time.perf_counter()
        engine.submit([Job([9, 1, 2], 1, greedy, frozenset(), next_sink)])
        assert first_of_next.wait(30)
        waited = time.perf_counter() - sent
        assert done.wait(30)
    finally:
        engine.stop()
        engine.join(10)
    with lock:
        return list(log), waited


def test_a_clients_next_request_is_read_before_the_next_decode_step(model, monkeypatch):
    # admit_wait 1: up to min(0.1 s, the step's time) -- more than the client's 30 ms
    log, waited = _next_request_after_an_ending(model, monkeypatch, 1.0)
    after_end = log[log.index("prefill 8") :]
    # the short request: its prompt, two tokens (the first from its prefill, one decode step), then
    # the next request's prompt at once
    assert after_end[:3] == ["prefill 8", "decode", "prefill 9"], log
    assert waited < STEP, waited  # no decode step of the others before its first token


def test_without_the_wait_the_next_request_waits_for_a_decode_step(model, monkeypatch):
    log, waited = _next_request_after_an_ending(model, monkeypatch, 0.0)
    after_end = log[log.index("prefill 8") :]
    assert after_end[:4] == ["prefill 8", "decode", "decode", "prefill 9"], log
    assert waited >= STEP - 0.05, waited


def test_the_wait_does_not_hold_up_a_stop(model):
    engine = Engine(lambda: SimpleNamespace(model=model, tokenizer=_Tokenizer()), max_batch=2, admit_wait=1.0)
    engine.start()
    while engine.state == "loading":
        time.sleep(0.01)
    finished = threading.Event()
    engine.submit(
        [
            Job(
                [3, 4],
                1,
                SamplingOptions(max_tokens=1, temperature=0.0),
                frozenset(),
                lambda e: finished.set(),
            )
        ]
    )
    assert finished.wait(30)
    started = time.perf_counter()
    engine.stop()
    engine.join(10)
    assert engine.state == "stopped" and time.perf_counter() - started < 5


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "0.1", None])
def test_a_bad_admit_wait_is_refused(model, value):
    with pytest.raises(ValueError, match="admit_wait must be a number from 0 to 1"):
        Engine(lambda: None, admit_wait=value)


@pytest.mark.parametrize("value", ["-1", "2", "nan", "inf", "x"])
def test_a_bad_admit_wait_option_is_a_usage_error(value, capsys):
    assert cli.main(["serve", "--admit-wait", value]) == 2
    err = capsys.readouterr().err
    assert "argument --admit-wait: expected a number in [0, 1], got" in err and value in err, err


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_number_options_refuse_values_that_are_not_finite(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=f"expected a number >= 0, got {text}"):
        bounded(float, low=0.0)(text)
