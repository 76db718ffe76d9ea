"""Generation settings: the fields of a checkpoint's generation_config.json, and how `generate`'s
arguments, the checkpoint's defaults and the reference's defaults combine."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_NEW_TOKENS = 20  # with neither max_length nor max_new_tokens set (capped at max_position_embeddings)


class _Unset:
    """Default of `generate`'s arguments: take the value from the generation config. (None is a value:
    `eos_token_id=None` turns EOS off, `top_k=None` turns top-k off, as in the reference.)"""

    def __repr__(self) -> str:
        return "<from generation_config>"


UNSET: Any = _Unset()


@dataclass
class GenerationConfig:
    """Generation settings, as in a checkpoint's `generation_config.json`; defaults are the reference's."""

    max_length: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float | None = 1.0
    top_k: int | None = 50
    top_p: float | None = 1.0
    min_p: float | None = None
    repetition_penalty: float | None = 1.0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    num_return_sequences: int = 1
    stop_strings: str | list[str] | None = None
    cache_implementation: str | None = None
    compile: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in data.items() if k in known},
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings that differ from the defaults, and the unknown keys read from the file."""
        default = GenerationConfig()
        out = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "extra" and getattr(self, f.name) != getattr(default, f.name)
        }
        return {**copy.deepcopy(self.extra), **out}

    def updated(self, **overrides: Any) -> GenerationConfig:
        """A copy with every override that is not UNSET applied."""
        new = copy.deepcopy(self)
        for key, value in overrides.items():
            if value is not UNSET:
                setattr(new, key, value)
        return new


def resolve_config(
    model: Any, generation_config: GenerationConfig | dict | None, **overrides: Any
) -> GenerationConfig:
    """The model's generation defaults (its generation_config.json, else its config's special tokens),
    then `generation_config`, then the keyword arguments that are not UNSET."""
    base = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    if isinstance(base, dict):
        base = GenerationConfig.from_dict(base)
    if base is None:
        c = model.config
        base = GenerationConfig(
            bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id
        )
    return base.updated(**overrides)
