"""config.json and generation_config.json switch with the weights when `save_pretrained` saves over a
checkpoint (see `stablelm.checkpoint.save`).

Before any weight is written, the config files are written whole beside their final names
(`.config.json.<save id>.<pid>.pending`), and the save's id goes into the metadata of the file that
switches the weights (the single safetensors file, or the index). After that switch they are renamed into
place. A save killed between the two leaves pending files whose id the weights carry: the next load of
the folder (`finish_interrupted_save`, called before a config is read from a local folder) or the next
save into it renames them, so the folder never loads as new weights with the earlier config. Pending
files whose id the weights do not carry belong to a save killed before its weights switched: the next
save removes them. A single `.bin` file has no metadata: there the config files follow the weights.

Light on imports: reading a config from a folder runs `finish_interrupted_save`; only a folder holding
pending files imports the checkpoint reader (and torch).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from .atomic import _alive, sync_folder

SAVE_ID_KEY = "stablelm_save_id"  # in the weights' metadata: which save put them there
CONFIG_FILES = ("config.json", "generation_config.json")
_PENDING = re.compile(r"^\.(?P<name>.+)\.(?P<save>[0-9a-f]{16})\.(?P<pid>\d+)\.pending$")


def write_pending(folder: Path, texts: dict[str, str], save_id: str) -> list[tuple[Path, str]]:
    """Each text (a config file's, by name) written whole and flushed to disk under its pending name;
    returns (pending path, final name) pairs. On failure, what was written is removed."""
    written: list[tuple[Path, str]] = []
    try:
        for name, text in texts.items():
            path = folder / f".{name}.{save_id}.{os.getpid()}.pending"
            written.append((path, name))
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for path, _ in written:
            path.unlink(missing_ok=True)
        raise
    return written


def finish_interrupted_save(folder: Path) -> list[str]:
    """Put in place the config files of a save killed after its weights switched (their pending files
    carry the id in the weights' metadata); return their names. Where the folder cannot be written, warn:
    its config files are then those of the save before."""
    try:
        found = [(m, path) for path in folder.iterdir() if (m := _PENDING.match(path.name))]
    except OSError:  # not a folder we can list: the loader says what is wrong with it
        return []
    if not found:
        return []
    switched = _switched_save_id(folder)
    done = []
    for match, path in found:
        if switched is None or match["save"] != switched or match["name"] not in CONFIG_FILES:
            continue
        try:
            os.replace(path, folder / match["name"])
        except OSError as err:
            warnings.warn(
                f"{folder}: a save_pretrained was killed after writing the weights, and its {match['name']} "
                f"cannot be put in place ({err.strerror or err}): the folder's {match['name']} is the earlier "
                "save's. Save the model again.",
                stacklevel=2,
            )
            continue
        done.append(match["name"])
    if done:
        sync_folder(folder)
    return done


def remove_pending(folder: Path) -> None:
    """Remove the pending config files of saves killed before their weights switched (run after
    `finish_interrupted_save`); those of a save still running in another process are left alone."""
    for path in folder.iterdir():
        match = _PENDING.match(path.name)
        if match and match["name"] in CONFIG_FILES and not _alive(int(match["pid"])):
            path.unlink(missing_ok=True)


def _switched_save_id(folder: Path) -> str | None:
    """The save id in the metadata of the file that says which weights the folder holds, the one the
    loader chooses (`find_weights`: the single safetensors file, or an index), or None."""
    from safetensors import SafetensorError, safe_open

    from .checkpoint.layout import CheckpointError, find_weights

    try:
        weights = find_weights(folder)
        if weights.index is not None:
            metadata = json.loads(weights.index.read_text("utf-8")).get("metadata")
        elif weights.format == "safetensors":
            with safe_open(weights.files[0], framework="pt") as f:
                metadata = f.metadata()
        else:  # a single .bin file has no metadata
            return None
    except (OSError, ValueError, AttributeError, CheckpointError, SafetensorError):  # the loader says what
        return None
    value = metadata.get(SAVE_ID_KEY) if isinstance(metadata, dict) else None
    return value if isinstance(value, str) else None
