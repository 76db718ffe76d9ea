"""Reading the fields of a JSON request body: each check raises an `ApiError` with OpenAI's error shape
and a message that names the field and what to send instead."""

from __future__ import annotations

import json
import math
from typing import Any


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
        raise bad(f"The request body must be a JSON object, got {kind_of(body)}.", None)
    return body


def kind_of(value: Any) -> str:
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


def show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_int(body: dict, name: str, default: Any, *, low: int | None = None, high: int | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {kind_of(value)} ({show(value)}).", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad(f"'{name}' must be {describe_range(low, high)}, got {value}.", name)
    return value


def read_number(
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
        raise bad(f"'{name}' must be a finite number, got {kind_of(value)} ({show(value)}).", name)
    too_low = low is not None and (value <= low if open_low else value < low)
    if too_low or (high is not None and value > high):
        raise bad(f"'{name}' must be {describe_range(low, high, open_low)}, got {value}.", name)
    return float(value)


def describe_range(low: float | None, high: float | None, open_low: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if open_low else '['}{low:g}, {high:g}]"
    if low is not None:
        return f"{'>' if open_low else '>='} {low:g}"
    return f"<= {high:g}"


def read_bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {kind_of(value)} ({show(value)}).", name)
    return value


def read_string(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad(f"'{name}' must be a string, got {kind_of(value)}.", name)
    return value
