"""Checks of single config values, shared by StableLmConfig and its rope parameters: each raises a
ValueError that names the field, the value (cut short) and what it must be."""

from __future__ import annotations

import math
import reprlib
from typing import Any

SHOW = reprlib.Repr()  # values in messages, cut short (a hostile file can hold megabytes in one field)
SHOW.maxstring = SHOW.maxother = 60


def _default_id2label(n: int) -> dict[int, str]:
    return {i: f"LABEL_{i}" for i in range(n)}


def _labels(
    num_labels: int | None, id2label: dict[int, str] | None, label2id: dict[str, int] | None
) -> tuple[dict[int, str], dict[str, int]]:
    if num_labels is not None:
        _check_positive_int("num_labels", num_labels)
    if id2label is None:
        id2label = _default_id2label(num_labels if num_labels is not None else 2)
    elif not isinstance(id2label, dict):
        raise ValueError(f'id2label must be a dict such as {{"0": "NEGATIVE"}}, got {SHOW.repr(id2label)}.')
    elif num_labels is not None and num_labels != len(id2label):
        raise ValueError(
            f"num_labels ({num_labels}) disagrees with id2label ({len(id2label)} labels); pass one of them."
        )
    labels = {}
    for key, value in id2label.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            index = -1
        if isinstance(key, bool) or index < 0 or not isinstance(value, str):
            raise ValueError(
                'id2label must map label indices to label names, such as {"0": "NEGATIVE"}; got the entry '
                f"{SHOW.repr(key)}: {SHOW.repr(value)}."
            )
        labels[index] = value
    if label2id is None:
        label2id = {v: k for k, v in labels.items()}
    elif not isinstance(label2id, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in label2id.items()
    ):
        raise ValueError(
            f'label2id must map label names to indices, such as {{"NEGATIVE": 0}}; got {SHOW.repr(label2id)}.'
        )
    return labels, dict(label2id)


def _kind(value: Any) -> str:
    """How a value of the wrong type is described in a message."""
    if isinstance(value, str):
        return " (a string: write the value without quotes)"
    return f" (a {type(value).__name__})"


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive integer, got {SHOW.repr(value)}{_kind(value)}.")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(
            f"{name} must be true or false (a JSON boolean, without quotes), got {SHOW.repr(value)} "
            f"(a {type(value).__name__})."
        )


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _check_number(name: str, value: Any, requirement: str, ok: Any, *, hint: str = "") -> None:
    """`value` must be a finite int or float (not a bool, not a string) for which `ok(value)` holds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {requirement}, got {SHOW.repr(value)}{_kind(value)}{hint}.")
    if not _finite(value):
        raise ValueError(f"{name} must be {requirement}, got {SHOW.repr(value)} (it must be finite){hint}.")
    if not ok(value):
        raise ValueError(f"{name} must be {requirement}, got {value!r}{hint}.")


def _check_token_id(name: str, value: Any, vocab_size: int, *, several: bool = False) -> None:
    """None, a token id in [0, vocab_size), or (for `several`) a list of them."""
    ids = value if several and isinstance(value, (list, tuple)) else [value]
    if value is None or all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids
    ):
        return
    allowed = f"null or a token id (an integer in [0, {vocab_size}), the vocabulary)"
    raise ValueError(
        f"{name} must be {allowed}{', or a list of them' if several else ''}, got {SHOW.repr(value)}."
    )
