"""Short labels for tables and plots."""

from __future__ import annotations


def short_source(source: str) -> str:
    """A task set's name for a table header: `lab:test:200:0:steps=3...` -> `lab:test`."""
    if source.startswith("lab:"):
        return ":".join(source.split(":")[:2])
    return source.rsplit("/", 1)[-1]
