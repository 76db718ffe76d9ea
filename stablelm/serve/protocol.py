"""OpenAI's request bodies (completions and chat) checked field by field into a `Parsed` request. The
readers of single fields are in `fields`, the pieces of response bodies in `responses`.

Every problem with a request is an `ApiError` with OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}` and the HTTP status carrying the number: 400 for a
body that is not JSON, a field of the wrong type or out of range, an empty or malformed conversation, a
prompt that does not fit the context; 404 for an unknown model. Messages name the field and what to send
instead. Fields this server does not implement (tools, JSON output, echo, suffix: `unsupported`) are refused by name
rather than silently ignored; unknown fields are ignored, as OpenAI's clients send extras.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .fields import (
    ApiError,
    bad,
    kind_of,
    read_bool,
    read_int,
    read_number,
    read_string,
    show,
)
from .sampling import SamplingOptions
from .unsupported import refuse_unsupported

MAX_LOGPROBS = 20  # top_logprobs / logprobs at most (OpenAI: 20 for chat; vLLM's default max)
MAX_STOPS = 16  # stop strings per request (OpenAI allows 4; vLLM, llama.cpp any number)
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
INT64 = (-(2**63), 2**63 - 1)
CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclass
class ServerInfo:
    """What validation needs to know about the model being served."""

    model_id: str
    tokenizer: Any
    context: int  # positions: the prompt and the new tokens together
    vocab_size: int  # ids the model takes
    max_batch: int
    eos_ids: frozenset[int] = frozenset()
    defaults: dict[str, float] = field(default_factory=dict)  # sampling defaults of generation_config.json
    chat_stop_ids: frozenset[int] = frozenset()  # end-of-turn tokens of the chat template
    chat_variables: dict[str, str] = field(default_factory=dict)  # more variables for the chat template


@dataclass
class Parsed:
    """A checked request: the prompts' token ids and how to continue each."""

    kind: str  # "chat" or "completion"
    prompts: list[list[int]]
    n: int
    options: SamplingOptions
    stop_ids: frozenset[int]
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: "")
    created: int = field(default_factory=lambda: int(time.time()))


# --- the fields both endpoints share ---------------------------------------------------------------------


def check_model(body: dict, info: ServerInfo) -> None:
    model = read_string(body, "model")
    if model is not None and model != info.model_id:
        raise ApiError(
            404,
            f"The model `{model}` does not exist: this server serves `{info.model_id}` (see GET /v1/models).",
            param="model",
            code="model_not_found",
        )


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad(f"'stop' must be a string or an array of strings, got {kind_of(value)}.", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"'stop' may hold at most {MAX_STOPS} strings, got {len(stops)}.", "stop")
    if any(not s for s in stops):
        raise bad("'stop' strings must not be empty.", "stop")
    return tuple(dict.fromkeys(stops))


def _logit_bias(body: dict, info: ServerInfo) -> tuple[tuple[int, float], ...]:
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad(
            f"'logit_bias' must be an object mapping token ids to biases, got {kind_of(value)}.", "logit_bias"
        )
    if len(value) > MAX_LOGIT_BIAS:
        raise bad(f"'logit_bias' may hold at most {MAX_LOGIT_BIAS} tokens, got {len(value)}.", "logit_bias")
    biases = []
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise bad(f"'logit_bias' keys must be token ids, got {show(key)}.", "logit_bias") from None
        if not 0 <= token < info.vocab_size:
            raise bad(
                f"'logit_bias' names token id {token}, outside the vocabulary (0 to {info.vocab_size - 1}).",
                "logit_bias",
            )
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise bad(
                f"'logit_bias' values must be numbers in [-100, 100], got {show(bias)} for token {token}.",
                "logit_bias",
            )
        biases.append((token, float(bias)))
    return tuple(sorted(dict(biases).items()))


def _stop_token_ids(body: dict, info: ServerInfo) -> frozenset[int]:
    """vLLM's `stop_token_ids`: more tokens that end a choice (even with ignore_eos)."""
    value = body.get("stop_token_ids")
    if value is None:
        return frozenset()
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise bad(f"'stop_token_ids' must be an array of token ids, got {show(value)}.", "stop_token_ids")
    if len(value) > MAX_LOGIT_BIAS:
        raise bad(
            f"'stop_token_ids' may hold at most {MAX_LOGIT_BIAS} ids, got {len(value)}.", "stop_token_ids"
        )
    outside = [v for v in value if not 0 <= v < info.vocab_size]
    if outside:
        raise bad(
            f"'stop_token_ids' names token id {outside[0]}, outside the vocabulary (0 to {info.vocab_size - 1}).",
            "stop_token_ids",
        )
    return frozenset(value)


def _stream(body: dict) -> tuple[bool, bool]:
    stream = read_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise bad(f"'stream_options' must be an object, got {kind_of(options)}.", "stream_options")
    if not stream:
        raise bad("'stream_options' can only be given with \"stream\": true.", "stream_options")
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise bad(
            f"'stream_options.include_usage' must be true or false, got {kind_of(include)}.",
            "stream_options.include_usage",
        )
    return stream, bool(include)


def _options(body: dict, info: ServerInfo, *, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
    """The sampling fields both endpoints share (max_tokens and logprobs read by the caller)."""
    read_string(body, "user")
    default = info.defaults
    top_k = read_int(body, "top_k", default.get("top_k", 0), low=-1)
    return dict(
        temperature=read_number(body, "temperature", default.get("temperature", 1.0), low=0.0),
        top_p=read_number(body, "top_p", default.get("top_p", 1.0), low=0.0, high=1.0, open_low=True),
        top_k=max(top_k, 0),
        min_p=read_number(body, "min_p", default.get("min_p", 0.0), low=0.0, high=1.0),
        seed=read_int(body, "seed", None, low=INT64[0], high=INT64[1]),
        presence_penalty=read_number(body, "presence_penalty", 0.0, low=-2.0, high=2.0),
        frequency_penalty=read_number(body, "frequency_penalty", 0.0, low=-2.0, high=2.0),
        repetition_penalty=read_number(
            body, "repetition_penalty", default.get("repetition_penalty", 1.0), low=0.0, open_low=True
        ),
        logit_bias=_logit_bias(body, info),
        min_tokens=read_int(body, "min_tokens", 0, low=0),
        ignore_eos=read_bool(body, "ignore_eos", False),
        stop=_stop(body),
        stop_token_ids=_stop_token_ids(body, info),
        logprobs=logprobs,
        max_tokens=max_tokens,
    )


def _fit(prompts: list[list[int]], requested: int | None, info: ServerInfo, what: str, param: str) -> int:
    """max_tokens for these prompts: as asked (checked against the context), or the room the longest
    leaves. Raises the 400 of vLLM's wording when a prompt does not fit."""
    longest = max(len(p) for p in prompts)
    if requested is None:
        if longest >= info.context:
            raise bad(
                f"This model's maximum context length is {info.context} tokens. However, you requested "
                f"{longest} tokens in the {what}, Please reduce the length of the {what}.",
                param,
                "context_length_exceeded",
            )
        return info.context - longest
    if longest + requested > info.context:
        raise bad(
            f"This model's maximum context length is {info.context} tokens. However, you requested "
            f"{longest + requested} tokens ({longest} in the {what}, {requested} in the completion). Please "
            f"reduce the length of the {what} or completion.",
            param,
            "context_length_exceeded",
        )
    return requested


def _n(body: dict, info: ServerInfo) -> int:
    return read_int(body, "n", 1, low=1, high=info.max_batch)


def _finish_options(parsed: dict[str, Any], max_tokens: int) -> SamplingOptions:
    parsed["max_tokens"] = max_tokens
    if parsed["min_tokens"] > max_tokens:
        raise bad(
            f"'min_tokens' ({parsed['min_tokens']}) must not be more than max_tokens ({max_tokens}).",
            "min_tokens",
        )
    return SamplingOptions(**parsed)


# --- completions -------------------------------------------------------------------------------------------


def parse_completion(body: dict, info: ServerInfo, *, max_prompts: int) -> Parsed:
    """A /v1/completions body: prompt as a string, strings, token ids or lists of token ids."""
    check_model(body, info)
    n = _n(body, info)
    refuse_unsupported(body, "completion", n=n)
    prompts = _prompts(body.get("prompt"), info)
    if len(prompts) > max_prompts:
        raise bad(f"'prompt' may hold at most {max_prompts} prompts here, got {len(prompts)}.", "prompt")
    max_tokens = read_int(body, "max_tokens", 16, low=1)
    logprobs = read_int(body, "logprobs", None, low=0, high=MAX_LOGPROBS)
    options = _options(body, info, max_tokens=None, logprobs=logprobs)
    stream, include_usage = _stream(body)
    fitted = _fit(prompts, max_tokens, info, "messages", "prompt")  # vLLM says "messages" for both
    return Parsed(
        "completion",
        prompts,
        n,
        _finish_options(options, fitted),
        info.eos_ids,
        stream,
        include_usage,
        id=f"cmpl-{uuid.uuid4().hex}",
    )


def _prompts(value: Any, info: ServerInfo) -> list[list[int]]:
    if value is None:
        raise bad("'prompt' is required: a string, an array of strings, or token ids.", "prompt")
    if isinstance(value, str):
        items: list[Any] = [value]
    elif (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        items = [value]
    elif (
        isinstance(value, list)
        and value
        and (all(isinstance(v, str) for v in value) or all(isinstance(v, list) for v in value))
    ):
        items = value
    else:
        got = (
            "an empty array"
            if value == []
            else "a mixed array"
            if isinstance(value, list)
            else kind_of(value)
        )
        raise bad(
            f"'prompt' must be a non-empty string, array of strings, array of token ids or array of such "
            f"arrays, got {got}.",
            "prompt",
        )
    prompts = []
    for item in items:
        if isinstance(item, str):
            ids = info.tokenizer(item)["input_ids"]
            if not ids:
                raise bad("'prompt' is empty: send at least one token of text.", "prompt")
        elif (
            isinstance(item, list)
            and item
            and all(isinstance(v, int) and not isinstance(v, bool) for v in item)
        ):
            ids = item
            wrong = next((v for v in ids if not 0 <= v < info.vocab_size), None)
            if wrong is not None:
                raise bad(
                    f"'prompt' token ids must be greater than or equal to 0 and less than the vocabulary size "
                    f"{info.vocab_size}, got {wrong}.",
                    "prompt",
                )
        else:
            raise bad(
                "'prompt' must be a string, an array of strings, or (arrays of) token ids; mixed or empty "
                f"items are not allowed, got an item that is {kind_of(item) if item != [] else 'an empty array'}.",
                "prompt",
            )
        prompts.append(list(ids))
    return prompts


# --- chat ----------------------------------------------------------------------------------------------------


def parse_chat(body: dict, info: ServerInfo, *, chat_template: Any) -> Parsed:
    """A /v1/chat/completions body, its conversation rendered with the model's chat template."""
    check_model(body, info)
    if body.get("chat_template") is not None:
        raise bad(
            "'chat_template' cannot be set by a request: the server renders conversations with the model's own "
            "chat template.",
            "chat_template",
            "unsupported_parameter",
        )
    n = _n(body, info)
    refuse_unsupported(body, "chat", n=n)
    messages = _messages(body.get("messages"))
    max_tokens = read_int(body, "max_completion_tokens", None, low=1)
    if max_tokens is None:
        max_tokens = read_int(body, "max_tokens", None, low=1)
    want = read_bool(body, "logprobs", False)
    top = read_int(body, "top_logprobs", None, low=0, high=MAX_LOGPROBS)
    if top and not want:
        raise bad("'top_logprobs' needs \"logprobs\": true.", "top_logprobs")
    options = _options(body, info, max_tokens=None, logprobs=(top or 0) if want else None)
    stream, include_usage = _stream(body)
    prompt = render_chat(info, messages, chat_template)
    fitted = _fit([prompt], max_tokens, info, "messages", "messages")
    return Parsed(
        "chat",
        [prompt],
        n,
        _finish_options(options, fitted),
        info.eos_ids | info.chat_stop_ids,
        stream,
        include_usage,
        id=f"chatcmpl-{uuid.uuid4().hex}",
    )


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise bad(f"'messages' must be an array of messages, got {kind_of(value)}.", "messages")
    if not value:
        raise bad("'messages' is empty: send at least one message.", "messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(
                f"'{where}' must be an object with 'role' and 'content', got {kind_of(message)}.", where
            )
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            if role in ("tool", "function"):
                raise bad(
                    f"'{where}.role' {role!r} is not supported by this server (no tool calls).",
                    f"{where}.role",
                )
            raise bad(
                f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}, got {show(role)}.", f"{where}.role"
            )
        content = _content(message.get("content"), f"{where}.content", role)
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise bad(f"'{where}.name' must be a string, got {kind_of(name)}.", f"{where}.name")
        messages.append({"role": "system" if role == "developer" else role, "content": content})
    return messages


def _content(value: Any, where: str, role: str) -> str:
    if isinstance(value, str):
        return value
    if value is None and role == "assistant":
        return ""
    if isinstance(value, list) and value:
        texts = []
        for j, part in enumerate(value):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                if isinstance(part, dict) and part.get("type") == "text":
                    got = f"its 'text' is {kind_of(part.get('text'))}, not a string"
                elif isinstance(part, dict):
                    got = f"type {show(part.get('type'))}"
                else:
                    got = kind_of(part)
                raise bad(
                    f'\'{where}[{j}]\' must be a text part {{"type": "text", "text": ...}} (only text is '
                    f"supported), got {got}.",
                    f"{where}[{j}]",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"'{where}' must be a string or an array of text parts, got {kind_of(value)}.", where)


def render_chat(info: ServerInfo, messages: list[dict[str, str]], chat_template: Any) -> list[int]:
    """The conversation's prompt ids, with the header of the assistant's reply at the end."""
    tokenizer = info.tokenizer
    if chat_template is None:
        raise bad(
            f"The model `{info.model_id}` has no chat template (its tokenizer_config.json sets none), so it "
            "cannot answer chat requests: use /v1/completions with a plain prompt, or start the server with "
            "--chat-template (chatml, zephyr or a Jinja file).",
            "messages",
            "chat_template_missing",
        )
    try:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False, **info.chat_variables
        )
    except (ValueError, TypeError) as err:  # ChatTemplateError is a ValueError
        raise bad(f"The chat template cannot render these messages: {err}", "messages") from None
    if not ids:
        raise bad("The conversation renders to an empty prompt.", "messages")
    return list(ids)
