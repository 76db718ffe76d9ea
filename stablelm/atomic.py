"""Writing files so that an interrupted write never leaves a file that looks whole."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# The temporary name `atomic_path` gives `name`: `.name.<pid>.tmp`, beside it.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, flushed to disk and renamed to `path` if the block succeeds,
    removed if not. A process killed inside the block leaves the temporary file behind (never `path`
    half-written); `remove_leftovers` clears it later."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def remove_leftovers(folder: Path, owned: Callable[[str], bool]) -> list[Path]:
    """Remove the temporary files of `atomic_path` in `folder` whose final name `owned` accepts and whose
    writing process is gone (killed mid-write); return them. A live writer's files are left alone."""
    removed = []
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and owned(match["name"]) and not _alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """Whether another process with this id runs (this process's own files are leftovers of a failed write)."""
    if pid == os.getpid() or os.name != "posix":  # Windows' os.kill would end the process: call none alive
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by another user
        return True
    return True


def sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX; elsewhere renames are not synced this way)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to sync a folder; the rename itself has happened
        pass
    finally:
        os.close(fd)
