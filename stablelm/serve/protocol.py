"""OpenAI's request bodies checked field by field, and the response bodies and stream chunks built.

Every problem with a request is an `ApiError` with OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}` and the HTTP status carrying the number: 400 for a
body that is not JSON, a field of the wrong type or out of range, an empty or malformed conversation, a
prompt that does not fit the context; 404 for an unknown model. Messages name the field and what to send
instead. Fields this server does not implement (tools, JSON output, echo, suffix) are refused by name
rather than silently ignored; unknown fields are ignored, as OpenAI's clients send extras.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .engine import SamplingOptions, TokenLogprob

MAX_LOGPROBS = 20  # top_logprobs / logprobs at most (OpenAI: 20 for chat; vLLM's default max)
MAX_STOPS = 16  # stop strings per request (OpenAI allows 4; vLLM, llama.cpp any number)
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
INT64 = (-(2**63), 2**63 - 1)
CHAT_ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """An error answered with OpenAI's error body and `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


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


# --- reading fields --------------------------------------------------------------------------------------


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object."""
    if not raw.strip():
        raise bad("The request body is empty: send a JSON object (Content-Type: application/json).", None)
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"The request body is not valid JSON ({err}): send a JSON object.", None) from None
    except RecursionError:
        raise bad("The request body nests too deeply to parse: send a plain JSON object.", None) from None
    if not isinstance(body, dict):
        raise bad(f"The request body must be a JSON object, got {_kind(body)}.", None)
    return body


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(body: dict, name: str, default: Any, *, low: int | None = None, high: int | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {_kind(value)} ({_show(value)}).", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad(f"'{name}' must be {_range(low, high)}, got {value}.", name)
    return value


def _number(
    body: dict,
    name: str,
    default: float,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"'{name}' must be a finite number, got {_kind(value)} ({_show(value)}).", name)
    too_low = low is not None and (value <= low if open_low else value < low)
    if too_low or (high is not None and value > high):
        raise bad(f"'{name}' must be {_range(low, high, open_low)}, got {value}.", name)
    return float(value)


def _range(low: float | None, high: float | None, open_low: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if open_low else '['}{low:g}, {high:g}]"
    if low is not None:
        return f"{'>' if open_low else '>='} {low:g}"
    return f"<= {high:g}"


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {_kind(value)} ({_show(value)}).", name)
    return value


def _string(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad(f"'{name}' must be a string, got {_kind(value)}.", name)
    return value


# --- the fields both endpoints share ---------------------------------------------------------------------


def check_model(body: dict, info: ServerInfo) -> None:
    model = _string(body, "model")
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
        raise bad(f"'stop' must be a string or an array of strings, got {_kind(value)}.", "stop")
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
            f"'logit_bias' must be an object mapping token ids to biases, got {_kind(value)}.", "logit_bias"
        )
    if len(value) > MAX_LOGIT_BIAS:
        raise bad(f"'logit_bias' may hold at most {MAX_LOGIT_BIAS} tokens, got {len(value)}.", "logit_bias")
    biases = []
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise bad(f"'logit_bias' keys must be token ids, got {_show(key)}.", "logit_bias") from None
        if not 0 <= token < info.vocab_size:
            raise bad(
                f"'logit_bias' names token id {token}, outside the vocabulary (0 to {info.vocab_size - 1}).",
                "logit_bias",
            )
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise bad(
                f"'logit_bias' values must be numbers in [-100, 100], got {_show(bias)} for token {token}.",
                "logit_bias",
            )
        biases.append((token, float(bias)))
    return tuple(sorted(dict(biases).items()))


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise bad(f"'stream_options' must be an object, got {_kind(options)}.", "stream_options")
    if not stream:
        raise bad("'stream_options' can only be given with \"stream\": true.", "stream_options")
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise bad(
            f"'stream_options.include_usage' must be true or false, got {_kind(include)}.",
            "stream_options.include_usage",
        )
    return stream, bool(include)


def _refuse(body: dict, names: tuple[str, ...], why: str) -> None:
    for name in names:
        value = body.get(name)
        if value not in (None, False, [], {}, ""):
            raise bad(f"'{name}' is not supported by this server ({why}).", name, "unsupported_parameter")


def _options(body: dict, info: ServerInfo, *, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
    """The sampling fields both endpoints share (max_tokens and logprobs read by the caller)."""
    _string(body, "user")
    default = info.defaults
    top_k = _int(body, "top_k", default.get("top_k", 0), low=-1)
    return dict(
        temperature=_number(body, "temperature", default.get("temperature", 1.0), low=0.0),
        top_p=_number(body, "top_p", default.get("top_p", 1.0), low=0.0, high=1.0, open_low=True),
        top_k=max(top_k, 0),
        min_p=_number(body, "min_p", default.get("min_p", 0.0), low=0.0, high=1.0),
        seed=_int(body, "seed", None, low=INT64[0], high=INT64[1]),
        presence_penalty=_number(body, "presence_penalty", 0.0, low=-2.0, high=2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, low=-2.0, high=2.0),
        repetition_penalty=_number(
            body, "repetition_penalty", default.get("repetition_penalty", 1.0), low=0.0, open_low=True
        ),
        logit_bias=_logit_bias(body, info),
        min_tokens=_int(body, "min_tokens", 0, low=0),
        ignore_eos=_bool(body, "ignore_eos", False),
        stop=_stop(body),
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
    return _int(body, "n", 1, low=1, high=info.max_batch)


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
    _refuse(body, ("echo", "suffix", "prompt_logprobs"), "it returns the new text only")
    n = _n(body, info)
    best_of = _int(body, "best_of", None, low=1)
    if best_of is not None and best_of != n:
        raise bad(
            f"'best_of' is not supported (it must equal n, {n}, if given).",
            "best_of",
            "unsupported_parameter",
        )
    prompts = _prompts(body.get("prompt"), info)
    if len(prompts) > max_prompts:
        raise bad(f"'prompt' may hold at most {max_prompts} prompts here, got {len(prompts)}.", "prompt")
    max_tokens = _int(body, "max_tokens", 16, low=1)
    logprobs = _int(body, "logprobs", None, low=0, high=MAX_LOGPROBS)
    options = _options(body, info, max_tokens=None, logprobs=logprobs)
    stream, include_usage = _stream(body)
    fitted = _fit(prompts, max_tokens, info, "prompt", "prompt")
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
            "an empty array" if value == [] else "a mixed array" if isinstance(value, list) else _kind(value)
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
                f"items are not allowed, got an item that is {_kind(item) if item != [] else 'an empty array'}.",
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
    _refuse(body, ("tools", "functions", "prompt_logprobs"), "no tool calls or prompt logprobs")
    if body.get("tool_choice") not in (None, "none"):
        raise bad(
            "'tool_choice' is not supported by this server (no tool calls).",
            "tool_choice",
            "unsupported_parameter",
        )
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict) or response_format.get("type") != "text":
            raise bad(
                '\'response_format\' other than {"type": "text"} is not supported by this server.',
                "response_format",
                "unsupported_parameter",
            )
    messages = _messages(body.get("messages"))
    n = _n(body, info)
    max_tokens = _int(body, "max_completion_tokens", None, low=1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, low=1)
    want = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, low=0, high=MAX_LOGPROBS)
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
        raise bad(f"'messages' must be an array of messages, got {_kind(value)}.", "messages")
    if not value:
        raise bad("'messages' is empty: send at least one message.", "messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"'{where}' must be an object with 'role' and 'content', got {_kind(message)}.", where)
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            if role in ("tool", "function"):
                raise bad(
                    f"'{where}.role' {role!r} is not supported by this server (no tool calls).",
                    f"{where}.role",
                )
            raise bad(
                f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}, got {_show(role)}.", f"{where}.role"
            )
        content = _content(message.get("content"), f"{where}.content", role)
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise bad(f"'{where}.name' must be a string, got {_kind(name)}.", f"{where}.name")
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
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise bad(
                    f'\'{where}[{j}]\' must be a text part {{"type": "text", "text": ...}} (only text is '
                    f"supported), got {_show(kind)}.",
                    f"{where}[{j}]",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"'{where}' must be a string or an array of text parts, got {_kind(value)}.", where)


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


# --- responses ------------------------------------------------------------------------------------------------


class Tokens:
    """Token ids as OpenAI's logprobs show them: text, and bytes."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        decoder = getattr(tokenizer.backend_tokenizer, "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._byte_map = _unicode_to_bytes() if self._byte_level else {}

    def text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = self.tokenizer.decode([token])
        return self._text[token]

    def bytes(self, token: int) -> list[int]:
        if token not in self._bytes:
            piece = self.tokenizer.convert_ids_to_tokens(token) or ""
            if self._byte_level and piece and all(c in self._byte_map for c in piece):
                raw = bytes(self._byte_map[c] for c in piece)
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                raw = bytes([int(piece[3:5], 16)])
            else:
                raw = self.text(token).encode("utf-8")
            self._bytes[token] = list(raw)
        return self._bytes[token]


def _unicode_to_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the byte each character of a token stands for."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def chat_logprobs(tokens: Tokens, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """`choices[i].logprobs.content` of a chat response."""
    return [
        {
            "token": tokens.text(e.token),
            "logprob": e.logprob,
            "bytes": tokens.bytes(e.token),
            "top_logprobs": [
                {"token": tokens.text(t), "logprob": lp, "bytes": tokens.bytes(t)} for t, lp in e.top
            ],
        }
        for e in entries
    ]


def completion_logprobs(tokens: Tokens, entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """`choices[i].logprobs` of a completion: tokens, token_logprobs, top_logprobs, text_offset (counted
    from `offset`)."""
    texts = [tokens.text(e.token) for e in entries]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{tokens.text(t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
