"""`stablelm serve`, run for real: the command in a subprocess on 127.0.0.1 (a free port), a tiny
random-weight checkpoint with the GPT-NeoX tokenizer (and its Zephyr chat template), and clients as
applications use them: the official `openai` client, and raw HTTP (httpx) for the error cases."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import randomize_, tiny_config

import stablelm
from stablelm import AutoTokenizer
from stablelm.serve import unsupported

pytestmark = pytest.mark.usefixtures("plans_of_the_session")  # see conftest

FIXTURES = Path(__file__).parent / "fixtures"
LAUNCHER = (
    "import sys, stablelm.cli as c\n"
    "c.COMMAND_MODULES = c.COMMAND_MODULES if 'serve' in c.COMMAND_MODULES else (*c.COMMAND_MODULES, 'serve')\n"
    "sys.exit(c.main(sys.argv[1:]))"
)
MODEL_ID = "tiny"
KEY = "sekret-key"
CONTEXT = 1024
PROMPT = "The for statement"


def save_checkpoint(folder: Path, *, chat_template: bool = True) -> Path:
    """A 2-layer float32 model over the GPT-NeoX vocabulary, with that tokenizer (Zephyr template)."""
    config = tiny_config(
        vocab_size=50304,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=CONTEXT,
    )
    torch.manual_seed(0)
    model = stablelm.StableLmForCausalLM(config)
    randomize_(model, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(5)
        model.lm_head.weight[0] = 0  # EOS (id 0) never wins: replies run to max_tokens
    model.save_pretrained(folder)
    shutil.copy(FIXTURES / "gpt-neox-20b" / "tokenizer.json", folder / "tokenizer.json")
    tokenizer_config = json.loads((FIXTURES / "gpt-neox-20b" / "tokenizer_config.json").read_text())
    if not chat_template:
        del tokenizer_config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


class Server:
    """`stablelm serve` in a subprocess (on the demo model when `checkpoint` is None); its stderr is
    collected in `lines`."""

    def __init__(self, checkpoint: Path | None, *args: str) -> None:
        command = [sys.executable, "-c", LAUNCHER, "serve", "--port", "0", "--threads", "1"]
        if checkpoint is not None:
            command += ["-m", str(checkpoint), "--model-id", MODEL_ID]
        command += args
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("STABLELM_API_KEY", None)
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._listening.wait(60), self.stderr
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.stderr)
        assert found, self.stderr
        self.url = found[1]
        deadline = time.monotonic() + 60
        while httpx.get(self.url + "/health").status_code != 200:
            assert self.process.poll() is None and time.monotonic() < deadline, self.stderr
            time.sleep(0.05)

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            if "listening on" in line:
                self._listening.set()
        self._listening.set()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def client(self, **kwargs) -> openai.OpenAI:
        kwargs.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=60, **kwargs)

    def load(self, **headers) -> dict:
        return httpx.get(self.url + "/load", headers=headers).json()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("tiny-serve"))


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint):
    running = Server(checkpoint, "--max-batch", "8", "--prefill-chunk", "16")
    yield running
    status = running.stop()
    assert status == 0, running.stderr
    assert "Traceback" not in running.stderr and "error" not in running.stderr.lower(), running.stderr


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One row, one queue place, an API key, and a checkpoint without a chat template."""
    folder = save_checkpoint(tmp_path_factory.mktemp("tiny-no-template"), chat_template=False)
    running = Server(folder, "--max-batch", "1", "--max-queue", "1", "--api-key", KEY)
    yield running
    status = running.stop(signal.SIGINT)  # Ctrl-C
    assert status == 0, running.stderr
    assert "Traceback" not in running.stderr, running.stderr


def sse_events(response: httpx.Response):
    """The JSON payloads of a server-sent event stream, then the string "[DONE]"."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


# --- endpoints ------------------------------------------------------------------------------------------------


def test_health_models_and_startup_line(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.head(server.url + "/health").status_code == 200
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert models.data[0].object == "model"
    assert server.client().models.retrieve(MODEL_ID).id == MODEL_ID
    assert re.search(r"^stablelm: listening on http://127\.0\.0\.1:\d+ ", server.stderr, re.M)
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="other", prompt=PROMPT, max_tokens=2)


def test_completion_usage_arithmetic(server, tokenizer):
    out = server.client().completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=9, temperature=0)
    choice = out.choices[0]
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == MODEL_ID
    assert choice.finish_reason == "length" and choice.text
    assert out.usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])
    assert out.usage.completion_tokens == 9
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_uses_the_models_chat_template(server, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    out = server.client().chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=7, temperature=0
    )
    choice = out.choices[0]
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert out.usage.prompt_tokens == len(expected)
    assert out.usage.completion_tokens == 7 and out.usage.total_tokens == len(expected) + 7
    # the same prompt ids as a completion: the same reply
    same = server.client().completions.create(model=MODEL_ID, prompt=expected, max_tokens=7, temperature=0)
    assert same.choices[0].text == choice.message.content


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_stream_equals_non_stream(server, chat):
    client = server.client()
    args = dict(model=MODEL_ID, max_tokens=20, temperature=0)
    if chat:
        args["messages"] = [{"role": "user", "content": "Tell me about for statements."}]
        whole = client.chat.completions.create(**args).choices[0].message.content
        chunks = list(
            client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
        texts = [c.choices[0].delta.content or "" for c in chunks[:-1]]
    else:
        args["prompt"] = PROMPT
        whole = client.completions.create(**args).choices[0].text
        chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        texts = [c.choices[0].text for c in chunks[:-1]]
    assert "".join(texts) == whole and len(texts) > 5
    assert len({c.id for c in chunks}) == 1
    finishes = [c.choices[0].finish_reason for c in chunks[:-1]]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-2].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 20


def test_raw_stream_format(server):
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    assert all(part.startswith("data: ") for part in raw.split("\n\n") if part)
    assert '"usage"' not in raw  # only with stream_options.include_usage


def test_n_choices_and_seeds(server):
    client = server.client()
    args = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=12, temperature=1.0, n=3, seed=11)
    out = client.completions.create(**args)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 36
    assert len({c.text for c in out.choices}) == 3  # each choice draws with its own generator
    again = client.completions.create(**args)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded: repeatable
    streamed = list(client.completions.create(**args, stream=True))
    for i, choice in enumerate(out.choices):
        mine = [c.choices[0] for c in streamed if c.choices[0].index == i]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine].count("length") == 1 and mine[-1].finish_reason == "length"


def test_prompt_as_strings_and_token_ids(server, tokenizer):
    client = server.client()
    ids = tokenizer(PROMPT)["input_ids"]
    one = (
        client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    )
    other = (
        client.completions.create(model=MODEL_ID, prompt="A list", max_tokens=6, temperature=0)
        .choices[0]
        .text
    )
    by_ids = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == one
    both = client.completions.create(
        model=MODEL_ID, prompt=[PROMPT, "A list"], max_tokens=6, temperature=0, n=2
    )
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [one, one, other, other]
    lists = client.completions.create(model=MODEL_ID, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text for c in lists.choices] == [one, one]
    assert lists.usage.prompt_tokens == 2 * len(ids)


def test_stop_strings_end_the_text_before_them(server):
    client = server.client()
    args = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=30, temperature=0)
    whole = client.completions.create(**args).choices[0].text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    assert len(stop) == 3
    cut = whole[: whole.index(stop)]
    out = client.completions.create(**args, stop=[stop, "never appears here"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 30
    streamed = list(client.completions.create(**args, stop=stop, stream=True))
    pieces = [c.choices[0].text for c in streamed]
    assert "".join(pieces) == cut and streamed[-1].choices[0].finish_reason == "stop"
    # text that may begin the stop string is held back, never sent and taken back
    sent = ""
    for piece in pieces:
        sent += piece
        assert stop not in sent and cut.startswith(sent)


def test_logprobs(server):
    client = server.client()
    messages = [{"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 8
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the most likely token
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
    assert b"".join(bytes(e.bytes) for e in content).decode() == out.choices[0].message.content
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=messages,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    streamed = [
        e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    done = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=5, temperature=0.7, seed=1, logprobs=2
    )
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    # OpenAI's legacy field holds the chosen token too ("up to logprobs+1 elements"), also at logprobs 0
    assert all(tok in top for tok, top in zip(lp.tokens, lp.top_logprobs, strict=True))
    forced = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=0, logit_bias={"1000": 100}
    ).choices[0]
    assert all(
        len(top) == 1 and tok in top
        for tok, top in zip(forced.logprobs.tokens, forced.logprobs.top_logprobs, strict=True)
    )
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_penalties_bias_and_extras(server, tokenizer):
    client = server.client()
    base = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=10, temperature=0)
    plain = client.completions.create(**base, logprobs=0).choices[0].logprobs.tokens
    first = tokenizer.convert_tokens_to_ids(
        tokenizer.convert_ids_to_tokens(tokenizer(plain[0])["input_ids"][0])
    )
    banned = (
        client.completions.create(**base, logprobs=0, logit_bias={str(first): -100})
        .choices[0]
        .logprobs.tokens
    )
    assert banned[0] != plain[0]
    forced = (
        client.completions.create(**base, logit_bias={"1000": 100}, logprobs=0).choices[0].logprobs.tokens
    )
    assert set(forced) == {tokenizer.decode([1000])}
    assert client.completions.create(**base, frequency_penalty=2.0).choices[0].text != ""
    assert (
        client.completions.create(**base, presence_penalty=1.5, extra_body={"repetition_penalty": 1.3})
        .choices[0]
        .text
    )
    sampled = client.completions.create(
        **{**base, "temperature": 1.0}, top_p=0.9, seed=3, extra_body={"top_k": 5, "min_p": 0.05}
    )
    assert sampled.usage.completion_tokens == 10
    # ignore_eos and min_tokens: EOS (which never wins here) would be allowed only after min_tokens
    extra = client.completions.create(**base, extra_body={"min_tokens": 10, "ignore_eos": True})
    assert extra.usage.completion_tokens == 10


# --- errors ------------------------------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "hello"}]
REFUSED = {*unsupported.REFUSED, "best_of"}
ERRORS = [
    (CHAT, b"{not json", 400, None),
    (CHAT, b"[1, 2]", 400, None),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hello"}, 400, "messages"),
    (CHAT, {"messages": [123]}, 400, "messages[0]"),
    (CHAT, {"messages": [{}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": 123, "content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 123}]}, 400, "messages[0].content"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content[0]",
    ),
    (CHAT, {"messages": HELLO, "max_tokens": "ten"}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "max_tokens": -1}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (CHAT, {"messages": HELLO, "max_tokens": True}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "temperature": -0.5}, 400, "temperature"),
    (CHAT, {"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": HELLO, "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": HELLO, "top_k": -2}, 400, "top_k"),
    (CHAT, {"messages": HELLO, "n": 0}, 400, "n"),
    (CHAT, {"messages": HELLO, "n": 9}, 400, "n"),
    (CHAT, {"messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CHAT, {"messages": HELLO, "logprobs": "yes"}, 400, "logprobs"),
    (CHAT, {"messages": HELLO, "stop": 123}, 400, "stop"),
    (CHAT, {"messages": HELLO, "stop": [""]}, 400, "stop"),
    (CHAT, {"messages": HELLO, "presence_penalty": 3}, 400, "presence_penalty"),
    (CHAT, {"messages": HELLO, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    (CHAT, {"messages": HELLO, "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    (CHAT, {"messages": HELLO, "logit_bias": {"5": 200}}, 400, "logit_bias"),
    (CHAT, {"messages": HELLO, "seed": 2**70}, 400, "seed"),
    (CHAT, {"messages": HELLO, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (CHAT, {"messages": HELLO, "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens"),
    (
        CHAT,
        {"messages": HELLO, "stream": True, "stream_options": {"include_usage": 1}},
        400,
        "stream_options.include_usage",
    ),
    (CHAT, {"messages": HELLO, "chat_template": "{{ messages }}"}, 400, "chat_template"),
    (CHAT, {"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    (CHAT, {"messages": HELLO, "response_format": {"type": "json_object"}}, 400, "response_format"),
    (CHAT, {"messages": HELLO, "model": "gpt-4"}, 404, "model"),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 1100}]}, 400, "messages"),
    (CHAT, {"messages": HELLO, "max_tokens": CONTEXT}, 400, "messages"),
    (CHAT, {"messages": HELLO, "max_tokens": CONTEXT, "stream": True}, 400, "messages"),
    (COMPLETIONS, {}, 400, "prompt"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [-1]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [50304]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [[1], "a"]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "echo": True}, 400, "echo"),
    (COMPLETIONS, {"prompt": "x", "response_format": {"type": "json_object"}}, 400, "response_format"),
    (COMPLETIONS, {"prompt": "x", "response_format": "text"}, 400, "response_format"),
    (COMPLETIONS, {"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    (COMPLETIONS, {"prompt": "x", "best_of": 2}, 400, "best_of"),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": "1"}, 400, "stop_token_ids"),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [50304]}, 400, "stop_token_ids"),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [True]}, 400, "stop_token_ids"),
    (COMPLETIONS, {"prompt": "x", "include_stop_str_in_output": True}, 400, "include_stop_str_in_output"),
    (COMPLETIONS, {"prompt": "x", "guided_json": {"type": "object"}}, 400, "guided_json"),
    (COMPLETIONS, {"prompt": "x", "use_beam_search": True}, 400, "use_beam_search"),
    (CHAT, {"messages": HELLO, "echo": True}, 400, "echo"),
    (CHAT, {"messages": HELLO, "suffix": "x"}, 400, "suffix"),
    (CHAT, {"messages": HELLO, "best_of": 2}, 400, "best_of"),
    (CHAT, {"messages": HELLO, "function_call": "auto"}, 400, "function_call"),
    (CHAT, {"messages": HELLO, "skip_special_tokens": False}, 400, "skip_special_tokens"),
    (CHAT, {"messages": HELLO, "add_generation_prompt": False}, 400, "add_generation_prompt"),
    (CHAT, {"messages": HELLO, "continue_final_message": True}, 400, "continue_final_message"),
    (
        CHAT,
        {"messages": HELLO, "chat_template_kwargs": {"enable_thinking": True}},
        400,
        "chat_template_kwargs",
    ),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "messages[0].content[0]"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": CONTEXT, "stream": True}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "x", "model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize(
    "path, body, status, param", ERRORS, ids=[f"{i}-{e[3]}" for i, e in enumerate(ERRORS)]
)
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert (
        set(error) == {"message", "type", "param", "code"}
        and error["message"]
        and "Traceback" not in response.text
    )
    assert error["param"] == param
    if isinstance(body, dict) and (body.get("max_tokens") == CONTEXT or "word " in json.dumps(body)):
        assert error["code"] == "context_length_exceeded" and "maximum context length" in error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"
    if param in REFUSED or param == "response_format" and status == 400 and "type" in json.dumps(body):
        assert error["code"] == "unsupported_parameter" and f"'{param}'" in error["message"]


def test_refused_fields_at_values_that_ask_for_nothing_are_accepted(server):
    """The fields refused above, sent at their defaults (as some clients send every field), are served."""
    for path, body in (
        (
            CHAT,
            {"messages": HELLO, "echo": False, "tool_choice": "none", "tools": [], "function_call": "none"},
        ),
        (CHAT, {"messages": HELLO, "skip_special_tokens": True, "add_generation_prompt": True, "best_of": 1}),
        (CHAT, {"messages": HELLO, "response_format": {"type": "text"}, "continue_final_message": False}),
        (COMPLETIONS, {"prompt": "x", "echo": False, "suffix": None, "best_of": 2, "n": 2}),
        (COMPLETIONS, {"prompt": "x", "include_stop_str_in_output": False, "stop_token_ids": []}),
    ):
        response = httpx.post(server.url + path, json={**body, "max_tokens": 2})
        assert response.status_code == 200, (body, response.text)


def test_stop_token_ids_end_a_choice_with_the_tokens_text(server, tokenizer):
    """vLLM's stop_token_ids: the choice ends at the token (finish_reason "stop", its text kept, as vLLM
    keeps a stop token that is not special), also with ignore_eos; min_tokens holds it back."""
    client = server.client()
    base = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=6, temperature=0, logit_bias={"1000": 100})
    out = client.completions.create(**base, extra_body={"stop_token_ids": [1000], "ignore_eos": True})
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and out.usage.completion_tokens == 1
    assert choice.text == tokenizer.decode([1000])
    held = client.completions.create(**base, extra_body={"stop_token_ids": [1000], "min_tokens": 3})
    assert held.usage.completion_tokens == 4 and held.choices[0].finish_reason == "stop"
    assert held.choices[0].text.endswith(tokenizer.decode([1000]))
    assert client.completions.create(**base).usage.completion_tokens == 6  # without: to max_tokens


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_not_sent_as_json_is_415(server, content_type):
    """As vLLM: only 'application/json' (a browser's form or text/plain post, which needs no CORS
    preflight, is refused before anything runs)."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
    response = httpx.post(server.url + COMPLETIONS, content=body, headers=headers)
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert "application/json" in error["message"] and set(error) == {"message", "type", "param", "code"}
    with_charset = {"Content-Type": "application/json; charset=utf-8"}
    assert httpx.post(server.url + COMPLETIONS, content=body, headers=with_charset).status_code == 200


def test_sampling_settings_that_overflow_are_a_400(server):
    """A repetition penalty that float32 holds as 0 turns the scores of the prompt's tokens to inf, and
    the probabilities to NaN: the request gets a 400 naming the settings, not a 500."""
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 1.0, "seed": 1, "repetition_penalty": 1e-300}
    response = httpx.post(server.url + COMPLETIONS, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "repetition_penalty" in error["message"]
    assert httpx.post(server.url + COMPLETIONS, json={**body, "repetition_penalty": 1.1}).status_code == 200


def test_unknown_routes_and_the_server_still_works(server):
    for method, path, status in [("GET", "/v1/nothing", 404), ("GET", CHAT, 405)]:
        response = httpx.request(method, server.url + path)
        assert response.status_code == status and set(response.json()["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }
    out = server.client().completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2)
    assert out.usage.completion_tokens == 2


# --- batch invariance through the API --------------------------------------------------------------------------


def logprob_record(choice) -> list:
    lp = choice.logprobs
    return [lp.tokens, lp.token_logprobs, lp.top_logprobs]


def test_logprobs_bitwise_batch_invariance_bs1_vs_bsN(server):
    """One request alone, then the same among 7 concurrent others of different lengths, arriving before
    and after it: identical tokens and logprobs, greedy and seeded."""
    client = server.client()
    target = [
        dict(model=MODEL_ID, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=5),
        dict(model=MODEL_ID, prompt="A seeded draw", max_tokens=24, temperature=0.9, seed=5, logprobs=5),
    ]
    alone = [logprob_record(client.completions.create(**t).choices[0]) for t in target]
    prompts = [
        "Short",
        "A much longer prompt " * 12,
        "Another one of middle length here",
        "x " * 40,
        "y",
        "Lists and tuples",
        "z " * 70,
    ]

    def other(i: int) -> None:
        stream = client.completions.create(
            model=MODEL_ID, prompt=prompts[i], max_tokens=60 + 20 * i, temperature=i % 2, seed=i, stream=True
        )
        for n, _ in enumerate(stream):
            if n == 0:
                started.release()

    for t, expected in zip(target, alone, strict=True):
        started = threading.Semaphore(0)
        with ThreadPoolExecutor(8) as pool:
            others = [pool.submit(other, i) for i in range(4)]
            for _ in range(4):  # these are decoding when the target arrives
                assert started.acquire(timeout=60)
            mine = pool.submit(lambda t=t: client.completions.create(**t).choices[0])
            others += [pool.submit(other, i) for i in range(4, 7)]  # these arrive while it runs
            peak = max(server.load()["rows_running"] for _ in range(20))
            assert logprob_record(mine.result()) == expected
            for future in others:
                future.result()
        assert peak > 1  # it did run in a batch


# --- API key, chat without a template, queue, disconnects ------------------------------------------------------


def test_api_key(small):
    assert httpx.get(small.url + "/health").status_code == 200  # open
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.get(small.url + "/v1/models", headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "invalid_api_key"
    response = httpx.post(small.url + COMPLETIONS, json={"prompt": "x"})
    assert response.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        small.client(api_key="wrong").models.list()
    client = small.client(api_key=KEY)
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3


def test_chat_without_a_chat_template_is_400(small):
    response = httpx.post(
        small.url + CHAT, json={"messages": HELLO}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "chat_template_missing" and "chat template" in error["message"]


def test_chat_template_option_serves_a_model_without_one(tmp_path, tokenizer):
    from stablelm.cli.templates import CHATML

    folder = save_checkpoint(tmp_path / "no-template", chat_template=False)
    running = Server(folder, "--max-batch", "1", "--chat-template", "chatml")
    try:
        reply = running.client().chat.completions.create(
            model=MODEL_ID, messages=HELLO, max_tokens=3, temperature=0
        )
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
        rendered = tokenizer.apply_chat_template(
            HELLO, chat_template=CHATML, add_generation_prompt=True, tokenize=False
        )
        assert rendered.startswith("<|im_start|>user\n")
        assert reply.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    finally:
        assert running.stop() == 0, running.stderr


@pytest.mark.parametrize("value", ["nosuch", "empty"])
def test_a_bad_chat_template_option_is_a_usage_error(tmp_path, checkpoint, value):
    if value == "empty":
        (tmp_path / "empty.jinja").write_text("  \n")
        value = str(tmp_path / "empty.jinja")
    result = subprocess.run(
        [sys.executable, "-c", LAUNCHER, "serve", "--port", "0", "-m", str(checkpoint), "--chat-template", value],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "stablelm: error: --chat-template" in result.stderr and "Traceback" not in result.stderr


def long_stream(url: str, **extra):
    body = {"prompt": PROMPT, "max_tokens": CONTEXT - 10, "stream": True, "ignore_eos": True, **extra}
    return httpx.stream(
        "POST", url + COMPLETIONS, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )


def wait_for(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_disconnect_mid_stream_frees_the_row(small):
    auth = {"Authorization": f"Bearer {KEY}"}
    before = small.load(**auth)
    with long_stream(small.url) as response:
        events = sse_events(response)
        for _ in range(3):
            assert next(events)["choices"][0]["finish_reason"] is None
        assert small.load(**auth)["rows_running"] == 1 and small.load(**auth)["kv_cache_bytes"] > 0
    # the client hung up: the row is freed at the next step, the request never finishes
    wait_for(lambda: small.load(**auth)["rows_running"] == 0, "the row was not freed")
    after = small.load(**auth)
    assert after["cancelled"] == before["cancelled"] + 1 and after["finished"] == before["finished"]
    assert after["kv_cache_bytes"] == 0
    start = time.monotonic()
    out = small.client(api_key=KEY).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=5)
    assert out.usage.completion_tokens == 5 and time.monotonic() - start < 10


def test_queue_full_is_429(small):
    auth = {"Authorization": f"Bearer {KEY}"}
    with long_stream(small.url) as running:  # takes the one row
        first = sse_events(running)
        next(first)
        with long_stream(small.url):  # takes the one place in the queue

            def queued() -> bool:
                return small.load(**auth)["waiting"] == 1

            wait_for(queued, "the second request did not queue")
            response = httpx.post(small.url + COMPLETIONS, json={"prompt": "x"}, headers=auth)
            assert response.status_code == 429 and response.headers["retry-after"] == "1"
            error = response.json()["error"]
            assert error["code"] == "queue_full" and set(error) == {"message", "type", "param", "code"}
            with pytest.raises(openai.RateLimitError):
                small.client(api_key=KEY).completions.create(model=MODEL_ID, prompt="x", max_tokens=1)
    wait_for(
        lambda: small.load(**auth)["rows_running"] == 0 and small.load(**auth)["waiting"] == 0, "not freed"
    )


def test_a_client_timing_out_cancels_its_non_streamed_request(small):
    auth = {"Authorization": f"Bearer {KEY}"}
    before = small.load(**auth)
    client = small.client(api_key=KEY).with_options(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        client.completions.create(
            model=MODEL_ID, prompt=PROMPT, max_tokens=CONTEXT - 10, extra_body={"ignore_eos": True}
        )
    wait_for(lambda: small.load(**auth)["rows_running"] == 0, "the row was not freed")
    after = small.load(**auth)
    assert after["cancelled"] == before["cancelled"] + 1 and after["finished"] == before["finished"]


# --- in this process: loading, and a failing step ---------------------------------------------------------------


def test_health_is_503_while_loading_and_a_failed_step_is_a_500(checkpoint, tokenizer, monkeypatch):
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from stablelm.serve.app import create_app
    from stablelm.serve.engine import Engine

    gate = threading.Event()
    model = stablelm.StableLmForCausalLM.from_pretrained(checkpoint).eval()

    def load():
        assert gate.wait(30)
        return SimpleNamespace(model=model, tokenizer=tokenizer)

    engine = Engine(load, max_batch=2, max_queue=2)
    engine.start()
    body = {"prompt": PROMPT, "max_tokens": 4}
    with TestClient(create_app(engine, model_id=MODEL_ID)) as client:
        for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", COMPLETIONS)):
            response = client.request(method, path, json=body if method == "POST" else None)
            assert response.status_code == 503 and response.json()["error"]["code"] == "model_loading", path
        gate.set()
        wait_for(lambda: client.get("/health").status_code == 200, "never ready")
        assert client.post(COMPLETIONS, json=body).json()["usage"]["completion_tokens"] == 4

        def boom(*args):
            raise RuntimeError("boom")

        monkeypatch.setattr(engine.forward, "decode", boom)
        response = client.post(COMPLETIONS, json=body)
        assert response.status_code == 500
        assert (
            response.json()["error"]["type"] == "server_error"
            and "boom" in response.json()["error"]["message"]
        )
        with client.stream("POST", COMPLETIONS, json={**body, "stream": True}) as streamed:
            events = list(sse_events(streamed))
        assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"
        monkeypatch.undo()
        assert client.post(COMPLETIONS, json=body).json()["usage"]["completion_tokens"] == 4  # still serving
    engine.stop()
    engine.join(10)
    assert engine.state == "stopped"


def test_a_rows_unusable_scores_fail_its_request_alone(checkpoint, tokenizer, monkeypatch):
    """A row whose scores turn NaN in a decoding step it shares with another request's row (its own
    settings' doing) fails its request with a 400; the other request, in the same steps, runs to its end."""
    from types import SimpleNamespace

    from stablelm.serve import engine as engine_module
    from stablelm.serve.engine import Engine, Failure, Job
    from stablelm.serve.sampling import SamplingOptions

    model = stablelm.StableLmForCausalLM.from_pretrained(checkpoint).eval()
    real = engine_module.process_scores

    def faulty(options, scores, *, generated, **kw):  # the marked request's scores: NaN from its 2nd token
        scores = real(options, scores, generated=generated, **kw)
        return scores * float("nan") if options.seed == 666 and generated else scores

    monkeypatch.setattr(engine_module, "process_scores", faulty)
    engine = Engine(lambda: SimpleNamespace(model=model, tokenizer=tokenizer), max_batch=4, max_queue=4)
    engine.start()
    wait_for(lambda: engine.state == "ready", "never ready")
    got: dict[str, list] = {"good": [], "bad": []}
    done = {name: threading.Event() for name in got}

    def sink(name):
        def put(event):
            got[name].append(event)
            if isinstance(event, Failure) or event.finish_reason:
                done[name].set()

        return put

    prompt = tokenizer(PROMPT)["input_ids"]
    good = SamplingOptions(max_tokens=12, temperature=0.0, ignore_eos=True)
    bad = SamplingOptions(max_tokens=12, temperature=1.0, seed=666)
    engine.submit(
        [Job(prompt, 1, good, frozenset(), sink("good")), Job(prompt, 1, bad, frozenset(), sink("bad"))]
    )
    assert done["good"].wait(60) and done["bad"].wait(60)
    engine.stop()
    engine.join(10)
    failure = got["bad"][-1]
    assert isinstance(failure, Failure) and failure.status == 400 and "sampling settings" in failure.message
    assert len(got["bad"]) == 2  # its first token (from the prompt's step), then the failure
    assert not any(isinstance(e, Failure) for e in got["good"])
    assert sum(len(e.tokens) for e in got["good"]) == 12 and got["good"][-1].finish_reason == "length"
    assert engine.counters["failed"] == 1


def test_streams_never_send_part_of_a_character(checkpoint, tokenizer):
    """Tokens that each hold part of a character's bytes (byte-level BPE): the stream waits for the whole
    character, and its pieces join to the text sent unstreamed."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from stablelm.serve.app import create_app
    from stablelm.serve.engine import Engine

    text = "Ünïcode 😀 and 漢字 too"
    script = tokenizer(text)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([t]) for t in script)  # some tokens are partial characters
    model = stablelm.StableLmForCausalLM.from_pretrained(checkpoint).eval()
    engine = Engine(lambda: SimpleNamespace(model=model, tokenizer=tokenizer), max_batch=1, max_queue=1)
    engine.start()
    wait_for(lambda: engine.state == "ready", "never ready")
    vocab = model.lm_head.weight.shape[0]

    def scripted(rows: int):  # one-hot logits: the next token of the script, by how far the row is
        logits = torch.full((rows, vocab), -10.0)
        logits[:, script[len(scripted.made) % len(script)]] = 10.0
        scripted.made.append(1)
        return logits

    scripted.made = []
    engine.forward.logits = lambda hidden: scripted(hidden.shape[0])
    engine.forward.decode = lambda caches, tokens: scripted(len(caches))
    body = {"prompt": PROMPT, "max_tokens": len(script), "temperature": 0}
    with TestClient(create_app(engine, model_id=MODEL_ID)) as client:
        whole = client.post(COMPLETIONS, json=body).json()["choices"][0]["text"]
        scripted.made.clear()
        with client.stream("POST", COMPLETIONS, json={**body, "stream": True}) as response:
            pieces = [e["choices"][0]["text"] for e in sse_events(response) if e != "[DONE]"]
    engine.stop()
    engine.join(10)
    assert whole == text
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)


# --- shutdown -----------------------------------------------------------------------------------------------------


def test_sigterm_aborts_requests_in_flight_and_exits_0(checkpoint):
    running = Server(checkpoint, "--max-batch", "2")
    body = {
        "model": MODEL_ID,
        "prompt": PROMPT,
        "max_tokens": CONTEXT - 10,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", running.url + COMPLETIONS, json=body, timeout=60) as response:
        events = sse_events(response)
        next(events)
        os.kill(running.process.pid, signal.SIGTERM)
        rest = list(events)
    assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "abort"
    assert running.process.wait(30) == 0, running.stderr
    assert "shutting down" in running.stderr and "stopped" in running.stderr
    assert "Traceback" not in running.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(running.url + "/health")


# --- the documentation's examples --------------------------------------------------------------------------


def doc_examples(kind: str) -> list[tuple[str, str]]:
    """(language, code) of docs/server.md's blocks marked `<!-- test: kind -->`."""
    text = (Path(__file__).parent.parent / "docs" / "server.md").read_text()
    return re.findall(rf"<!-- test: {kind} -->\n```(\w+)\n(.*?)```", text, re.S)


def run_example(language: str, code: str, url: str) -> str:
    code = code.replace("http://127.0.0.1:8000", url)
    command = ["bash", "-c", code] if language == "sh" else [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Traceback" not in result.stderr, (code, result.stdout, result.stderr)
    return result.stdout


def test_the_docs_examples_work_as_written():
    demo, chat = doc_examples("demo"), doc_examples("chat")
    assert len(demo) == 3 and len(chat) == 2
    running = Server(None)  # the demo model, as the examples say
    try:
        for language, code in demo:
            out = run_example(language, code, running.url)
            assert out.strip()
            if '"stream": true' in code:
                assert out.rstrip().endswith("data: [DONE]")
            elif language == "sh":
                assert json.loads(out)["choices"][0]["finish_reason"] == "length"
        for language, code in chat:  # the demo model has a chat template
            out = run_example(language, code, running.url)
            if language == "sh":
                assert json.loads(out)["choices"][0]["message"]["role"] == "assistant"
            else:
                assert re.search(r"\n\d+ tokens$", out.rstrip()), out
    finally:
        assert running.stop() == 0


# --- load ------------------------------------------------------------------------------------------------------------


def rss(pid: int) -> int:
    """A process's resident memory in bytes (Linux)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_load_200_requests_16_clients_a_quarter_disconnecting(checkpoint):
    import random

    running = Server(checkpoint, "--max-batch", "8", "--max-queue", "64")
    try:
        client = running.client()
        prompts = [f"Request number {i} asks about " + "lists " * (i % 9) for i in range(20)]
        expected = {
            p: client.completions.create(model=MODEL_ID, prompt=p, max_tokens=24, temperature=0)
            .choices[0]
            .text
            for p in prompts
        }
        idle = rss(running.process.pid)
        rng = random.Random(0)
        plan = [(prompts[i % 20], rng.random() < 0.25, rng.randint(1, 20)) for i in range(200)]

        def one(item) -> str:
            prompt, drop, after = item
            body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True}
            text = ""
            with httpx.stream("POST", running.url + COMPLETIONS, json=body, timeout=120) as response:
                assert response.status_code == 200
                for n, event in enumerate(sse_events(response)):
                    if drop and n >= after:
                        return "dropped"
                    if event != "[DONE]":
                        text += event["choices"][0]["text"]
            assert text == expected[prompt]
            return "done"

        start = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(one, plan))
        assert time.monotonic() - start < 300
        assert outcomes.count("done") >= 200 - sum(drop for _, drop, _ in plan)
        wait_for(
            lambda: running.load()["rows_running"] == 0 and running.load()["waiting"] == 0, "rows stay busy"
        )
        assert running.load()["kv_cache_bytes"] == 0  # every row's cache is gone
        time.sleep(0.5)
        assert rss(running.process.pid) < idle + 64 * 2**20, (idle, rss(running.process.pid))
    finally:
        status = running.stop()
    assert status == 0
    assert "Traceback" not in running.stderr and "error" not in running.stderr.lower(), running.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages and /proc/PID/maps are Linux's")
def test_the_server_loads_its_weights_into_huge_pages_unless_told_not_to(server, checkpoint, monkeypatch):
    """A server loads once and runs for long: its weights are copied out of the checkpoint's memory map
    into huge pages where Linux offers them (the file then no longer mapped); STABLELM_HUGE_PAGES=0 keeps
    the file's mapping."""
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    offered = setting.is_file() and re.search(r"\[(always|madvise)\]", setting.read_text()) is not None
    maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert ("model.safetensors" in maps) is not offered, maps
    monkeypatch.setenv("STABLELM_HUGE_PAGES", "0")
    plain = Server(checkpoint)
    try:
        assert "model.safetensors" in Path(f"/proc/{plain.process.pid}/maps").read_text()
    finally:
        assert plain.stop() == 0, plain.stderr
