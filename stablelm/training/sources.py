"""Where a training run starts: a config.json for a new model, or a checkpoint to fine-tune; and its tokenizer."""

from __future__ import annotations

import difflib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import StableLmConfig
from ..heads import StableLmForCausalLM
from ..tokenizer import Tokenizer

# Keys a config.json may hold beside the config's fields (written by this package or the reference).
_OTHER_KEYS = frozenset(
    {
        "architectures",
        "transformers_version",
        "dtype",
        "id2label",
        "label2id",
        "num_labels",
        "rope_parameters",
    }
)
# Config fields that, when the file leaves them out, come from the tokenizer a new model is trained with.
_FROM_TOKENIZER = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
# Models often pad their vocabulary up to a multiple of 64 or 128 for speed; such padding is not warned of.
_PADDING_MULTIPLE = 128


def read_model_config(path: str | os.PathLike, *, tokenizer: Tokenizer | None = None) -> StableLmConfig:
    """The config of a new model from a config.json file, with every key checked.

    `vocab_size` and the bos/eos/pad ids that the file leaves out are taken from `tokenizer`.

    Raises:
        FileNotFoundError: There is no such file.
        ValueError: The file is not a JSON object, has a key that is not a StableLM config field (the
            message suggests the closest one), or its values are invalid.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"Model config {str(path)!r} is a folder; pass the config.json file in it.")
    if not path.is_file():
        raise FileNotFoundError(f"Model config {str(path)!r} does not exist; pass a StableLM config.json.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object of config keys.")
    _check_keys(path, data)
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        ids |= {"pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)}
        data = {**{key: ids[key] for key in _FROM_TOKENIZER if key not in data}, **data}
    try:
        return StableLmConfig.from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def _check_keys(path: Path, data: dict) -> None:
    known = set(StableLmConfig().to_dict()) | _OTHER_KEYS
    unknown = sorted(set(data) - known)
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(
        f"{path} has keys that are not StableLM config fields: {', '.join(hints)}. Fix or remove them; the "
        f"fields are {', '.join(sorted(known))}."
    )


def load_model(name_or_path: str | os.PathLike, *, device: torch.device | str = "cpu") -> StableLmForCausalLM:
    """A checkpoint to fine-tune, in float32 (the optimiser updates the weights in their own dtype)."""
    return StableLmForCausalLM.from_pretrained(name_or_path, dtype=torch.float32, device=device)


def add_special_tokens(tokenizer: Tokenizer, model: StableLmForCausalLM, tokens: Sequence[str]) -> int:
    """Add `tokens` (chat roles, say) as special tokens, growing the model's vocabulary if it must.

    New embedding rows start at the mean of the old ones (see `resize_token_embeddings`). A model whose
    vocabulary is already larger than the tokenizer (padded, as StableLM 2's) keeps its size.

    Returns:
        The number of tokens new to the tokenizer.
    """
    added = tokenizer.add_special_tokens(
        {"extra_special_tokens": list(tokens)}, replace_extra_special_tokens=False
    )
    if len(tokenizer) > model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    return added


def check_vocabulary(tokenizer: Tokenizer, model: StableLmForCausalLM) -> None:
    """Check that the tokenizer's ids fit the model's embeddings, and that few embedding rows go unused.

    A model vocabulary padded past the tokenizer's to a multiple of 128 (as StableLM 2's, for speed) is
    usual; rows beyond that are never trained nor used: a warning, since they only cost memory and time.

    Raises:
        ValueError: The tokenizer makes ids the model has no embedding for (they would index out of range).
    """
    vocab_size = model.config.vocab_size
    tokens = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    if tokens > vocab_size:
        raise ValueError(
            f"The tokenizer has {tokens} tokens (ids up to {tokens - 1}) but the model's vocab_size is "
            f"{vocab_size}; set vocab_size in the model config to at least the tokenizer's size (or leave it "
            "out to take it from the tokenizer), or pass the tokenizer the model was trained with."
        )
    padded = -(-tokens // _PADDING_MULTIPLE) * _PADDING_MULTIPLE
    if vocab_size > padded:
        warnings.warn(
            f"The model's vocab_size ({vocab_size}) is larger than the tokenizer's {tokens} tokens: "
            f"{vocab_size - tokens} embedding rows will never be used (memory and time spent for nothing). Set "
            f"vocab_size to {tokens} in the model config (or leave it out to take it from the tokenizer), or "
            "pass the tokenizer the model was made for.",
            UserWarning,
            stacklevel=2,
        )
