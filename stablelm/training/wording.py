"""Counts in messages: "1 document", "2 documents", "1,024 tokens", "3.2 GiB"."""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`count` (with thousands separators) and `noun`, or `nouns` (default: noun + "s") unless it is one."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def size_text(size: float) -> str:
    """A byte count in MiB below 1 GiB, else in GiB; one decimal below 100 ("12.5 MiB", "3.2 GiB", "16,384 GiB")."""
    value, unit = (size / 2**20, "MiB") if size < 2**30 else (size / 2**30, "GiB")
    return f"{value:,.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"
