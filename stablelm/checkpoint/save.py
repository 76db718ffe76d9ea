"""save_pretrained: config.json, generation_config.json and the weights, in the reference's layout.

Every file is written under a temporary name, flushed to disk and then renamed, so an interrupted save
never leaves a file that looks whole. Saving over a checkpoint switches the weights at one rename: the
single `model.safetensors`, or the index written after all its shards. New shards never take the name
of a file already there (they get a random tag, `model-1a2b3c4d-00001-of-00002.safetensors`, instead), so
until that rename the old index and its shards stay whole and load as before. Afterwards the weight files
of the earlier save in the same format are removed, so the folder describes one model; the temporary
files of an earlier save that was killed are removed first.

config.json and generation_config.json switch with the weights: written whole under pending names before
the weights, the save's id in the weights' metadata, renamed into place after the switch; a save killed
in between is finished by the next load or save (`stablelm.save_journal`).
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from ..atomic import atomic_path, remove_leftovers, sync_folder, write_text_atomic
from ..save_journal import SAVE_ID_KEY, finish_interrupted_save, remove_pending, write_pending
from .layout import (
    BIN_INDEX_NAME,
    BIN_WEIGHTS_NAME,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    SAFE_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
)

if TYPE_CHECKING:
    from ..model import StableLmPreTrainedModel

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)


def save_pretrained(
    model: StableLmPreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    is_main_process: bool = True,
    push_to_hub: bool = False,
    save_function: Any = None,
    variant: str | None = None,
) -> None:
    """Write `model` (its tensors, or `state_dict`'s) to `save_directory`; see
    `StableLmPreTrainedModel.save_pretrained`."""
    for name, value, default in (
        ("push_to_hub", push_to_hub, False),
        ("save_function", save_function, None),
        ("variant", variant, None),
    ):
        if value is not default and value != default:
            raise ValueError(
                f"save_pretrained({name}={value!r}) is not supported here: this package writes the checkpoint "
                "itself, without variant names, and uploads nothing (huggingface_hub's upload_folder "
                "uploads the folder it writes)."
            )
    if not is_main_process:
        return
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; save_pretrained needs a folder to write into.")
    folder.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    state = _state_to_save(model, state_dict)  # checked before anything in the folder changes
    finish_interrupted_save(folder)
    remove_leftovers(folder, _written_here)
    remove_pending(folder)  # of saves killed before their weights switched
    shards = _split(state, limit)
    weights_name, index_name = (
        (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME) if safe_serialization else (BIN_WEIGHTS_NAME, BIN_INDEX_NAME)
    )
    names = _shard_names(folder, weights_name, len(shards))
    save_id = secrets.token_hex(8)
    pending = write_pending(folder, _config_texts(model), save_id)
    switched = False
    try:
        for keys, name in zip(shards, names, strict=True):
            tensors = {key: _standalone(state[key]) for key in keys}
            with atomic_path(folder / name) as tmp:
                if safe_serialization:
                    save_file(tensors, tmp, metadata={"format": "pt", SAVE_ID_KEY: save_id})
                else:
                    torch.save(tensors, tmp)
            del tensors
        if len(shards) > 1:  # the index goes last: the new checkpoint exists from its rename on
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in state.values()), SAVE_ID_KEY: save_id},
                "weight_map": {
                    key: name for keys, name in zip(shards, names, strict=True) for key in sorted(keys)
                },
            }
            _write_json(folder / index_name, index)
        switched = True
        _remove_stale(
            folder, weights_name, index_name, keep=set(names) | ({index_name} if len(shards) > 1 else set())
        )
    finally:
        for path, name in pending:
            if switched:
                os.replace(path, folder / name)
            else:
                path.unlink(missing_ok=True)
        sync_folder(folder)


def _config_texts(model: StableLmPreTrainedModel) -> dict[str, str]:
    """config.json's text, and generation_config.json's for a model that generates (the reference writes it
    for every such model, its config's special tokens when nothing else was set)."""
    config = copy.deepcopy(model.config)
    config.torch_dtype = str(model.dtype).removeprefix("torch.")
    config.extra["architectures"] = [type(model).__name__]
    texts = {CONFIG_NAME: config.to_json_string()}
    if model.can_generate():
        texts[GENERATION_CONFIG_NAME] = model.generation_config.to_json_string()
    return texts


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" (10**9 bytes) or "2GiB" (2**30 bytes)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = _SIZE.match(size) if isinstance(size, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(
            f"max_shard_size {size!r} is not a size; pass a positive number of bytes or a string such as "
            "'5GB', '500MB' or '2GiB'."
        )
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def _state_to_save(
    model: StableLmPreTrainedModel, given: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's state dict, or `given` (its keys as they are, the checkpoint's names), without the LM head
    when it is tied to the embedding (as the reference saves it); other tensors sharing memory are copied."""
    state = dict(model.state_dict(keep_vars=True) if given is None else _checked_state(given))
    head = model.get_output_embeddings()
    head_key = next((f"{name}.weight" for name, m in model.named_modules() if m is head), None)
    seen: dict[tuple, str] = {}
    # The embedding's key goes first, so that of a tied pair the head's is the one dropped.
    for name in sorted(state, key=lambda key: key == head_key):
        tensor = state[name]
        alias = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if alias not in seen:
            seen[alias] = name
        elif model.config.tie_word_embeddings and head_key in (name, seen[alias]):
            del state[head_key]  # a loader ties it again from the config
        else:
            state[name] = tensor.clone()
    return state


def _checked_state(given: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """`save_pretrained(state_dict=...)`: names mapped to tensors that hold their values."""
    if not isinstance(given, Mapping):
        raise TypeError(f"state_dict must be a dict of tensor names to tensors, got {type(given).__name__}.")
    for key, tensor in given.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"state_dict must map tensor names (str) to tensors; it maps {key!r} to {type(tensor).__name__}."
            )
        if tensor.device.type == "meta":
            raise ValueError(
                f"state_dict[{key!r}] is on the meta device and holds no values to save; pass tensors that "
                "hold the weights (a model's state_dict() after loading)."
            )
    return given


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor owning exactly its bytes (torch.save writes a view's whole storage)."""
    tensor = tensor.detach().to("cpu").contiguous()
    return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor


def _split(state: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Consecutive groups of keys of at most `limit` bytes each (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        if shards[-1] and size + tensor.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += tensor.nbytes
    return shards


def _shard_names(folder: Path, weights_name: str, n: int) -> list[str]:
    """The reference's names (`model-00001-of-00003.safetensors`), or, where one of them is taken (by the
    checkpoint being replaced, whose index may name it), the same with a random tag after the stem."""
    if n == 1:
        return [weights_name]
    stem, dot, ext = weights_name.partition(".")
    names = [f"{stem}-{i + 1:05d}-of-{n:05d}{dot}{ext}" for i in range(n)]
    if any(os.path.lexists(folder / name) for name in names):
        tag = secrets.token_hex(4)
        names = [f"{stem}-{tag}-{i + 1:05d}-of-{n:05d}{dot}{ext}" for i in range(n)]
    return names


def _weights_pattern(weights_name: str) -> re.Pattern[str]:
    """The single weight file and the shards (tagged or not) that `save_pretrained` writes in one format."""
    stem, _, ext = weights_name.partition(".")
    return re.compile(rf"^{re.escape(stem)}((-[0-9a-f]{{8}})?-\d{{5}}-of-\d{{5}})?\.{re.escape(ext)}$")


def _written_here(name: str) -> bool:
    """Whether `save_pretrained` writes a file of this name (whose temporary files it may clear)."""
    fixed = {CONFIG_NAME, GENERATION_CONFIG_NAME, SAFE_INDEX_NAME, BIN_INDEX_NAME}
    return name in fixed or any(
        _weights_pattern(w).match(name) for w in (SAFE_WEIGHTS_NAME, BIN_WEIGHTS_NAME)
    )


def _remove_stale(folder: Path, weights_name: str, index_name: str, *, keep: set[str]) -> None:
    ours = _weights_pattern(weights_name)
    for path in folder.iterdir():
        if path.name not in keep and (ours.match(path.name) or path.name == index_name):
            path.unlink()


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
