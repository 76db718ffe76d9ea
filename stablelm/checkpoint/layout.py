"""The Hugging Face checkpoint folder: where it is, and which weight files it holds.

A folder holds `config.json`, optionally `generation_config.json`, and the weights in one of four
layouts, looked for in this order (safetensors first, as the reference does):
`model.safetensors`; `model.safetensors.index.json` naming `model-0000i-of-0000n.safetensors` shards;
the legacy `pytorch_model.bin`; `pytorch_model.bin.index.json` naming `.bin` shards.

Every file read stays inside the folder: an index may name only plain paths within it, and a symbolic
link may point only within it, or, for a Hugging Face cache snapshot, within that repo's cache folder
(`snapshots/<rev>/file -> ../../blobs/<hash>`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

from ..hub import resolve_model_dir

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"

# What a hub download fetches: the safetensors files, and the legacy .bin ones only for a repo without them.
_SAFE_PATTERNS = [
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    SAFE_WEIGHTS_NAME,
    "model-*-of-*.safetensors",
    SAFE_INDEX_NAME,
]
_BIN_PATTERNS = [BIN_WEIGHTS_NAME, "pytorch_model-*-of-*.bin", BIN_INDEX_NAME]

_LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"

WeightFormat = Literal["safetensors", "bin"]


class CheckpointError(ValueError):
    """A checkpoint file is there but its content is wrong; the message names the file and what to do."""


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of one checkpoint, all in one format.

    Attributes:
        format: `"safetensors"` or `"bin"` (legacy PyTorch pickles, read with `weights_only=True`).
        files: The single weight file, or the shards in the order the index first names them.
        index: The index file of a sharded checkpoint, else None.
        weight_map: For a sharded checkpoint, the shard the index assigns each tensor to.
    """

    format: WeightFormat
    files: tuple[Path, ...]
    index: Path | None = None
    weight_map: dict[str, Path] | None = None

    @property
    def source(self) -> Path:
        """The file that describes the weights: the index, or the single weight file."""
        return self.index or self.files[0]


def resolve_folder(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
    token: str | bool | None,
) -> Path:
    """A local folder as it is, or the hub snapshot of a repo id with only the files a load needs."""
    hub = {"revision": revision, "cache_dir": cache_dir, "local_files_only": local_files_only, "token": token}
    folder = resolve_model_dir(name_or_path, allow_patterns=_SAFE_PATTERNS, **hub)
    if not ((folder / SAFE_WEIGHTS_NAME).is_file() or (folder / SAFE_INDEX_NAME).is_file()):
        folder = resolve_model_dir(name_or_path, allow_patterns=_BIN_PATTERNS, **hub)
    for name in (CONFIG_NAME, GENERATION_CONFIG_NAME, SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME, BIN_WEIGHTS_NAME,
                 BIN_INDEX_NAME):  # fmt: skip
        check_inside(folder, folder / name)
    return folder


def check_inside(folder: Path, path: Path) -> None:
    """Refuse `path` if it is (or lies under) a symbolic link leading out of the model folder.

    A Hugging Face cache snapshot (`.../models--org--name/snapshots/<rev>`) links each file to
    `../../blobs/<hash>`: inside the repo's cache folder, which is allowed.
    """
    if not os.path.lexists(path):
        return
    home = folder.resolve()
    if home.parent.name == "snapshots" and home.parent.parent.name.startswith("models--"):
        home = home.parent.parent
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as err:  # a loop of links
        raise CheckpointError(f"{path} is a symbolic link that cannot be followed ({err}).") from err
    if not target.is_relative_to(home):
        raise CheckpointError(
            f"{path} is a symbolic link to {target}, outside the model folder {home}; refusing to follow it. "
            "Copy the file into the folder (or load the folder it belongs to)."
        )


def check_not_empty(folder: Path) -> None:
    if not any(folder.iterdir()):
        raise FileNotFoundError(
            f"The model folder {folder} is empty. It needs {CONFIG_NAME} and the weights ({SAFE_WEIGHTS_NAME} or "
            f"sharded model-*.safetensors with {SAFE_INDEX_NAME}); copy them in, or pass a hub repo id."
        )


def find_weights(folder: Path) -> WeightFiles:
    """The weights of the checkpoint in `folder`, safetensors preferred; shard names checked, files present."""
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return WeightFiles("safetensors", (folder / SAFE_WEIGHTS_NAME,))
    if (folder / SAFE_INDEX_NAME).is_file():
        return _read_index(folder / SAFE_INDEX_NAME, "safetensors")
    if (folder / BIN_WEIGHTS_NAME).is_file():
        return WeightFiles("bin", (folder / BIN_WEIGHTS_NAME,))
    if (folder / BIN_INDEX_NAME).is_file():
        return _read_index(folder / BIN_INDEX_NAME, "bin")
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(
        f"No weights in {folder}: expected {SAFE_WEIGHTS_NAME}, {SAFE_INDEX_NAME} with its shards, or the legacy "
        f"{BIN_WEIGHTS_NAME}. The folder holds: {', '.join(present[:10]) + (' ...' if len(present) > 10 else '')}."
    )


def _read_index(index: Path, fmt: WeightFormat) -> WeightFiles:
    data = read_json(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f'{index} has no "weight_map" (tensor name -> shard file); the index is damaged.'
        )
    shards: dict[str, Path] = {}
    for name in weight_map.values():
        if name not in shards:
            shards[name] = _shard_path(index, name)
    for name, path in shards.items():
        check_inside(index.parent, path)
        if not path.is_file():
            example = next(k for k, v in weight_map.items() if v == name)
            raise CheckpointError(
                f"{index} names the shard {name!r} (holding {example!r}, ...), but {path} does not exist: the "
                "checkpoint is incomplete. Download or copy the missing shard into the folder."
            )
    return WeightFiles(
        fmt, tuple(shards.values()), index=index, weight_map={k: shards[v] for k, v in weight_map.items()}
    )


def _shard_path(index: Path, name: Any) -> Path:
    """The shard `name` as a path inside the index's folder; a name that could point elsewhere is refused."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(
            f"{index} maps a tensor to {name!r}, which is not a file name; the index is damaged."
        )
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or "\\" in name or ".." in posix.parts:
        raise CheckpointError(
            f"{index} names the shard {name!r}, which is outside the model folder; shard names must be plain "
            "file names inside it (such as model-00001-of-00002.safetensors). Refusing to read it."
        )
    return index.parent / posix


def check_not_lfs_pointer(path: Path) -> None:
    """Refuse a Git LFS pointer (a repo cloned without git-lfs), which otherwise reads as a corrupt file."""
    with open(path, "rb") as f:
        head = f.read(len(_LFS_POINTER_PREFIX))
    if head == _LFS_POINTER_PREFIX:
        raise CheckpointError(
            f"{path} is a Git LFS pointer file ({path.stat().st_size} bytes), not the weights: the repository was "
            f"cloned without Git LFS. Run `git lfs install && git lfs pull` in {path.parent}, or download the "
            "model with huggingface_hub."
        )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({err}); the file is damaged, download it again."
        ) from err
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(data).__name__}, not an object; the file is damaged."
        )
    return data


def read_generation_config(folder: Path) -> dict[str, Any] | None:
    """The generation defaults of `generation_config.json` as a plain dict, or None when absent."""
    path = folder / GENERATION_CONFIG_NAME
    return read_json(path) if path.is_file() else None
