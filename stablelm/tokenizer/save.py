"""Write a tokenizer as tokenizer.json, tokenizer_config.json and special_tokens_map.json.

The files are what `files.read_tokenizer_files` (and the reference) read back: the `tokenizers` pipeline as
it stands (added tokens and post-processor included), the named and extra special tokens, the lengths, sides
and the chat template(s). Each file is written under a temporary name, flushed and renamed, so an interrupted
save never leaves a file that looks whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import write_text_atomic
from .encoding import VERY_LARGE_INTEGER

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# The reference's generic class for a tokenizer.json: it loads the pipeline and fills in no defaults.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_STALE_TEMPLATE_FILES = ("chat_template.jinja", "additional_chat_templates")


def save_tokenizer(tokenizer: Tokenizer, save_directory: str | os.PathLike) -> tuple[str, ...]:
    """Write `tokenizer`'s files into `save_directory`; see `Tokenizer.save_pretrained`."""
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; save_pretrained needs a folder to write into.")
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "tokenizer.json": tokenizer.backend_tokenizer.to_str(pretty=True),
        "tokenizer_config.json": _json(tokenizer_config(tokenizer)),
        "special_tokens_map.json": _json(special_tokens_map(tokenizer)),
    }
    for name, text in files.items():
        write_text_atomic(folder / name, text)
    _remove_stale_templates(folder)
    return tuple(str(folder / name) for name in files)


def tokenizer_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """The content of tokenizer_config.json."""
    config: dict[str, Any] = {"tokenizer_class": TOKENIZER_CLASS, **tokenizer.special_tokens_map}
    if tokenizer.extra_special_tokens:
        config["extra_special_tokens"] = list(tokenizer.extra_special_tokens)
    if tokenizer.model_max_length < VERY_LARGE_INTEGER:
        config["model_max_length"] = tokenizer.model_max_length
    config["padding_side"] = tokenizer.padding_side
    config["truncation_side"] = tokenizer.truncation_side
    config["clean_up_tokenization_spaces"] = tokenizer.clean_up_tokenization_spaces
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several templates by name, in the reference's list form
        config["chat_template"] = [{"name": name, "template": text} for name, text in template.items()]
    elif template is not None:
        config["chat_template"] = template
    config["added_tokens_decoder"] = {
        str(i): _added_token(token)
        for i, token in sorted(tokenizer.backend_tokenizer.get_added_tokens_decoder().items())
    }
    return config


def special_tokens_map(tokenizer: Tokenizer) -> dict[str, Any]:
    """The content of special_tokens_map.json (the older file that some readers still use)."""
    out: dict[str, Any] = dict(tokenizer.special_tokens_map)
    if tokenizer.extra_special_tokens:
        out["additional_special_tokens"] = list(tokenizer.extra_special_tokens)
    return out


def _added_token(token: Any) -> dict[str, Any]:
    fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    return {name: getattr(token, name) for name in fields}


def _remove_stale_templates(folder: Path) -> None:
    # These files win over tokenizer_config.json's chat_template when read, so an earlier tokenizer's
    # templates left in the folder would replace this one's.
    for name in _STALE_TEMPLATE_FILES:
        path = folder / name
        if path.is_file():
            path.unlink()
        elif path.is_dir():
            for template in path.glob("*.jinja"):
                template.unlink()


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
