"""The result records the models return, with the reference's `ModelOutput` behaviour: attributes, string
keys and integer indices over the fields that are set, dict iteration over their names, `to_tuple()`."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

import torch

from .cache import Cache

# The reference's older names of the `cache` field, still read by most code written for it.
_OLD_CACHE_NAMES = ("past_key_values", "cache_params")


class ModelOutput(OrderedDict):
    """Dataclass base: `out.logits`, `out["logits"]`, `out[0]`, `out.keys()`, `out.items()`, `for key in out`.

    As the reference's, it is an ordered dict of the fields that are not None (in field order), so
    `dict(out)`, `out.items()` and key iteration see those only, and `out[0]` is the first of them.
    `past_key_values` (attribute or key) reads the `cache` field.
    """

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                super().__setitem__(field.name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        name = "cache" if name in _OLD_CACHE_NAMES else name
        if value is not None and name in {f.name for f in fields(self)}:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        key = "cache" if key in _OLD_CACHE_NAMES else key
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            return super().__getitem__("cache" if key in _OLD_CACHE_NAMES else key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return super().__contains__("cache" if key in _OLD_CACHE_NAMES else key)

    def get(self, key: str, default: Any = None) -> Any:
        return super().get("cache" if key in _OLD_CACHE_NAMES else key, default)

    def to_tuple(self) -> tuple[Any, ...]:
        """The values of the fields that are set, in field order (what `return_dict=False` returns)."""
        return tuple(self[key] for key in self.keys())

    @property
    def past_key_values(self) -> Cache | None:
        """The reference's older name of `cache`."""
        return getattr(self, "cache", None)

    def __reduce__(self):  # pickle and copy by fields, as the reference does
        return type(self), tuple(getattr(self, f.name) for f in fields(self))


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class CausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
