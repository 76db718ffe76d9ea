"""StableLmConfig: the keys of a StableLM `config.json` as fields, validated once, with derived properties."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .config_checks import (
    SHOW,
    _check_bool,
    _check_number,
    _check_positive_int,
    _check_token_id,
    _default_id2label,
    _labels,
)
from .rope_parameters import _merge_rope_parameters, _normalise_rope_scaling, validate_rope

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
                f"{SHOW.repr(rope_parameters)}."
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
                f"hidden_act {SHOW.repr(self.hidden_act)} is not supported; use one of {sorted(ACTIVATIONS)}."
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
                f"problem_type must be one of {_PROBLEM_TYPES}, got {SHOW.repr(self.problem_type)}."
            )
        if self.attn_implementation not in _ATTN_IMPLEMENTATIONS:
            raise ValueError(
                "attn_implementation must be 'eager', 'sdpa' or 'flash_attention_2', got "
                f"{SHOW.repr(self.attn_implementation)}."
            )
        dtype = self.torch_dtype
        if not (
            dtype is None
            or isinstance(dtype, str)
            or type(dtype).__module__ + type(dtype).__name__ == "torchdtype"
        ):
            raise ValueError(
                f"torch_dtype must be null or a dtype name such as 'bfloat16', got {SHOW.repr(dtype)}."
            )
        self._validate_rope()

    def _validate_rope(self) -> None:
        validate_rope(self, getattr(self, "_rope_field", "rope_scaling"))

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
