"""The rotary-embedding parameters of a config: the two layouts files use (top-level `rope_theta` /
`rope_scaling`, and the newer `rope_parameters` dict), their normalisation and their validation."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config_checks import SHOW, _check_bool, _check_number, _check_positive_int, _finite

if TYPE_CHECKING:
    from .config import StableLmConfig

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
            f"{SHOW.repr(rope_scaling)}."
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
                f"{SHOW.repr(factors)}."
            )
        if len(factors) != half:
            raise ValueError(
                f"{field}[{key!r}] has {len(factors)} entries; it needs rotary_dim / 2 = {half}."
            )


def validate_rope(config: StableLmConfig, field: str) -> None:
    """Check `rope_theta` and the rope scaling parameters; messages name `field`, the key the file used."""
    _check_number("rope_theta", config.rope_theta, "a positive number", lambda v: v > 0)
    original = config.extra.get("original_max_position_embeddings")
    if original is not None:
        _check_positive_int("original_max_position_embeddings", original)
    if config.rope_scaling is None:
        return
    rope_type = config.rope_scaling.get("rope_type")
    if not isinstance(rope_type, str) or rope_type not in ROPE_REQUIRED_KEYS:
        raise ValueError(
            f"Unknown rope type {SHOW.repr(rope_type)} in {field}; use one of {sorted(ROPE_REQUIRED_KEYS)} "
            f"(or {field}=None for plain RoPE)."
        )
    missing = [key for key in ROPE_REQUIRED_KEYS[rope_type] if config.rope_scaling.get(key) is None]
    if missing:
        raise ValueError(
            f"{field} of type {rope_type!r} is missing {', '.join(missing)}; add "
            + ", ".join(f'"{key}": ...' for key in missing)
            + f" to {field}."
        )
    _check_rope_keys(config.rope_scaling, field, config.rotary_dim // 2)
    if (
        rope_type == "llama3"
        and config.rope_scaling["high_freq_factor"] <= config.rope_scaling["low_freq_factor"]
    ):
        raise ValueError(
            f"{field}['high_freq_factor'] ({config.rope_scaling['high_freq_factor']}) must be greater than "
            f"{field}['low_freq_factor'] ({config.rope_scaling['low_freq_factor']})."
        )


class RopeParameters(dict):
    """The `rope_parameters` dict a config hands out: changing it in place (`update`, item assignment, ...)
    writes the change back to the config, as the reference's stored dict does (its tools and tests do
    `config.rope_parameters.update({...})`)."""

    def __init__(self, params: dict[str, Any], write_back: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(params)
        self._write_back = write_back

    def _changed(self) -> None:
        self._write_back(dict(self))

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._changed()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._changed()

    def setdefault(self, key: str, default: Any = None) -> Any:
        value = super().setdefault(key, default)
        self._changed()
        return value

    def pop(self, key: str, *default: Any) -> Any:
        value = super().pop(key, *default)
        self._changed()
        return value

    def __deepcopy__(self, memo: dict) -> dict[str, Any]:
        return copy.deepcopy(dict(self), memo)  # a copy is a plain dict, detached from the config
