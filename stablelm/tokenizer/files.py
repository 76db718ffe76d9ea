"""Read a checkpoint's tokenizer files into the arguments of `Tokenizer`, with the reference's precedence."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from .encoding import VERY_LARGE_INTEGER

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "additional_chat_templates/*.jinja",
    "generation_config.json",
    "config.json",
)
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Tokens the reference's tokenizer classes fill in when tokenizer_config.json leaves them out.
_CLASS_DEFAULT_TOKENS = {
    "GPTNeoXTokenizer": dict.fromkeys(("bos_token", "eos_token", "unk_token"), "<|endoftext|>")
    | {"pad_token": "<|padding|>"},
    "GPT2Tokenizer": dict.fromkeys(("bos_token", "eos_token", "unk_token"), "<|endoftext|>"),
}


def read_tokenizer_files(folder: Path) -> dict[str, Any]:
    """The keyword arguments of `Tokenizer(...)` for the tokenizer files in `folder`.

    Raises:
        FileNotFoundError: `folder` holds no tokenizer.json.
        ValueError: A file is not valid JSON, or names a special token in a form that is not understood.
    """
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(
            f"No tokenizer.json in {str(folder)!r}. Pass the folder (or hub repo) of a checkpoint that ships "
            "tokenizer.json: only the `tokenizers` format is read (saving a fast tokenizer writes it)."
        )
    config = _read_json(folder / "tokenizer_config.json")
    special, extra = _special_tokens(config, _read_json(folder / "special_tokens_map.json"), folder)
    model_max_length = config.get("model_max_length")
    return {
        "backend": Backend.from_file(str(tokenizer_file)),
        "special_tokens": special,
        "extra_special_tokens": extra,
        "model_max_length": VERY_LARGE_INTEGER if model_max_length is None else int(model_max_length),
        "padding_side": config.get("padding_side", "right"),
        "truncation_side": config.get("truncation_side", "right"),
        "clean_up_tokenization_spaces": bool(config.get("clean_up_tokenization_spaces", False)),
        "chat_template": _chat_template(folder, config.get("chat_template")),
        "generation_config": _read_json(folder / "generation_config.json"),
    }


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); re-download or fix the file.") from err


def _special_tokens(
    config: Mapping[str, Any], special_map: Mapping[str, Any], folder: Path
) -> tuple[dict[str, str | None], list[str]]:
    """Named and extra special tokens from tokenizer_config.json and special_tokens_map.json."""
    named: dict[str, Any] = dict(_class_default_tokens(config, folder))
    named |= {
        key: value
        for key, value in config.items()
        if key.endswith("_token") and (isinstance(value, (str, Mapping)) or key in SPECIAL_TOKEN_NAMES)
    }
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
    if "added_tokens_decoder" not in config:  # the reference reads special_tokens_map.json only then
        for key, value in special_map.items():
            if key == "additional_special_tokens":
                extra = value
            elif key.endswith("_token"):
                named[key] = value
    if isinstance(extra, Mapping):  # a dict of extra tokens gives each a name
        named |= extra
        extra = []
    tokens = {key: _token_text(key, value) for key, value in named.items()}
    return tokens, [_token_text("additional_special_tokens", value) for value in extra]


def _class_default_tokens(config: Mapping[str, Any], folder: Path) -> dict[str, str]:
    # The reference loads a StableLM checkpoint (config.json with model_type "stablelm") with its generic
    # tokenizer, which fills in no tokens; tokenizer files alone go to the class named by tokenizer_class,
    # whose constructor fills in defaults (GPTNeoXTokenizer: pad "<|padding|>").
    if _read_json(folder / "config.json").get("model_type") == "stablelm":
        return {}
    return _CLASS_DEFAULT_TOKENS.get(str(config.get("tokenizer_class") or "").removesuffix("Fast"), {})


def _token_text(name: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{name} must be a token string or an added-token dict with 'content', not {value!r}.")


def _chat_template(folder: Path, configured: Any) -> str | dict[str, str] | None:
    """chat_template.jinja (and additional_chat_templates/*.jinja) win over tokenizer_config.json's field."""
    templates = {}
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for path in sorted((folder / "additional_chat_templates").glob("*.jinja")):
        templates[path.stem] = path.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    if isinstance(configured, list):  # named templates: [{"name": ..., "template": ...}, ...]
        return {entry["name"]: entry["template"] for entry in configured}
    return configured
