"""What the kernels decided on this machine, kept on disk so that the next process does not decide again.

Which kernel serves a layer (`stablelm.kernels.linear.plan`: probes that the kernel gives torch's bits,
then a timing against torch's kernel) and how the kernels prefetch (`stablelm.kernels.prefetch`) cost a
process seconds before its first token on a 3B model (2.8 s on a 2-core Zen 4, of a 9 s `stablelm
generate`); each answer depends only on the machine and the software. So each is written to
`plans-<context>.json` beside the built kernels (`cache_dir()`), where `<context>` is a digest of all
it depends on: the kernels' library (its source and compiler flags), this package's planning code,
torch's version, the CPU's identity and flags, and the environment variables that change torch's or
oneDNN's code paths. Another machine, torch or kernel source reads another file; nothing is ever
reused across them. A damaged or unreadable file is ignored (and replaced); a value that is not a
possible answer is ignored.

`STABLELM_PLAN_CACHE=0` turns it off (every process decides afresh, as before);
`STABLELM_PLAN_CACHE=<folder>` keeps the files in that folder instead; deleting the files forgets the
answers. The timings' answers change speed only: a kernel is used only where its probes
gave torch's bits, and prefetch modes never change results.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_text_atomic
from .cpu import cpu_flags, cpu_identity

ENV = "STABLELM_PLAN_CACHE"
# Variables that change which code torch, oneDNN or MKL run (and so the bits or the speed a plan saw).
_TORCH_ENV = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "ONEDNN_DEFAULT_FPMATH_MODE",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_CBWR",
    "MKL_DEBUG_CPU_TYPE",
)
_PLANNERS = ("linear.py", "attention.py", "prefetch.py", "plan_cache.py", "__init__.py")  # what decides
MISSING = object()
_entries: dict[str, dict[str, Any]] = {}  # by file path: what was read from it, and since put
_process_only: dict[str, dict[str, Any]] = {}  # by file path: answers made on a busy CPU, never written
_writing = threading.Lock()  # one writer per process (the temporary file's name is the process's)


_OFF = ("0", "off", "false", "no")
_ON = ("", "1", "on", "true", "yes")


def enabled() -> bool:
    """Whether answers are kept on disk: unless `STABLELM_PLAN_CACHE` is 0 (or off, false, no)."""
    return os.environ.get(ENV, "").strip().lower() not in _OFF


def context(libraries: tuple[str, ...]) -> str:
    """A digest of everything the answers depend on, for kernels from the library files `libraries`."""
    return _context(libraries, tuple(os.environ.get(name, "") for name in _TORCH_ENV))


@cache
def _context(libraries: tuple[str, ...], env: tuple[str, ...]) -> str:
    here = Path(__file__).parent
    parts = {
        "libraries": [Path(path).name for path in libraries],  # names hold the source's and flags' digest
        "planners": [hashlib.sha256((here / name).read_bytes()).hexdigest() for name in _PLANNERS],
        "torch": torch.__version__,
        "cpu": cpu_identity(),
        "flags": sorted(cpu_flags()),
        "env": env,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _folder() -> Path:
    """Beside the built kernels (`cache_dir()`), or the folder `STABLELM_PLAN_CACHE` names (anything but
    an on/off word: the kernels stay where they are, the answers go there)."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() not in _ON + _OFF:
        return Path(value).expanduser()
    from . import cache_dir  # (the package imports this module's users)

    return cache_dir()


def _path(libraries: tuple[str, ...]) -> Path:
    return _folder() / f"plans-{context(libraries)}.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def get(libraries: tuple[str, ...], key: str) -> Any:
    """The answer kept for `key` by a process whose kernels came from the library files `libraries`, or
    MISSING (none kept, or turned off)."""
    if not enabled():
        return MISSING
    path = _path(libraries)
    own = _process_only.get(str(path), {})
    if key in own:
        return own[key]
    entries = _entries.get(str(path))
    if entries is None:
        entries = _entries[str(path)] = _read(path)
    return entries.get(key, MISSING)


def put(libraries: tuple[str, ...], key: str, value: Any) -> None:
    """Keep `value` (JSON) for `key`; merged with what other processes wrote meanwhile. Where the folder
    cannot be written the answer is kept for this process only."""
    if not enabled():
        return
    path = _path(libraries)
    with _writing:
        entries = _entries.setdefault(str(path), {})
        entries[key] = value
        try:
            merged = {**_read(path), **entries}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(merged, sort_keys=True, indent=0))
        except OSError:
            pass


# Cores' worth of CPU other processes may keep busy while an answer is made for it still to be kept: the
# timings compare two kernels in turns, but a descheduled OpenMP thread stalls one kernel's whole call. A
# 2-core Zen 3 EPYC made its first plans while a compiler kept both cores busy and kept torch's kernel for
# 128-row 768 x 768 layers, which ours runs 3-5x faster on a quiet machine; every later process read that.
BUSY_ELSEWHERE = 0.25


def remembered(
    libraries: tuple[str, ...], key: str, valid: Callable[[Any], bool], make: Callable[[], Any]
) -> Any:
    """The answer for `key`: the one kept by an earlier process where `valid` accepts it (a value no
    answer can be is made again), else `make()`'s (JSON), which is then kept, unless other processes kept
    more than `BUSY_ELSEWHERE` cores busy while it was made (`stablelm.threads.CpuSample`): such an answer
    serves this process only, and the next one decides again."""
    kept = get(libraries, key)
    if kept is not MISSING and valid(kept):
        return kept
    if not enabled():
        return make()
    from ..threads import CpuSample

    sample = CpuSample.now()
    value = make()
    busy = sample.busy_elsewhere()
    if busy is None or busy <= BUSY_ELSEWHERE:
        put(libraries, key, value)
    else:
        _process_only.setdefault(str(_path(libraries)), {})[key] = value
    return value


def forget() -> None:
    """Drop what this process read or made (the files stay): the next `get` reads them again."""
    _entries.clear()
    _process_only.clear()
    _context.cache_clear()
