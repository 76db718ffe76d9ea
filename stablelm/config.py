"""StableLmConfig: the keys of a StableLM `config.json` as fields, validated once, with derived properties."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, ClassVar

from .config_checks import (
    SHOW,
    _check_positive_int,
    _default_id2label,
    _labels,
    validate_fields,
)
from .config_files import ConfigFilesMixin
from .rope_parameters import RopeParameters, _merge_rope_parameters, _normalise_rope_scaling, validate_rope

MODEL_TYPE = "stablelm"

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


class StableLmConfig(ConfigFilesMixin):
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
        num_labels, id2label, label2id: Classification labels (heads of the classification models);
            label2id's indices may be integers or their strings ("0"), kept as given, as the reference.
        problem_type: `regression`, `single_label_classification` or `multi_label_classification`.
        classifier_dropout: Dropout before the token-classification head (default: `hidden_dropout`).
        torch_dtype: dtype the checkpoint was saved in (a string such as `"bfloat16"`).
        attn_implementation: `eager`, `sdpa` (default) or `flash_attention_2`; a runtime choice, not saved.
    """

    model_type = MODEL_TYPE

    # Read from the class by tools and by the reference's test mixins: no aliased or nested configs.
    attribute_map: dict[str, str] = {}
    sub_configs: dict[str, type] = {}
    is_encoder_decoder = False
    # How FSDP2 shards the decoder (`stablelm.training.distributed.wrap`; the reference's entries): module
    # pattern -> "free_full_weight" (gathered for its forward, freed after it) or "keep_full_weight" (kept
    # gathered from its forward to its backward). A model's `fsdp_plan` prefixes it for the heads.
    base_model_fsdp_plan: ClassVar[dict[str, str]] = {
        "embed_tokens": "free_full_weight",
        "layers.*": "free_full_weight",
        "norm": "keep_full_weight",
    }

    def __init__(
        self,
        /,
        *,
        vocab_size: int = 50304,
        intermediate_size: int = 6912,
        hidden_size: int = 2560,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 32,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1.0e-5,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10_000.0,
        rope_scaling: dict[str, Any] | None = None,
        rope_parameters: dict[str, Any] | None = None,
        use_qkv_bias: bool = False,
        qk_layernorm: bool = False,
        use_parallel_residual: bool = False,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        partial_rotary_factor: float = 0.25,
        bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 0,
        pad_token_id: int | None = None,
        num_labels: int | None = None,
        id2label: dict[int, str] | None = None,
        label2id: dict[str, int] | dict[str, str] | None = None,
        problem_type: str | None = None,
        classifier_dropout: float | None = None,
        torch_dtype: Any = None,
        attn_implementation: str | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> None:
        given = locals()
        kwargs = {**{name: given[name] for name in _DEFAULTS}, **kwargs}
        self.name_or_path = ""  # where from_pretrained read it; not saved
        self.output_hidden_states = output_hidden_states
        self.output_attentions = output_attentions
        self.return_dict = return_dict
        model_type = kwargs.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(
                f"This config has model_type {model_type!r}, but this package implements {MODEL_TYPE!r} only. "
                'Pass a StableLM checkpoint (config.json with "model_type": "stablelm").'
            )
        if "dtype" in kwargs:  # newer files write `dtype` instead of `torch_dtype`
            dtype = kwargs.pop("dtype")
            if kwargs["torch_dtype"] is None:
                kwargs["torch_dtype"] = dtype
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

    @num_labels.setter
    def num_labels(self, num_labels: int) -> None:
        """As the reference: a different count replaces the labels with LABEL_0 ... LABEL_{n-1}."""
        _check_positive_int("num_labels", num_labels)
        if len(self.id2label) != num_labels:
            self.id2label, self.label2id = _labels(num_labels, None, None)

    @property
    def rope_scaling(self) -> dict[str, Any] | None:
        """Rotary scaling parameters (`rope_type` plus its keys), or None for plain RoPE."""
        return self._rope_scaling

    @rope_scaling.setter
    def rope_scaling(self, value: dict[str, Any] | None) -> None:
        # Normalised on every assignment, so `config.rope_scaling = {"type": "linear", ...}` (the legacy
        # spelling the reference's tests use) means what it says.
        self._rope_scaling = _normalise_rope_scaling(
            copy.deepcopy(value), getattr(self, "_rope_field", "rope_scaling")
        )
        if "extra" in self.__dict__:  # assigned after construction: check it against the other fields now
            self._validate_rope()

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """The rotary parameters in the newer single-dict layout."""
        params = {"rope_type": "default", **(self.rope_scaling or {})}
        params["rope_theta"] = self.rope_theta
        params["partial_rotary_factor"] = self.partial_rotary_factor
        return RopeParameters(params, self._set_rope_parameters)

    @rope_parameters.setter
    def rope_parameters(self, value: dict[str, Any]) -> None:
        self._set_rope_parameters(value)

    def _set_rope_parameters(self, value: dict[str, Any]) -> None:
        """Replace the rotary parameters; `rope_theta` and `partial_rotary_factor` keep their values unless
        `value` holds them (the reference drops a missing `partial_rotary_factor`, and its model then fails)."""
        if not isinstance(value, dict):
            raise ValueError(
                "rope_parameters must be a dict such as {'rope_type': 'default', 'rope_theta': 10000.0}, got "
                f"{SHOW.repr(value)}."
            )
        fields = {"rope_theta": self.rope_theta, "partial_rotary_factor": self.partial_rotary_factor}
        _merge_rope_parameters(fields, value)
        self._rope_field = "rope_parameters"
        self.rope_theta, self.partial_rotary_factor = fields["rope_theta"], fields["partial_rotary_factor"]
        self.rope_scaling = fields["rope_scaling"]
        self.validate()

    @property
    def _attn_implementation(self) -> str:
        """The reference's internal name of the attention backend in use ("sdpa" unless set)."""
        return self.attn_implementation or "sdpa"

    @_attn_implementation.setter
    def _attn_implementation(self, value: str | None) -> None:
        self.attn_implementation = value
        self.validate()

    @property
    def use_return_dict(self) -> bool:
        """The reference's older name of `return_dict`."""
        return self.return_dict

    @property
    def dtype(self) -> Any:
        """`torch_dtype` as a torch dtype (None when unset), as the reference's `config.dtype`."""
        if isinstance(self.torch_dtype, str):
            import torch  # here, so that reading a config does not import torch

            return getattr(torch, self.torch_dtype)
        return self.torch_dtype

    def __iter__(self) -> Iterator[str]:
        """The field names, as iterating the reference's config yields its attribute names."""
        return iter(self.to_dict())

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> StableLmConfig:
        """The config of the text model: this config itself (StableLM has no nested configs)."""
        return self

    def __getattr__(self, name: str) -> Any:
        # Keys this class does not know (`architectures`, `transformers_version`, ...) read as attributes, as
        # the reference's config sets every key it is given.
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # ---- validation ------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field's type and range, and the fields against each other.

        Raises:
            ValueError: Naming the field, the value it holds and what it must be.
        """
        validate_fields(self)

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
        out["rope_parameters"] = dict(self.rope_parameters)
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, str):
            out["torch_dtype"] = str(self.torch_dtype).removeprefix("torch.")
        if self.id2label != _default_id2label(2):
            out["id2label"] = {str(k): v for k, v in self.id2label.items()}
            out["label2id"] = dict(self.label2id)
        for name, default in (
            ("output_hidden_states", False),
            ("output_attentions", False),
            ("return_dict", True),
        ):
            if getattr(self, name) != default:  # the reference writes these only when changed
                out[name] = getattr(self, name)
        for key, value in self.extra.items():
            out.setdefault(key, copy.deepcopy(value))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> StableLmConfig:
        """Build a config from a config.json dict; `overrides` replace its keys."""
        if not isinstance(data, dict):
            raise ValueError(f"A config must be a dict of config.json keys, got {type(data).__name__}.")
        if "num_labels" in overrides and "id2label" not in overrides:
            # As the reference's `num_labels` setter: another count replaces the stored labels.
            labels = data.get("id2label")
            if labels is not None and len(labels) != overrides["num_labels"]:
                data = {k: v for k, v in data.items() if k not in ("id2label", "label2id")}
        return cls(**{**data, **overrides})

    @classmethod
    def coerce(cls, config: Any, *, what: str = "config") -> StableLmConfig:
        """`config` itself, or transformers' `StableLmConfig` converted through its `to_dict()` (code written for
        the reference passes one, as `AutoConfig.from_pretrained(path)`); its `attn_implementation` is kept.

        Raises:
            TypeError: `config` is neither.
            ValueError: The reference's config is of another model type, or holds a value this one refuses.
        """
        if isinstance(config, cls):
            return config
        if not _is_reference_config(config):
            kind = type(config)
            raise TypeError(
                f"{what} must be a stablelm.StableLmConfig, got {kind.__module__}.{kind.__qualname__}; build "
                "one with stablelm.StableLmConfig(...) or StableLmConfig.from_pretrained(folder)."
            )
        data = config.to_dict()
        # Keys of the reference's base class at their defaults (chunk_size_feed_forward, ...) are left out, as
        # its config.json leaves them out; the fields this config knows are all taken.
        changed = config.to_diff_dict() if callable(getattr(config, "to_diff_dict", None)) else data
        known = {*cls().to_dict(), "dtype", "id2label", "label2id"}
        name_or_path = data.pop("_name_or_path", "")
        converted = cls.from_dict({k: v for k, v in data.items() if k in known or k in changed})
        converted.name_or_path = name_or_path if isinstance(name_or_path, str) else ""
        attn = getattr(config, "_attn_implementation", None)
        if attn in ("eager", "sdpa", "flash_attention_2"):
            converted.attn_implementation = attn
        return converted

    def to_diff_dict(self) -> dict[str, Any]:
        """`to_dict()` without the values that equal the defaults (`model_type` always kept), as the
        reference's (which writes this into config.json; this package writes every field)."""
        defaults = StableLmConfig().to_dict()
        return {
            k: v for k, v in self.to_dict().items() if k == "model_type" or defaults.get(k, v is None) != v
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StableLmConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"StableLmConfig {self.to_json_string()}"


def _is_reference_config(config: Any) -> bool:
    """Whether `config` is one of transformers' config objects (never imported here: only recognised)."""
    package = type(config).__module__.split(".")[0]
    return package == "transformers" and callable(getattr(config, "to_dict", None))
