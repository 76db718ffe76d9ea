"""Resolve a model name to a local folder: a directory on disk, or a Hugging Face hub repo id."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def resolve_model_dir(
    name_or_path: str | os.PathLike,
    *,
    allow_patterns: Sequence[str],
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
) -> Path:
    """Return a local folder holding the model's files.

    A path that exists on disk is used as it is (after finishing a `save_pretrained` into it that was
    killed between switching the weights and the config files: see `save_journal`). Anything else is taken as a hub repo id and fetched
    through `huggingface_hub` (only the files matching `allow_patterns`, reusing its cache, honouring
    `HF_HUB_OFFLINE` and `local_files_only`; `force_download` fetches them again even when cached).

    Raises:
        FileNotFoundError: the name is neither a local folder nor reachable on the hub.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        from .save_journal import finish_interrupted_save

        finish_interrupted_save(path)  # a save_pretrained killed after its weights switched: finish it
        return path
    if path.exists():
        raise NotADirectoryError(f"{str(path)!r} is a file; pass the folder that holds the model's files.")
    name = str(name_or_path)
    if _looks_like_a_path(name):
        raise FileNotFoundError(
            f"No folder at {name!r}. Pass an existing folder that holds the model's files, or a hub repo id "
            "such as 'stabilityai/stablelm-3b-4e1t'."
        )
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            name,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            force_download=force_download,
            allow_patterns=list(allow_patterns),
        )
    except Exception as err:  # the hub's errors vary by cause: offline, unknown repo, no access
        raise FileNotFoundError(
            f"Cannot find model {name!r}: it is not a local folder, and fetching it from the Hugging Face "
            f"hub failed ({type(err).__name__}: {err}). Pass the path of a local folder that holds "
            "config.json and the weights, or check the repo id, your network and HF_TOKEN."
        ) from err
    return Path(local)


def _looks_like_a_path(name: str) -> bool:
    """A name no hub repo id can be ("org/name" at most): absolute, relative, home or nested paths."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1
