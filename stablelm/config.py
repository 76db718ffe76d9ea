"""StableLmConfig: the keys of a StableLM `config.json` as fields, validated once, with derived properties."""

from __future__ import annotations

import copy
import json
import math
import os
import reprlib
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic

MODEL_TYPE = "stablelm"

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

# Required keys of `rope_scaling` per rope type, beside `rope_type` itself (as the reference validates them).
ROPE_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}
# Rope types whose frequencies are defined against the length the model was pretrained on.
_ROPE_NEEDS_ORIGINAL_LENGTH = ("yarn", "longrope", "llama3")

# Fields in config.json order, with their defaults (stablelm-3b-4e1t).
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50304,
    "intermediate_size": 6912,
    "hidden_size": 2560,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "layer_norm_eps": 1.0e-5,
    "use_cache": True,
    "tie_word_embeddings": False,
    "rope_theta": 10_000.0,
    "rope_scaling": None,
    "use_qkv_bias": False,
    "qk_layernorm": False,
    "use_parallel_residual": False,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "partial_rotary_factor": 0.25,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": None,
    "classifier_dropout": None,
    "problem_type": None,
    "torch_dtype": None,
}
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
# Optional keys of `rope_scaling`, by the check they get (beside the required keys of ROPE_REQUIRED_KEYS).
_ROPE_POSITIVE_KEYS = (
    "factor",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "low_freq_factor",
    "high_freq_factor",
)
_ROPE_NUMBER_KEYS = ("mscale", "mscale_all_dim")
_ROPE_LIST_KEYS = ("short_factor", "long_factor")
_SHOW = reprlib.Repr()  # values in messages, cut short (a hostile file can hold megabytes in one field)
_SHOW.maxstring = _SHOW.maxother = 60


class StableLmConfig:
    """Configuration of a StableLM model. Defaults give stablelm-3b-4e1t.

    Every key of a StableLM `config.json` is a field of the same name. Both layouts that the ecosystem
    writes are read: top-level `rope_theta` / `partial_rotary_factor` / `rope_scaling` (legacy `type` keys
    included) and the newer `rope_parameters` dict. Keys this class does not know (`architectures`,
    `transformers_version`, ...) are kept and written back unchanged.

    Args:
        vocab_size: Size of the vocabulary.
        intermediate_size: Width of the MLP.
        hidden_size: Width of the residual stream.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Number of query heads.
        num_key_value_heads: Number of key/value heads (equal to the query heads for MHA, 1 for MQA).
        hidden_act: Activation of the gated MLP.
        max_position_embeddings: Longest sequence the model was trained for.
        initializer_range: Standard deviation of the normal initialisation of weights.
        layer_norm_eps: Epsilon of every LayerNorm.
        use_cache: Whether forward returns a KV cache by default.
        tie_word_embeddings: Share the input embedding with the LM head.
        rope_theta: Base period of the rotary embedding.
        rope_scaling: Rotary scaling parameters (`rope_type` plus its keys), or None.
        use_qkv_bias: Bias on the query, key and value projections.
        qk_layernorm: Per-head LayerNorm on queries and keys.
        use_parallel_residual: `x + attn(ln(x)) + mlp(ln(x))` instead of two sequential residuals.
        hidden_dropout: Dropout after the MLP.
        attention_dropout: Dropout on the attention probabilities.
        partial_rotary_factor: Fraction of each head that is rotated.
        bos_token_id, eos_token_id, pad_token_id: Special token ids.
        num_labels, id2label, label2id: Classification labels (heads of the classification models).
        problem_type: `regression`, `single_label_classification` or `multi_label_classification`.
        classifier_dropout: Dropout before the token-classification head (default: `hidden_dropout`).
        torch_dtype: dtype the checkpoint was saved in (a string such as `"bfloat16"`).
        attn_implementation: `eager`, `sdpa` (default) or `flash_attention_2`; a runtime choice, not saved.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        /,
        *,
        num_labels: int | None = None,
        id2label: dict[int, str] | None = None,
        label2id: dict[str, int] | None = None,
        rope_parameters: dict[str, Any] | None = None,
        attn_implementation: str | None = None,
        **kwargs: Any,
    ) -> None:
        model_type = kwargs.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(
                f"This config has model_type {model_type!r}, but this package implements {MODEL_TYPE!r} only. "
                'Pass a StableLM checkpoint (config.json with "model_type": "stablelm").'
            )
        if "dtype" in kwargs:  # newer files write `dtype` instead of `torch_dtype`
            dtype = kwargs.pop("dtype")
            kwargs.setdefault("torch_dtype", dtype)
        if rope_parameters is not None and not isinstance(rope_parameters, dict):
            raise ValueError(
                "rope_parameters must be a dict such as {'rope_type': 'default', 'rope_theta': 10000.0}, got "
                f"{_SHOW.repr(rope_parameters)}."
            )
        # Messages about the rope keys name the field the file used.
        self._rope_field = "rope_parameters" if rope_parameters else "rope_scaling"
        if rope_parameters:
            _merge_rope_parameters(kwargs, rope_parameters)
        for name, default in _DEFAULTS.items():
            setattr(self, name, copy.deepcopy(kwargs.pop(name, default)))
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling, self._rope_field)
        self.id2label, self.label2id = _labels(num_labels, id2label, label2id)
        self.attn_implementation = attn_implementation
        # Unknown keys (architectures, transformers_version, generation defaults of old files, ...).
        self.extra: dict[str, Any] = kwargs
        self.validate()

    # ---- derived, read-only ------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """The rotary parameters in the newer single-dict layout."""
        params = {"rope_type": "default", **(self.rope_scaling or {})}
        params["rope_theta"] = self.rope_theta
        params["partial_rotary_factor"] = self.partial_rotary_factor
        return params

    # ---- validation ------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field's type and range, and the fields against each other.

        Raises:
            ValueError: Naming the field, the value it holds and what it must be.
        """
        for name in _SIZES:
            _check_positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); change one so that hidden_size / num_attention_heads is a whole "
                "head dimension."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads}); for grouped-query attention pick a divisor (1 for MQA, "
                f"{self.num_attention_heads} for MHA)."
            )
        for name in _BOOLEANS:
            _check_bool(name, getattr(self, name))
        _check_number(
            "partial_rotary_factor",
            self.partial_rotary_factor,
            "in (0, 1]",
            lambda v: 0.0 < v <= 1.0,
            hint="; it is the fraction of each head that is rotated (StableLM uses 0.25)",
        )
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(
                f"partial_rotary_factor {self.partial_rotary_factor} gives rotary dimension {self.rotary_dim} "
                f"for head_dim {self.head_dim}; it must be even and at least 2. Choose a factor such that "
                "head_dim * partial_rotary_factor is a positive even integer."
            )
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act {_SHOW.repr(self.hidden_act)} is not supported; use one of {sorted(ACTIVATIONS)}."
            )
        for name in ("layer_norm_eps", "initializer_range"):
            _check_number(name, getattr(self, name), "a positive number", lambda v: v > 0)
        for name in ("hidden_dropout", "attention_dropout"):
            _check_number(name, getattr(self, name), "in [0, 1)", lambda v: 0.0 <= v < 1.0)
        if self.classifier_dropout is not None:
            _check_number(
                "classifier_dropout", self.classifier_dropout, "null or in [0, 1)", lambda v: 0.0 <= v < 1.0
            )
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            _check_token_id(name, getattr(self, name), self.vocab_size, several=name == "eos_token_id")
        if self.problem_type not in _PROBLEM_TYPES:
            raise ValueError(
                f"problem_type must be one of {_PROBLEM_TYPES}, got {_SHOW.repr(self.problem_type)}."
            )
        if self.attn_implementation not in _ATTN_IMPLEMENTATIONS:
            raise ValueError(
                "attn_implementation must be 'eager', 'sdpa' or 'flash_attention_2', got "
                f"{_SHOW.repr(self.attn_implementation)}."
            )
        dtype = self.torch_dtype
        if not (
            dtype is None
            or isinstance(dtype, str)
            or type(dtype).__module__ + type(dtype).__name__ == "torchdtype"
        ):
            raise ValueError(
                f"torch_dtype must be null or a dtype name such as 'bfloat16', got {_SHOW.repr(dtype)}."
            )
        self._validate_rope()

    def _validate_rope(self) -> None:
        _check_number("rope_theta", self.rope_theta, "a positive number", lambda v: v > 0)
        original = self.extra.get("original_max_position_embeddings")
        if original is not None:
            _check_positive_int("original_max_position_embeddings", original)
        if self.rope_scaling is None:
            return
        field = getattr(self, "_rope_field", "rope_scaling")
        rope_type = self.rope_scaling.get("rope_type")
        if not isinstance(rope_type, str) or rope_type not in ROPE_REQUIRED_KEYS:
            raise ValueError(
                f"Unknown rope type {_SHOW.repr(rope_type)} in {field}; use one of {sorted(ROPE_REQUIRED_KEYS)} "
                f"(or {field}=None for plain RoPE)."
            )
        missing = [key for key in ROPE_REQUIRED_KEYS[rope_type] if self.rope_scaling.get(key) is None]
        if missing:
            raise ValueError(
                f"{field} of type {rope_type!r} is missing {', '.join(missing)}; add "
                + ", ".join(f'"{key}": ...' for key in missing)
                + f" to {field}."
            )
        _check_rope_keys(self.rope_scaling, field, self.rotary_dim // 2)
        if (
            rope_type == "llama3"
            and self.rope_scaling["high_freq_factor"] <= self.rope_scaling["low_freq_factor"]
        ):
            raise ValueError(
                f"{field}['high_freq_factor'] ({self.rope_scaling['high_freq_factor']}) must be greater than "
                f"{field}['low_freq_factor'] ({self.rope_scaling['low_freq_factor']})."
            )

    # ---- serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config.json content: known fields, the rope parameters in both layouts, then unknown keys.

        Both rope layouts are written so that old (top-level keys) and new (`rope_parameters`) readers
        agree on the same values.
        """
        out: dict[str, Any] = {"model_type": MODEL_TYPE}
        out.update({name: copy.deepcopy(getattr(self, name)) for name in _DEFAULTS})
        out["rope_parameters"] = self.rope_parameters
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, str):
            out["torch_dtype"] = str(self.torch_dtype).removeprefix("torch.")
        if self.id2label != _default_id2label(2):
            out["id2label"] = {str(k): v for k, v in self.id2label.items()}
            out["label2id"] = dict(self.label2id)
        for key, value in self.extra.items():
            out.setdefault(key, copy.deepcopy(value))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> StableLmConfig:
        """Build a config from a config.json dict; `overrides` replace its keys."""
        if not isinstance(data, dict):
            raise ValueError(f"A config must be a dict of config.json keys, got {type(data).__name__}.")
        return cls(**{**data, **overrides})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `config.json` into `save_directory` (created if needed), atomically."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / "config.json", self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> StableLmConfig:
        """Read a config.json file.

        Raises:
            ValueError: The file is not UTF-8 JSON holding an object, or a value is invalid; the message
                starts with the file's path and names the field.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); the file is damaged or not a "
                "config.json."
            ) from err
        except (ValueError, RecursionError) as err:  # bad syntax, an integer too long, nesting too deep
            raise ValueError(
                f"{path} is not valid JSON ({err}); the file is damaged or not a config.json."
            ) from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object of config keys.")
        try:
            return cls.from_dict(data)
        except RecursionError as err:
            raise ValueError(f"{path}: a value is nested too deeply to be a config field.") from err
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> StableLmConfig:
        """Read `config.json` from a local folder or a hub repo id.

        Keyword arguments `revision`, `cache_dir`, `local_files_only` and `token` go to the hub resolver;
        any other keyword overrides a config field.
        """
        from .hub import resolve_model_dir

        hub_args = {
            k: kwargs.pop(k) for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs
        }
        folder = resolve_model_dir(name_or_path, allow_patterns=["config.json"], **hub_args)
        path = folder / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"No config.json in {folder}; a StableLM checkpoint folder needs one.")
        try:
            config = cls.from_json_file(path)
        except ValueError as err:  # name the file in every message (a wrong model_type, say)
            if str(path) in str(err):
                raise
            raise ValueError(f"{path}: {err}") from err
        return cls.from_dict(config.to_dict(), **kwargs) if kwargs else config

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StableLmConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"StableLmConfig {self.to_json_string()}"


def _merge_rope_parameters(kwargs: dict[str, Any], rope_parameters: dict[str, Any]) -> None:
    """Fold the newer `rope_parameters` dict into the top-level fields; its values win."""
    params = dict(rope_parameters)
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in params:
            kwargs[key] = params.pop(key)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        kwargs["rope_scaling"] = params
    elif kwargs.get("rope_scaling") is None:
        kwargs["rope_scaling"] = None


def _normalise_rope_scaling(rope_scaling: dict[str, Any] | None, field: str) -> dict[str, Any] | None:
    """Legacy files spell the rope type as `type`; keep one spelling (`rope_type`)."""
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise ValueError(
            f"{field} must be a dict such as {{'rope_type': 'linear', 'factor': 2.0}}, got "
            f"{_SHOW.repr(rope_scaling)}."
        )
    scaling = dict(rope_scaling)
    legacy = scaling.pop("type", None)
    scaling.setdefault("rope_type", legacy or "default")
    scaling.pop("rope_theta", None)
    scaling.pop("partial_rotary_factor", None)
    if scaling["rope_type"] == "default" and set(scaling) == {"rope_type"}:
        return None
    return scaling


def rope_original_length(config: StableLmConfig) -> int:
    """The pretraining length yarn/longrope/llama3 scale from (defaults to max_position_embeddings)."""
    scaling = config.rope_scaling or {}
    value = scaling.get(
        "original_max_position_embeddings", config.extra.get("original_max_position_embeddings")
    )
    return int(value) if value is not None else config.max_position_embeddings


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
        raise ValueError(f'id2label must be a dict such as {{"0": "NEGATIVE"}}, got {_SHOW.repr(id2label)}.')
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
                f"{_SHOW.repr(key)}: {_SHOW.repr(value)}."
            )
        labels[index] = value
    if label2id is None:
        label2id = {v: k for k, v in labels.items()}
    elif not isinstance(label2id, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in label2id.items()
    ):
        raise ValueError(
            f'label2id must map label names to indices, such as {{"NEGATIVE": 0}}; got {_SHOW.repr(label2id)}.'
        )
    return labels, dict(label2id)


def _kind(value: Any) -> str:
    """How a value of the wrong type is described in a message."""
    if isinstance(value, str):
        return " (a string: write the value without quotes)"
    return f" (a {type(value).__name__})"


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive integer, got {_SHOW.repr(value)}{_kind(value)}.")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(
            f"{name} must be true or false (a JSON boolean, without quotes), got {_SHOW.repr(value)} "
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
        raise ValueError(f"{name} must be {requirement}, got {_SHOW.repr(value)}{_kind(value)}{hint}.")
    if not _finite(value):
        raise ValueError(f"{name} must be {requirement}, got {_SHOW.repr(value)} (it must be finite){hint}.")
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
        f"{name} must be {allowed}{', or a list of them' if several else ''}, got {_SHOW.repr(value)}."
    )


def _check_rope_keys(scaling: dict[str, Any], field: str, half: int) -> None:
    """The types and ranges of the rope parameters that are set."""
    for key in _ROPE_POSITIVE_KEYS:
        if scaling.get(key) is not None:
            _check_number(f"{field}[{key!r}]", scaling[key], "a positive number", lambda v: v > 0)
    for key in _ROPE_NUMBER_KEYS:
        if scaling.get(key) is not None:
            _check_number(f"{field}[{key!r}]", scaling[key], "a number", lambda v: True)
    if scaling.get("original_max_position_embeddings") is not None:
        _check_positive_int(
            f"{field}['original_max_position_embeddings']", scaling["original_max_position_embeddings"]
        )
    if scaling.get("truncate") is not None:
        _check_bool(f"{field}['truncate']", scaling["truncate"])
    for key in _ROPE_LIST_KEYS:
        factors = scaling.get(key)
        if factors is None:
            continue
        if not isinstance(factors, (list, tuple)) or not all(
            not isinstance(f, bool) and isinstance(f, (int, float)) and _finite(f) and f > 0 for f in factors
        ):
            raise ValueError(
                f"{field}[{key!r}] must be a list of positive numbers, one per rotated frequency; got "
                f"{_SHOW.repr(factors)}."
            )
        if len(factors) != half:
            raise ValueError(
                f"{field}[{key!r}] has {len(factors)} entries; it needs rotary_dim / 2 = {half}."
            )
