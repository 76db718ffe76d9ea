"""The Hugging Face checkpoint folder: where it is, and which weight files it holds.

A folder holds `config.json`, optionally `generation_config.json`, and the weights in one of four
layouts, looked for in this order (safetensors first, as the reference does):
`model.safetensors`; `model.safetensors.index.json` naming `model-0000i-of-0000n.safetensors` shards;
the legacy `pytorch_model.bin`; `pytorch_model.bin.index.json` naming `.bin` shards. `from_pretrained`'s
`use_safetensors` keeps to one format, its `variant` names the files as the reference's `_add_variant`
does (`model.fp16.safetensors`, `model.safetensors.index.fp16.json`), and its `subfolder` finds them all
in a folder under the model's.

Every file read stays inside the folder: an index may name only plain paths within it, and a symbolic
link may point only within it, or, for a Hugging Face cache snapshot, within that repo's cache folder
(`snapshots/<rev>/file -> ../../blobs/<hash>`).
"""

from __future__ import annotations

import json
import os
import re
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


def add_variant(name: str, variant: str | None) -> str:
    """`name` with the variant before its last suffix, as the reference's `_add_variant` names files:
    `model.safetensors` -> `model.fp16.safetensors`, `model.safetensors.index.json` ->
    `model.safetensors.index.fp16.json`."""
    if variant is None:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


@dataclass(frozen=True)
class WeightChoice:
    """Which weight files a load reads: `from_pretrained`'s `variant` and `use_safetensors`.

    Attributes:
        variant: Read `model.<variant>.safetensors` (and the other layouts so named) instead, or None.
        use_safetensors: True reads only safetensors, False only the legacy `.bin` files, None both
            (safetensors first), as the reference's option.
    """

    variant: str | None = None
    use_safetensors: bool | None = None

    def __post_init__(self) -> None:
        if self.use_safetensors is not None and not isinstance(self.use_safetensors, bool):
            raise TypeError(f"use_safetensors must be True, False or None, got {self.use_safetensors!r}.")
        if self.variant is not None and (
            not isinstance(self.variant, str) or not self.variant or any(c in self.variant for c in "/\\")
        ):
            raise ValueError(
                f"variant must be a name such as 'fp16' (the weights then are model.fp16.safetensors), got "
                f"{self.variant!r}."
            )

    def candidates(self) -> list[tuple[str, WeightFormat, bool]]:
        """(file name, format, whether it is an index) of each layout this choice reads, in the order tried."""
        formats: list[WeightFormat] = (["safetensors"] if self.use_safetensors is not False else []) + (
            ["bin"] if not self.use_safetensors else []
        )
        return [
            (add_variant(name, self.variant), fmt, sharded)
            for fmt in formats
            for name, sharded in _NAMES[fmt]
        ]

    def names(self, fmt: WeightFormat) -> list[str]:
        return [name for name, f, _ in self.candidates() if f == fmt]

    def patterns(self, fmt: WeightFormat) -> list[str]:
        """What a hub download of the weights in `fmt` fetches: the config files, the single file, the index and
        its shards (`model-00001-of-00002.safetensors`, or `model.fp16-00001-of-00002.safetensors` for a
        variant, as the reference writes them)."""
        stem, _, suffix = _NAMES[fmt][0][0].partition(".")
        shards = (
            f"{stem}-*-of-*.{suffix}" if self.variant is None else f"{stem}.{self.variant}-*-of-*.{suffix}"
        )
        return [CONFIG_NAME, GENERATION_CONFIG_NAME, *self.names(fmt), shards]


_NAMES: dict[WeightFormat, list[tuple[str, bool]]] = {
    "safetensors": [(SAFE_WEIGHTS_NAME, False), (SAFE_INDEX_NAME, True)],
    "bin": [(BIN_WEIGHTS_NAME, False), (BIN_INDEX_NAME, True)],
}


def resolve_folder(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
    subfolder: str = "",
    choice: WeightChoice = WeightChoice(),
) -> Path:
    """The folder of the checkpoint's files: a local folder as it is, or the hub snapshot of a repo id with
    only the files a load needs (the legacy `.bin` ones only for a repo without safetensors); in either,
    `subfolder` under it."""
    if not isinstance(subfolder, str):
        raise TypeError(f"subfolder must be a string (a folder inside the model's), got {subfolder!r}.")
    hub = {"revision": revision, "cache_dir": cache_dir, "local_files_only": local_files_only, "token": token,
           "force_download": force_download}  # fmt: skip
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""

    def fetch(fmt: WeightFormat) -> Path:
        patterns = [prefix + pattern for pattern in choice.patterns(fmt)]
        return resolve_model_dir(name_or_path, allow_patterns=patterns, **hub)

    root = fetch("safetensors" if choice.use_safetensors is not False else "bin")
    folder = root / subfolder
    if choice.use_safetensors is None and not any(
        (folder / n).is_file() for n in choice.names("safetensors")
    ):
        root = fetch("bin")
        folder = root / subfolder
    if subfolder:
        check_inside(root, folder)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{str(name_or_path)!r} has no subfolder {subfolder!r} ({folder} is not a folder); pass the "
                "subfolder that holds config.json and the weights, or leave subfolder out for the model's own."
            )
        if Path(name_or_path).expanduser().is_dir():
            from ..save_journal import finish_interrupted_save

            finish_interrupted_save(folder)  # as resolve_model_dir does for the model's own folder
    for name in (CONFIG_NAME, GENERATION_CONFIG_NAME, *(n for n, _, _ in choice.candidates())):
        check_inside(folder, folder / name)
    return folder


def check_inside(folder: Path, path: Path) -> None:
    """Refuse `path` if it is (or lies under) a symbolic link leading out of the model folder.

    A Hugging Face cache snapshot (`.../models--org--name/snapshots/<rev>`, or a folder under it) links each
    file to `../../blobs/<hash>`: inside the repo's cache folder, which is allowed.
    """
    if not os.path.lexists(path):
        return
    home = folder.resolve()
    for inner in (home, *home.parents):
        if inner.parent.name == "snapshots" and inner.parent.parent.name.startswith("models--"):
            home = inner.parent.parent
            break
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


def find_weights(folder: Path, choice: WeightChoice = WeightChoice()) -> WeightFiles:
    """The weights of the checkpoint in `folder`, safetensors preferred (or the one format `choice` asks
    for, under its variant's names); shard names checked, files present."""
    for name, fmt, sharded in choice.candidates():
        if (folder / name).is_file():
            return _read_index(folder / name, fmt) if sharded else WeightFiles(fmt, (folder / name,))
    raise FileNotFoundError(_no_weights(folder, choice))


def _no_weights(folder: Path, choice: WeightChoice) -> str:
    """What a folder lacking the weights `choice` reads holds instead, and what to pass to read it."""
    present = sorted(p.name for p in folder.iterdir())
    wanted = [name for name, _, _ in choice.candidates()]
    hints = []
    either = WeightChoice(choice.variant)  # both formats, under this variant's names
    for fmt, refusing in (("safetensors", False), ("bin", True)):
        held = [name for name in either.names(fmt) if name in present]
        if held and choice.use_safetensors is refusing:
            hints.append(
                f"it holds {held[0]}, which use_safetensors={refusing} does not read: pass use_safetensors=None "
                "to read it"
            )
    plain = [name for name, _, _ in WeightChoice().candidates() if name in present]
    if choice.variant is not None and plain:
        hints.append(f"it holds {plain[0]}, weights without a variant: pass variant=None to load them")
    variants = sorted(_variants_in(present) - {choice.variant})
    if variants:
        hints.append(f"it holds weights of the variant {', '.join(map(repr, variants))}: pass it as variant=")
    listing = ", ".join(present[:10]) + (" ..." if len(present) > 10 else "")
    return (
        f"No weights in {folder}: expected {', '.join(wanted[:-1])} or {wanted[-1]}"
        + (f" ({'; '.join(hints)})" if hints else "") + f". The folder holds: {listing}."
    )  # fmt: skip


def _variants_in(names: list[str]) -> set[str]:
    """The variants whose single weight file or index is among `names` (`model.fp16.safetensors`: fp16)."""
    bases = [base.rpartition(".") for layouts in _NAMES.values() for base, _ in layouts]
    found = set()
    for name in names:
        for stem, _, suffix in bases:
            if name.startswith(f"{stem}.") and name.endswith(f".{suffix}"):
                variant = name[len(stem) + 1 : -len(suffix) - 1]
                if variant and "." not in variant and not _SHARD_SUFFIX.search(variant):
                    found.add(variant)
    return found


_SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")


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
