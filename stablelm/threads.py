"""How many CPU threads torch (and so this package's kernels, which ask `torch.get_num_threads()`) uses.

OpenMP threads meet at a barrier after every parallel loop. When another process keeps a core busy, one
of them is descheduled, the others wait for it, and decoding collapses: on 2 cores with one busy process,
2 threads decoded 3.9 tokens/s where 1 thread decoded 46. So the default, "auto", is the cores this
process may use (its CPU affinity, and its cgroup's CPU quota) minus the cores other processes keep
busy, sampled from /proc/stat, and at most torch's own default (the physical cores); at least 1. Where
/proc/stat cannot be read (not Linux), "auto" is torch's default. OMP_NUM_THREADS or MKL_NUM_THREADS in
the environment, set by the user, are torch's default and "auto" keeps them.

`set_threads(n)` applies a count (or "auto"); the command line's `--threads` and `STABLELM_THREADS`
go through it. `CpuSample` lets a caller measure the other processes' load over work of its own (the
command line samples across torch's import, so "auto" costs it no waiting).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

THREADS_ENV = "STABLELM_THREADS"
# Seconds of /proc/stat a measurement needs at least: the kernel counts CPU time in ticks of 10 ms.
MIN_SAMPLE_S = 0.08
_USER_CHOICE = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# A waiting OpenMP thread spins this many times (a few microseconds), then sleeps (libgomp's default is
# 300000, about a millisecond). Quick runs of benchmarks/threads.py (160M bfloat16, 2 cores, a shared
# machine), decode tokens/s with 2 threads on a quiet machine / beside one busy process: libgomp's default
# 47.2 / 7.0, 30000 spins 46.2 / 9.1, 10000 spins 44.3 / 13.9, 3000 spins 37.9 / 21.8, PASSIVE (no
# spinning) 32.7 / 30.0; 1 thread 30.6 / 30.6. "auto" already avoids the load present at start-up; the
# short spin keeps most of the quiet machine's speed and halves the collapse under load that comes later.
_QUIET_WAITS = {"GOMP_SPINCOUNT": "10000"}
_TORCH_DEFAULT: list[int] = []  # torch's count before this module first changed it

__all__ = [
    "THREADS_ENV",
    "CpuSample",
    "auto_threads",
    "auto_threads_detail",
    "parse_threads",
    "quiet_openmp_waits",
    "set_threads",
    "usable_cores",
]


def parse_threads(value: str | int | None, *, name: str = "threads") -> int | None:
    """A thread count from text or a number: a positive integer, or None for "auto" (and for None).

    Raises:
        ValueError: Anything else (0, a negative number, a word); the message names `name`.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if isinstance(value, float) or isinstance(value, bool) or count < 1:
        raise ValueError(f"{name}: expected a positive integer or 'auto', got {value!r}")
    return count


def usable_cores() -> int:
    """The CPUs this process may run on: its affinity set (all CPUs where there is none), lowered to its
    cgroup's CPU quota when one is set (a container limited to 1.5 CPUs gets 2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """CPUs the cgroup may use (cgroup v2 cpu.max, else v1's cfs quota), None when unlimited or unknown."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period_us = int(f.read())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def _read_proc_stat() -> dict[int, tuple[int, int]] | None:
    """Per CPU: (busy ticks, all ticks) from /proc/stat; None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = f.readlines()
    except OSError:
        return None
    ticks: dict[int, tuple[int, int]] = {}
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            values = [int(v) for v in fields[:8]]
        except ValueError:
            continue
        values += [0] * (8 - len(values))
        user, nice, system, idle, iowait, irq, softirq, steal = values
        busy = user + nice + system + irq + softirq + steal  # steal: the hypervisor gave the core away
        ticks[int(name[3:])] = (busy, busy + idle + iowait)
    return ticks or None


@dataclass
class CpuSample:
    """The machine's CPU counters and this process's CPU time at one moment: `CpuSample.now()`, then,
    some work later, `busy_elsewhere()` says how many cores other processes kept busy meanwhile."""

    ticks: dict[int, tuple[int, int]] | None
    wall: float
    own_cpu: float

    @classmethod
    def now(cls) -> CpuSample:
        return cls(_read_proc_stat(), time.perf_counter(), time.process_time())

    def busy_elsewhere(self, *, min_seconds: float = MIN_SAMPLE_S) -> float | None:
        """Cores (a fraction of the CPUs this process may use) other processes kept busy since this
        sample, waiting first until `min_seconds` have passed; None where /proc/stat cannot be read."""
        if self.ticks is None:
            return None
        wait = min_seconds - (time.perf_counter() - self.wall)
        if wait > 0:
            time.sleep(wait)
        later = CpuSample.now()
        if later.ticks is None:
            return None
        try:
            cpus = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            cpus = set(later.ticks)
        busy = 0.0
        for cpu in cpus:
            if cpu in self.ticks and cpu in later.ticks:
                busy_ticks = later.ticks[cpu][0] - self.ticks[cpu][0]
                all_ticks = later.ticks[cpu][1] - self.ticks[cpu][1]
                busy += busy_ticks / all_ticks if all_ticks > 0 else 0.0
        own = (later.own_cpu - self.own_cpu) / max(later.wall - self.wall, 1e-9)
        return max(0.0, busy - own)


def _torch_default() -> int:
    import torch

    if not _TORCH_DEFAULT:
        _TORCH_DEFAULT.append(torch.get_num_threads())
    return _TORCH_DEFAULT[0]


def auto_threads(sample: CpuSample | None = None) -> int:
    """The "auto" count: usable cores minus the cores other processes keep busy (rounded), at most
    torch's default, at least 1. `sample`: a `CpuSample` taken earlier (else this waits MIN_SAMPLE_S)."""
    return auto_threads_detail(sample)[0]


def auto_threads_detail(sample: CpuSample | None = None) -> tuple[int, str]:
    """`auto_threads`, and a few words saying how the count was reached (for --verbose)."""
    default = _torch_default()
    chosen = [name for name in _USER_CHOICE if os.environ.get(name)]
    if chosen:
        return default, f"torch's default, {chosen[0]}={os.environ[chosen[0]]}"
    busy = (sample or CpuSample.now()).busy_elsewhere() if sys.platform.startswith("linux") else None
    if busy is None:
        return default, "torch's default; no /proc/stat to see other processes' load"
    usable = usable_cores()
    count = max(1, min(default, usable - round(busy)))
    return count, f"{usable} usable cores, {busy:.1f} kept busy by other processes, torch's default {default}"


def torch_threads_if_loaded() -> int | None:
    """torch's thread count when torch is already imported (so a caller can restore it), else None."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None and hasattr(torch, "get_num_threads") else None


def quiet_openmp_waits() -> None:
    """Before torch is imported: make OpenMP threads that wait at a barrier give their core up soon
    (GOMP_SPINCOUNT=10000 for libgomp, the OpenMP of torch's Linux wheels), unless the user set
    OMP_WAIT_POLICY, GOMP_SPINCOUNT or KMP_BLOCKTIME. A spinning thread holds a core that a descheduled
    sibling, or another process, needs. No effect once torch is loaded (OpenMP reads the environment
    when it starts)."""
    if "torch" in sys.modules or any(os.environ.get(name) for name in _WAIT_SETTINGS):
        return
    os.environ.update(_QUIET_WAITS)


def set_threads(threads: int | str | None = "auto", *, sample: CpuSample | None = None) -> int:
    """Set how many threads torch's CPU operators and this package's kernels use; return the count.

    Args:
        threads: A positive integer, or "auto" (None too): the usable cores minus those other
            processes keep busy right now, at most torch's default (see the module's docstring).
        sample: For "auto", a `CpuSample` taken earlier, so that no waiting is needed.

    Raises:
        ValueError: `threads` is not a positive integer or "auto".
    """
    count = parse_threads(threads)
    if count is None:
        count = auto_threads(sample)
    else:
        _torch_default()  # remember torch's own default before it changes
    import torch

    torch.set_num_threads(count)
    return count
