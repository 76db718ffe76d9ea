"""`QuantizationConfig`: which weight-only format a model's linear layers use, as config.json records it.

In the spirit of the reference's `TorchAoConfig` / `BitsAndBytesConfig`: pass one (or its dict, or just
"int8" / "int4") to `from_pretrained(..., quantization_config=...)` or `stablelm.quantize(model, ...)`;
`save_pretrained` writes its `to_dict()` as `quantization_config` in config.json, and loading that
checkpoint reads it back and expects the tensors it describes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

QUANT_METHOD = "stablelm"
FORMAT_VERSION = 1
QUANT_TYPES = ("int8", "int4")
GROUP_SIZES = (64, 128, 256)
DEFAULT_GROUP_SIZE = 128


@dataclass
class QuantizationConfig:
    """Weight-only quantization of every linear layer (the LM head included) except those named.

    Attributes:
        quant_type: "int8" (one float32 scale per output channel, symmetric) or "int4" (groups of
            `group_size` inputs, a bfloat16 scale and minimum per group).
        group_size: int4 only: 64, 128 or 256 inputs per group (layers whose input size it does not
            divide stay unquantized).
        modules_to_not_convert: Names of linear layers to keep in the model's dtype ("lm_head",
            "model.layers.0.mlp.down_proj"; a name also matches its sub-modules).
    """

    quant_type: str
    group_size: int = DEFAULT_GROUP_SIZE
    modules_to_not_convert: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(
                f"quantization_config quant_type {self.quant_type!r} is not supported; use 'int8' or 'int4'."
            )
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"quantization_config group_size {self.group_size!r} is not supported; use one of "
                f"{', '.join(map(str, GROUP_SIZES))}."
            )
        names = self.modules_to_not_convert
        if names is None:
            names = []
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(
                f"quantization_config modules_to_not_convert must be a list of module names, got {names!r}."
            )
        self.modules_to_not_convert = list(names)

    @property
    def bits(self) -> int:
        return 8 if self.quant_type == "int8" else 4

    def to_dict(self) -> dict[str, Any]:
        """The config.json form."""
        data: dict[str, Any] = {
            "quant_method": QUANT_METHOD,
            "quant_type": self.quant_type,
            "format_version": FORMAT_VERSION,
            "modules_to_not_convert": list(self.modules_to_not_convert),
        }
        if self.quant_type == "int4":
            data["group_size"] = self.group_size
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, what: str = "quantization_config") -> QuantizationConfig:
        """From the config.json form (or a user's dict); other methods' configs are refused by name."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{what} must be a dict, got {type(data).__name__}.")
        method = data.get("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(
                f"{what} has quant_method {method!r}, which this package cannot load (it reads its own "
                f"weight-only int8/int4 checkpoints, quant_method {QUANT_METHOD!r}). Load the unquantized "
                "checkpoint and pass quantization_config='int8' or 'int4' instead."
            )
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{what} has format_version {version!r}; this version of stablelm reads {FORMAT_VERSION}."
            )
        known = {"quant_method", "quant_type", "format_version", "group_size", "modules_to_not_convert"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{what} has unknown fields {unknown}; known: {sorted(known)}.")
        if "quant_type" not in data:
            raise ValueError(f"{what} has no quant_type; set it to 'int8' or 'int4'.")
        return cls(
            quant_type=data["quant_type"],
            group_size=data.get("group_size", DEFAULT_GROUP_SIZE),
            modules_to_not_convert=data.get("modules_to_not_convert") or [],
        )

    @classmethod
    def coerce(cls, value: Any, *, what: str = "quantization_config") -> QuantizationConfig:
        """A QuantizationConfig from one, its dict, or "int8" / "int4"."""
        if isinstance(value, QuantizationConfig):
            return value
        if isinstance(value, str):
            if value not in QUANT_TYPES:
                raise ValueError(f"{what} {value!r} is not supported; use 'int8' or 'int4'.")
            return cls(quant_type=value)
        if isinstance(value, Mapping):
            return cls.from_dict(value, what=what)
        raise TypeError(
            f"{what} must be 'int8', 'int4', a dict or a stablelm.QuantizationConfig, got {type(value).__name__}."
        )
