"""Checks of single config values, shared by StableLmConfig and its rope parameters: each raises a
ValueError that names the field, the value (cut short) and what it must be."""

from __future__ import annotations

import math
import reprlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import StableLmConfig

ACTIVATIONS = frozenset(
    {
        "silu",
        "swish",
        "gelu",
        "gelu_new",
        "gelu_pytorch_tanh",
        "gelu_fast",
        "quick_gelu",
        "relu",
        "tanh",
        "sigmoid",
    }
)

# What fields may hold (checked by validate_fields).
_PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
_ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa", "flash_attention_2")
_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
_BOOLEANS = ("use_cache", "tie_word_embeddings", "use_qkv_bias", "qk_layernorm", "use_parallel_residual")

SHOW = reprlib.Repr()  # values in messages, cut short (a hostile file can hold megabytes in one field)
SHOW.maxstring = SHOW.maxother = 60


def _default_id2label(n: int) -> dict[int, str]:
    return {i: f"LABEL_{i}" for i in range(n)}


def _labels(
    num_labels: int | None, id2label: dict[int, str] | None, label2id: dict[str, int | str] | None
) -> tuple[dict[int, str], dict[str, int | str]]:
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
        isinstance(k, str) and _is_label_index(v) for k, v in label2id.items()
    ):
        raise ValueError(
            f'label2id must map label names to indices, such as {{"NEGATIVE": 0}}; got {SHOW.repr(label2id)}.'
        )
    return labels, dict(label2id)


def _is_label_index(value: Any) -> bool:
    """An index as label2id may hold it: an integer, or (as the reference accepts, and keeps as given) the
    string of one, such as "0"."""
    if isinstance(value, str):
        return value.isascii() and value.isdigit()
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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


def validate_fields(config: StableLmConfig) -> None:
    """Check every field's type and range, and the fields against each other.

    Raises:
        ValueError: Naming the field, the value it holds and what it must be.
    """
    for name in _SIZES:
        _check_positive_int(name, getattr(config, name))
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size ({config.hidden_size}) must be divisible by num_attention_heads "
            f"({config.num_attention_heads}); change one so that hidden_size / num_attention_heads is a whole "
            "head dimension."
        )
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads ({config.num_attention_heads}) must be divisible by num_key_value_heads "
            f"({config.num_key_value_heads}); for grouped-query attention pick a divisor (1 for MQA, "
            f"{config.num_attention_heads} for MHA)."
        )
    for name in _BOOLEANS:
        _check_bool(name, getattr(config, name))
    _check_number(
        "partial_rotary_factor",
        config.partial_rotary_factor,
        "in (0, 1]",
        lambda v: 0.0 < v <= 1.0,
        hint="; it is the fraction of each head that is rotated (StableLM uses 0.25)",
    )
    if config.rotary_dim < 2 or config.rotary_dim % 2:
        raise ValueError(
            f"partial_rotary_factor {config.partial_rotary_factor} gives rotary dimension {config.rotary_dim} "
            f"for head_dim {config.head_dim}; it must be even and at least 2. Choose a factor such that "
            "head_dim * partial_rotary_factor is a positive even integer."
        )
    if not isinstance(config.hidden_act, str) or config.hidden_act not in ACTIVATIONS:
        raise ValueError(
            f"hidden_act {SHOW.repr(config.hidden_act)} is not supported; use one of {sorted(ACTIVATIONS)}."
        )
    for name in ("layer_norm_eps", "initializer_range"):
        _check_number(name, getattr(config, name), "a positive number", lambda v: v > 0)
    for name in ("hidden_dropout", "attention_dropout"):
        _check_number(name, getattr(config, name), "in [0, 1)", lambda v: 0.0 <= v < 1.0)
    if config.classifier_dropout is not None:
        _check_number(
            "classifier_dropout", config.classifier_dropout, "null or in [0, 1)", lambda v: 0.0 <= v < 1.0
        )
    for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
        _check_token_id(name, getattr(config, name), config.vocab_size, several=name == "eos_token_id")
    if config.problem_type not in _PROBLEM_TYPES:
        raise ValueError(
            f"problem_type must be one of {_PROBLEM_TYPES}, got {SHOW.repr(config.problem_type)}."
        )
    if config.attn_implementation not in _ATTN_IMPLEMENTATIONS:
        raise ValueError(
            "attn_implementation must be 'eager', 'sdpa' or 'flash_attention_2', got "
            f"{SHOW.repr(config.attn_implementation)}."
        )
    dtype = config.torch_dtype
    if not (
        dtype is None
        or isinstance(dtype, str)
        or type(dtype).__module__ + type(dtype).__name__ == "torchdtype"
    ):
        raise ValueError(
            f"torch_dtype must be null or a dtype name such as 'bfloat16', got {SHOW.repr(dtype)}."
        )
    config._validate_rope()
