"""What this CPU is, as Linux's /proc/cpuinfo says: its feature flags and its vendor (empty elsewhere)."""

from __future__ import annotations

import platform
import sys
from functools import cache

# The /proc/cpuinfo line that lists the features, by `platform.machine()`.
_FLAGS_KEY = {"x86_64": "flags", "AMD64": "flags", "aarch64": "Features", "arm64": "Features"}


@cache
def _cpuinfo() -> str:
    """The text of /proc/cpuinfo on Linux; empty elsewhere or where it cannot be read."""
    if sys.platform != "linux":
        return ""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _field(cpuinfo: str, key: str) -> str | None:
    """The value of the first processor's `key` line in the text of /proc/cpuinfo, or None."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags on Linux (from /proc/cpuinfo: `flags` on x86-64, `Features` on ARM64);
    empty elsewhere."""
    return parse_cpu_flags(_cpuinfo(), platform.machine())


def parse_cpu_flags(cpuinfo: str, machine: str) -> frozenset[str]:
    """The first processor's flags in the text of /proc/cpuinfo, on `machine` (`platform.machine()`):
    its `flags` line on x86-64, its `Features` line on ARM64; empty for other machines."""
    key = _FLAGS_KEY.get(machine)
    value = _field(cpuinfo, key) if key else None
    return frozenset(value.split()) if value else frozenset()


@cache
def cpu_vendor() -> str:
    """The CPU's vendor id on Linux ("GenuineIntel", "AuthenticAMD", ...); empty elsewhere."""
    return _field(_cpuinfo(), "vendor_id") or ""


def cpu_identity() -> str:
    """The CPU's vendor, model name, family, model and stepping on Linux, as one line; empty elsewhere."""
    info = _cpuinfo()
    keys = ("vendor_id", "model name", "cpu family", "model", "stepping", "CPU implementer", "CPU part")
    return "; ".join(f"{key}={value}" for key in keys if (value := _field(info, key)) is not None)
