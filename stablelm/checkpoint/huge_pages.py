"""Weights in transparent huge pages, for the CPU's decoding kernels (`STABLELM_HUGE_PAGES=1`; by default
only in `stablelm serve`).

A decoded token reads every weight once. Read from the memory-mapped checkpoint, the weights lie in 4 KB
pages; copied into an anonymous mapping the kernel backs with 2 MB pages (`madvise(MADV_HUGEPAGE)`), the
same reads take fewer TLB misses and the hardware prefetchers run on across what were page bounds: on a
2-core Zen 4 EPYC, decoding 1.10-1.12x as fast on the 160M shape at one thread, 1.06x at two and on the
3B shape, where the file's pages were cached in small folios (as after writing or downloading it);
1.03-1.05x where the page cache held them in 2 MB folios, which the mapping then maps as huge pages too
(docs/speed.md, "Weights in huge pages"). The price is at load: every page of the copy is new
memory the OS must clear (there, ~1 s per GB: the 3B shape's warm load 0.5 s -> 8 s), and copies are not
shared between processes as the page cache's pages are. Hence only for long-running processes (a
server, a long chat), not by default. The copy is made while loading, one tensor at a time, each tensor's mapped pages
given back right after, so peak memory stays near the weights' size (1.06x on the 3B shape).

`stablelm serve` turns it on unless `STABLELM_HUGE_PAGES=0` (a server loads once and runs for long).
With it on: bf16/float CPU weights loaded as stored, with stablelm's kernels on (not
with `optimize=False` or `STABLELM_OPTIMIZE=0`), where Linux offers transparent huge pages ("always" or
"madvise" in /sys/kernel/mm/transparent_hugepage/enabled); elsewhere the weights stay in the file's
mapping, as without it.
"""

from __future__ import annotations

import contextlib
import contextvars
import mmap
import os
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import torch

HUGE_PAGES_ENV = "STABLELM_HUGE_PAGES"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line


@cache
def _thp_available(setting: Path = THP_SETTING) -> bool:
    if not all(hasattr(mmap, name) for name in ("MADV_HUGEPAGE", "MAP_ANONYMOUS", "MAP_PRIVATE")):
        return False  # not Linux
    try:
        text = setting.read_text()
    except OSError:
        return False
    return "[always]" in text or "[madvise]" in text


_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


# What an unset STABLELM_HUGE_PAGES means in this thread: off, except where a long-running command loads
# its model (`stablelm serve`: `preferred()`).
_PREFERRED: contextvars.ContextVar[bool] = contextvars.ContextVar("stablelm_huge_pages", default=False)


def requested() -> bool:
    """`STABLELM_HUGE_PAGES` read: on (1, true, yes, on) or off (0, false, no, off); unset or empty, the
    caller's preference (off, but on within `preferred()`); anything else is a ValueError naming the
    variable."""
    value = os.environ.get(HUGE_PAGES_ENV, "").strip().lower()
    if value not in _ON + _OFF:
        raise ValueError(
            f"{HUGE_PAGES_ENV}={os.environ[HUGE_PAGES_ENV]!r} is not understood: set it to 1 to load CPU "
            "weights into huge pages, or to 0 to keep them in the checkpoint's memory map."
        )
    return _PREFERRED.get() if value == "" else value in _ON


@contextlib.contextmanager
def preferred() -> Iterator[None]:
    """Within this block (in this thread), an unset STABLELM_HUGE_PAGES means on: for a process that loads
    once and then serves for long, where the load's extra seconds pay back."""
    token = _PREFERRED.set(True)
    try:
        yield
    finally:
        _PREFERRED.reset(token)


def wanted(kernels: bool) -> bool:
    """Whether loaded CPU weights go into huge pages: asked for, with the kernels on, where the OS offers
    them."""
    return requested() and kernels and _thp_available()


class Arena:
    """One anonymous private mapping of `nbytes` (rounded up to whole huge pages), 2 MB-aligned and advised
    for huge pages, handed out in order as tensors: each keeps the mapping alive as long as it lives."""

    def __init__(self, nbytes: int) -> None:
        size = -(-max(nbytes, 1) // HUGE_PAGE) * HUGE_PAGE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # private: anonymous memory, not shmem's
        self.buffer = mmap.mmap(-1, size + HUGE_PAGE, flags=flags)
        address = torch.frombuffer(self.buffer, dtype=torch.uint8, count=1).data_ptr()
        self.start = (-address) % HUGE_PAGE
        self.end = self.start + size
        try:
            self.buffer.madvise(mmap.MADV_HUGEPAGE, self.start, size)
        except OSError:  # a kernel without transparent huge pages: plain anonymous memory
            pass
        self.used = self.start

    def take(self, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> torch.Tensor:
        """An uninitialised tensor of `shape` and `dtype` (`nbytes` long) in the next free bytes."""
        if self.used + nbytes > self.end:
            raise ValueError(f"the arena has {self.end - self.used} bytes left, {nbytes} asked for")
        out = torch.frombuffer(self.buffer, dtype=dtype, count=nbytes // dtype.itemsize, offset=self.used)
        self.used += -(-nbytes // ALIGN) * ALIGN
        return out.view(shape)


def arena_bytes(sizes: list[int]) -> int:
    """The bytes an Arena needs for tensors of these sizes, each aligned as `take` places them."""
    return sum(-(-n // ALIGN) * ALIGN for n in sizes)
