"""Read a checkpoint's tokenizer files into the arguments of `Tokenizer`, with the reference's precedence."""

from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from .encoding import VERY_LARGE_INTEGER

_SHOW = reprlib.Repr()  # values in messages, cut short (a hostile file can hold megabytes in one field)
_SHOW.maxstring = _SHOW.maxother = 60

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
    config_file = folder / "tokenizer_config.json"
    config = _read_json(config_file)
    special, extra = _special_tokens(config, folder)
    return {
        "backend": _read_backend(tokenizer_file),
        "special_tokens": special,
        "extra_special_tokens": extra,
        "model_max_length": _model_max_length(config.get("model_max_length"), config_file),
        "padding_side": _side(config, "padding_side", config_file),
        "truncation_side": _side(config, "truncation_side", config_file),
        "clean_up_tokenization_spaces": _flag(config, "clean_up_tokenization_spaces", config_file),
        "chat_template": _chat_template(folder, config.get("chat_template"), config_file),
        "generation_config": _read_json(folder / "generation_config.json"),
    }


def _read_backend(path: Path) -> Backend:
    try:
        return Backend.from_file(str(path))
    except Exception as err:  # the tokenizers library raises a bare Exception for a damaged file
        raise ValueError(
            f"{str(path)!r} is not a readable tokenizer.json ({str(err)[:300]}); the file is damaged or "
            "truncated: re-download it or save the tokenizer again."
        ) from err


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); re-download or fix the file."
        ) from err


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when there is no such file."""
    if not path.is_file():
        return {}
    text = _read_text(path)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:  # bad syntax, an integer too long, nesting too deep
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); re-download or fix the file.") from err
    if not isinstance(data, dict):
        raise ValueError(
            f"{str(path)!r} holds a JSON {type(data).__name__}, not an object of settings; re-download or fix "
            "the file."
        )
    return data


def _model_max_length(value: Any, path: Path) -> int:
    if value is None:
        return VERY_LARGE_INTEGER
    # Files saved by the reference hold an int; some hold a float such as 1e30 for "no limit".
    if isinstance(value, float) and value.is_integer() and value >= 1:
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{str(path)!r}: model_max_length must be a positive integer or null, got {_show(value)}."
        )
    return value


def _side(config: Mapping[str, Any], name: str, path: Path) -> str:
    side = config.get(name, "right")
    if side not in ("left", "right"):
        raise ValueError(f'{str(path)!r}: {name} must be "left" or "right", got {_show(side)}.')
    return side


def _flag(config: Mapping[str, Any], name: str, path: Path) -> bool:
    value = config.get(name, False)
    if value is not None and not isinstance(value, bool):
        raise ValueError(
            f"{str(path)!r}: {name} must be true or false (a JSON boolean, without quotes), got {_show(value)}."
        )
    return bool(value)


def _show(value: Any) -> str:
    text = (
        repr(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__
    )
    return text if len(text) <= 80 else text[:77] + "..."


def _special_tokens(config: Mapping[str, Any], folder: Path) -> tuple[dict[str, str | None], list[str]]:
    """Named and extra special tokens from tokenizer_config.json and special_tokens_map.json."""
    config_file, map_file = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
    special_map = _read_json(map_file)
    named: dict[str, tuple[Any, Path]] = {
        key: (value, config_file) for key, value in _class_default_tokens(config, folder).items()
    }
    named |= {
        key: (value, config_file)
        for key, value in config.items()
        if key.endswith("_token") and (isinstance(value, (str, Mapping)) or key in SPECIAL_TOKEN_NAMES)
    }
    extra_key = "extra_special_tokens" if "extra_special_tokens" in config else "additional_special_tokens"
    extra, extra_file = config.get(extra_key) or [], config_file
    if "added_tokens_decoder" not in config:  # the reference reads special_tokens_map.json only then
        for key, value in special_map.items():
            if key == "additional_special_tokens":
                extra, extra_key, extra_file = value, key, map_file
            elif key.endswith("_token"):
                named[key] = (value, map_file)
    if isinstance(extra, Mapping):  # a dict of extra tokens gives each a name
        named |= {key: (value, extra_file) for key, value in extra.items()}
        extra = []
    elif not isinstance(extra, list):
        raise ValueError(
            f"{str(extra_file)!r}: {extra_key} must be a list of tokens, got {_show(extra)}; re-download or "
            "fix the file."
        )
    tokens = {key: _token_text(key, value, path) for key, (value, path) in named.items()}
    return tokens, [_token_text(extra_key, value, extra_file) for value in extra]


def _class_default_tokens(config: Mapping[str, Any], folder: Path) -> dict[str, str]:
    # The reference loads a StableLM checkpoint (config.json with model_type "stablelm") with its generic
    # tokenizer, which fills in no tokens; tokenizer files alone go to the class named by tokenizer_class,
    # whose constructor fills in defaults (GPTNeoXTokenizer: pad "<|padding|>").
    if _read_json(folder / "config.json").get("model_type") == "stablelm":
        return {}
    return _CLASS_DEFAULT_TOKENS.get(str(config.get("tokenizer_class") or "").removesuffix("Fast"), {})


def _token_text(name: str, value: Any, path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(
        f"{str(path)!r}: {name} must be a token string or an added-token dict with 'content', not {_show(value)}."
    )


def _chat_template(folder: Path, configured: Any, config_file: Path) -> str | dict[str, str] | None:
    """chat_template.jinja (and additional_chat_templates/*.jinja) win over tokenizer_config.json's field."""
    templates = {}
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = _read_text(folder / "chat_template.jinja")
    for path in sorted((folder / "additional_chat_templates").glob("*.jinja")):
        templates[path.stem] = _read_text(path)
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    if configured is None or isinstance(configured, str):
        return configured
    if not isinstance(configured, list):
        raise ValueError(
            f"{str(config_file)!r}: chat_template must be a Jinja template (a string) or a list of "
            f'{{"name": ..., "template": ...}} entries, got {_show(configured)}.'
        )
    named = {}
    for number, entry in enumerate(configured):  # named templates: [{"name": ..., "template": ...}, ...]
        if not (
            isinstance(entry, Mapping)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("template"), str)
        ):
            raise ValueError(
                f'{str(config_file)!r}: chat_template entry {number} must be an object with a string "name" '
                f'and a string "template", got {_show(entry) if not isinstance(entry, Mapping) else sorted(entry)}.'
            )
        named[entry["name"]] = entry["template"]
    return named
