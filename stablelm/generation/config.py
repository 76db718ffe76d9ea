"""Generation settings: the fields of a checkpoint's generation_config.json, and how `generate`'s
arguments, a passed generation config, the model's defaults and the reference's defaults combine.

As in the reference (transformers 5), every field of a `GenerationConfig` defaults to None, meaning "not
set here": `resolve_config` fills it from the model's generation config, then from `DEFAULTS`. A keyword
argument of `generate` always wins, None included (`eos_token_id=None` turns EOS off, `top_k=None` turns
top-k off).
"""

from __future__ import annotations

import copy
import json
import operator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_NEW_TOKENS = 20  # with neither max_length nor max_new_tokens set (capped at max_position_embeddings)
CONFIG_FILE = "generation_config.json"


class _Unset:
    """Default of `generate`'s arguments: take the value from the generation config. (None is a value:
    `eos_token_id=None` turns EOS off, `top_k=None` turns top-k off, as in the reference.)"""

    def __repr__(self) -> str:
        return "<from generation_config>"


UNSET: Any = _Unset()

# The reference's defaults for fields left unset everywhere (its `_get_default_generation_params`).
# max_length is left None: `generate` then makes 20 new tokens, capped at the model's context.
DEFAULTS: dict[str, Any] = {
    "min_length": 0,
    "do_sample": False,
    "use_cache": True,
    "early_stopping": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
    "remove_invalid_values": False,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "compile": False,
}

# Fields of the reference's GenerationConfig that stablelm does not implement, with the value that leaves
# them off (None: only None). Set to anything else, `generate` refuses them by name rather than ignore them.
UNSUPPORTED: dict[str, Any] = {
    "use_mtp": None,
    "cache_config": None,
    "max_cache_len": None,
    "top_h": None,
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "decoder_start_token_id": None,
    "token_healing": False,
    "guidance_scale": 1.0,
    "watermarking_config": None,
    "is_assistant": False,
    "num_assistant_tokens_schedule": "constant",
    "assistant_early_exit": None,
    "assistant_lookbehind": 10,
    "target_lookbehind": 10,
    "assistant_ensemble_weight": None,
    "speculation_type": None,
    "compile_config": None,
    "disable_compile": None,
    "continuous_batching_config": None,
    "low_memory": None,
    "penalty_alpha": None,
    "dola_layers": None,
    "diversity_penalty": 0.0,
    "num_beam_groups": 1,
    "constraints": None,
    "force_words_ids": None,
    "prefill_chunk_size": None,
    # arguments of the reference's generate beside its settings
    "synced_gpus": False,
    "negative_prompt_ids": None,
    "negative_prompt_attention_mask": None,
    "custom_generate": None,
    "trust_remote_code": False,
}
# Read from files and reference objects, never used.
METADATA = ("transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash")


@dataclass
class GenerationConfig:
    """Generation settings, as in a checkpoint's `generation_config.json` and the reference's class of the
    same name: every field None unless set (see the module's docstring); `extra` keeps the keys of a file
    that are no field (`transformers_version`, the reference's fields stablelm does not implement), and
    so do attributes set by other names (`config.compile_config = ...`, as users of the reference set
    them): `generate` then refuses them by name when it does not implement them, rather than ignore
    them. `compile` is stablelm's own (compile the decode step)."""

    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int | None = None
    min_new_tokens: int | None = None
    early_stopping: bool | str | None = None
    max_time: float | None = None
    stop_strings: str | list[str] | None = None
    do_sample: bool | None = None
    num_beams: int | None = None
    use_cache: bool | None = None
    cache_implementation: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    epsilon_cutoff: float | None = None
    eta_cutoff: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    bad_words_ids: list[list[int]] | None = None
    renormalize_logits: bool | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    remove_invalid_values: bool | None = None
    exponential_decay_length_penalty: tuple[int, float] | None = None
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    sequence_bias: dict | list | None = None
    num_return_sequences: int | None = None
    output_attentions: bool | None = None
    output_hidden_states: bool | None = None
    output_scores: bool | None = None
    output_logits: bool | None = None
    return_dict_in_generate: bool | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # speculative decoding (`drafts`); left None, the drafters use the reference's defaults
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    num_assistant_tokens: int | None = None
    assistant_confidence_threshold: float | None = None
    compile: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name == "extra" or name in _FIELDS:
            object.__setattr__(self, name, value)
        else:  # a setting of the reference's that is no field here: kept, and checked by `generate`
            self.extra[name] = value

    def __getattr__(self, name: str) -> Any:
        extra = self.__dict__.get("extra")
        if extra is not None and not name.startswith("__") and name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The settings (every field but `extra`)."""
        return tuple(f.name for f in fields(cls) if f.name != "extra")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        """From a dict such as generation_config.json's; keys that are no field go to `extra`."""
        if not isinstance(data, dict):
            raise TypeError(f"A generation config dict was expected, got {type(data).__name__}.")
        known = set(cls.field_names())
        return cls(
            **{k: v for k, v in data.items() if k in known},
            extra={k: copy.deepcopy(v) for k, v in data.items() if k not in known},
        )

    @classmethod
    def from_model_config(cls, model_config: Any) -> GenerationConfig:
        """The defaults of a model without generation_config.json: its config's special tokens."""
        return cls(
            bos_token_id=getattr(model_config, "bos_token_id", None),
            eos_token_id=getattr(model_config, "eos_token_id", None),
            pad_token_id=getattr(model_config, "pad_token_id", None),
        )

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, *, config_file_name: str = CONFIG_FILE, **hub_options: Any
    ) -> GenerationConfig:
        """Read `generation_config.json` from a checkpoint's folder, a hub repo id (`hub_options`:
        `revision`, `cache_dir`, `local_files_only`, `token`) or the JSON file itself."""
        from ..hub import resolve_model_dir

        path = Path(name_or_path).expanduser()
        if not path.is_file():
            path = resolve_model_dir(name_or_path, allow_patterns=[config_file_name], **hub_options)
        file = path / config_file_name if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"No {config_file_name} in {path}: pass the folder of a checkpoint.")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{file} is not valid JSON ({err}).") from None
        return cls.from_dict(data)

    def save_pretrained(self, save_directory: str | Path, *, config_file_name: str = CONFIG_FILE) -> None:
        """Write the settings that are set to `save_directory`/generation_config.json."""
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"save_directory {folder} is a file; pass a folder.")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / config_file_name).write_text(self.to_json_string(), encoding="utf-8")

    def to_dict(self) -> dict[str, Any]:
        """The settings that are set (not None), and the keys of `extra`: what generation_config.json holds."""
        out = {name: copy.deepcopy(getattr(self, name)) for name in self.field_names()}
        return {**copy.deepcopy(self.extra), **{k: v for k, v in out.items() if v is not None}}

    def to_diff_dict(self) -> dict[str, Any]:
        """The reference's name for the settings that differ from the defaults: here, the ones set."""
        return self.to_dict()

    def to_json_string(self) -> str:
        return json.dumps(_jsonable(self.to_dict()), indent=2, sort_keys=True) + "\n"

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the fields named in `kwargs` (as the reference's `update`); return the other entries."""
        names = set(self.field_names())
        for key, value in kwargs.items():
            if key in names:
                setattr(self, key, value)
        return {k: v for k, v in kwargs.items() if k not in names}

    def validate(self) -> None:
        """Raise TypeError (wrong type) or ValueError (out of range) naming the first field `generate`
        cannot use. The sampling settings are checked by `SamplingParams.validate` and the processors; the
        lengths against the prompt and the model when generation starts."""
        for name, minimum in (
            ("max_new_tokens", 1),
            ("max_length", None),
            ("min_length", 0),
            ("min_new_tokens", 0),
            ("num_return_sequences", 1),
            ("num_beams", 1),
            ("no_repeat_ngram_size", 0),
            ("pad_token_id", None),
        ):
            value = getattr(self, name)
            if value is not None:
                check_integer(name, value, minimum)
        eos = self.eos_token_id
        for value in eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]:
            check_integer("eos_token_id", value, None, what="an integer or a list of integers")
        for name in (
            "do_sample",
            "compile",
            "use_cache",
            "output_scores",
            "output_logits",
            "output_attentions",
            "return_dict_in_generate",
            "renormalize_logits",
            "remove_invalid_values",
        ):
            if getattr(self, name) not in (True, False, None):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.early_stopping not in (True, False, None, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}.")
        beams, returned = self.num_beams or 1, self.num_return_sequences or 1
        if beams == 1 and returned > 1 and not self.do_sample:
            raise ValueError(
                f"num_return_sequences={returned} needs do_sample=True or num_beams >= {returned}: greedy "
                "decoding would return the same sequence each time (the reference refuses it too)."
            )
        if beams > 1 and returned > beams:
            raise ValueError(
                f"num_return_sequences ({returned}) must be at most num_beams ({beams}): beam search returns "
                "its best beams."
            )

    def updated(self, **overrides: Any) -> GenerationConfig:
        """A copy with every override that is not UNSET applied."""
        new = copy.deepcopy(self)
        for key, value in overrides.items():
            if value is not UNSET:
                setattr(new, key, value)
        return new


_FIELDS = frozenset(GenerationConfig.field_names())


def _jsonable(value: Any) -> Any:
    """sequence_bias's tuple keys as the reference writes them (lists of [ids, bias])."""
    if isinstance(value, dict):
        if any(isinstance(k, tuple) for k in value):
            return [[list(k), v] for k, v in value.items()]
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


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


def as_generation_config(value: Any, *, name: str = "generation_config") -> GenerationConfig | None:
    """Ours as is, a dict, or any object with the reference's attributes (its `GenerationConfig`, read
    duck-typed: the package does not import transformers); None stays None."""
    if value is None or isinstance(value, GenerationConfig):
        return value
    if isinstance(value, dict):
        return GenerationConfig.from_dict(value)
    try:
        attributes = vars(value)
    except TypeError:
        attributes = None
    if not attributes or not any(k in attributes for k in ("max_length", "do_sample", "eos_token_id")):
        raise TypeError(
            f"{name} must be a GenerationConfig (stablelm's or transformers'), a dict or None, got "
            f"{type(value).__name__}."
        )
    return GenerationConfig.from_dict(
        {k: v for k, v in attributes.items() if not k.startswith("_") and v is not None}
    )


def resolve_config(
    model: Any, generation_config: GenerationConfig | dict | None, **overrides: Any
) -> GenerationConfig:
    """The settings of one `generate` call, as the reference combines them: `generation_config`'s set
    fields, then the model's generation config (its generation_config.json, else its config's special
    tokens) for the fields still unset, then `DEFAULTS`; then every keyword argument that is not UNSET.

    Raises:
        TypeError: An override is no field of the reference's GenerationConfig.
        ValueError: A field stablelm does not implement is set (named, with what to do).
    """
    base = copy.deepcopy(as_generation_config(generation_config)) or GenerationConfig()
    defaults = as_generation_config(getattr(model, "generation_config", None), name="model.generation_config")
    if defaults is None:
        defaults = GenerationConfig.from_model_config(model.config)
    for name in GenerationConfig.field_names():
        if getattr(base, name) is None:
            value = getattr(defaults, name)
            setattr(base, name, copy.deepcopy(value if value is not None else DEFAULTS.get(name)))
    base.extra = {**copy.deepcopy(defaults.extra), **base.extra}
    names = set(GenerationConfig.field_names())
    for key, value in overrides.items():
        if value is UNSET:
            continue
        if key in names:
            setattr(base, key, value)
        elif key in UNSUPPORTED:
            base.extra[key] = value
        else:
            raise TypeError(
                f"generate() got an unexpected keyword argument {key!r}: it is no generation setting of "
                "the reference's GenerationConfig nor an input of the model."
            )
    check_supported(base)
    return base


def check_supported(config: GenerationConfig) -> None:
    """Refuse, by name, the reference's settings stablelm does not implement when they are switched on."""
    for key, value in config.extra.items():
        if key in UNSUPPORTED and value is not None and value != UNSUPPORTED[key]:
            raise ValueError(
                f"{key}={value!r} is a setting of the reference's generate that stablelm does not implement "
                f"(see docs/generation.md); leave it unset (or {UNSUPPORTED[key]!r})."
            )
