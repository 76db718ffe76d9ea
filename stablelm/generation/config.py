"""Generation settings: the fields of a checkpoint's generation_config.json, and how `generate`'s
arguments, the checkpoint's defaults and the reference's defaults combine."""

from __future__ import annotations

import copy
import operator
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
    # speculative decoding (stablelm.generation.drafts)
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    num_assistant_tokens: int | None = None
    assistant_confidence_threshold: float | None = None
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

    def validate(self) -> None:
        """Raise TypeError (wrong type) or ValueError (out of range) naming the first field `generate`
        cannot use. The sampling settings are checked by `SamplingParams.validate`; the lengths against
        the prompt and the model when generation starts."""
        for name, minimum in (
            ("max_new_tokens", 1),
            ("max_length", None),
            ("min_new_tokens", 0),
            ("num_return_sequences", 1),
            ("pad_token_id", None),
        ):
            value = getattr(self, name)
            if value is not None:
                check_integer(name, value, minimum)
        eos = self.eos_token_id
        for value in eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]:
            check_integer("eos_token_id", value, None, what="an integer or a list of integers")
        for name in ("do_sample", "compile"):
            if getattr(self, name) not in (True, False, None):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")

    def updated(self, **overrides: Any) -> GenerationConfig:
        """A copy with every override that is not UNSET applied."""
        new = copy.deepcopy(self)
        for key, value in overrides.items():
            if value is not UNSET:
                setattr(new, key, value)
        return new


def check_integer(name: str, value: Any, minimum: int | None, *, what: str = "an integer") -> None:
    """Raise TypeError unless `value` is an integer (a bool is not), ValueError when below `minimum`."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__}).") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {number}.")


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
