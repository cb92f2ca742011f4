"""Named implementations of an extension point: divergences, objectives, scorers, features,
selectors, teacher backends. Adding one is one function (or class) and a decorator:

    @SELECTORS.register("my_selector")
    def my_selector(inputs: SelectorInputs) -> Picked: ...

The config validator checks a config's names against the registries and lists what is
registered. A registry is a read-only mapping from name to implementation.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")


class Registry(Mapping[str, T]):
    """The implementations of one extension point, by name."""

    def __init__(self, what: str, field: str) -> None:
        self.what = what  # "divergence", "selector": for messages
        self.field = field  # the config field that names one: "loss.divergence"
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[U], U]:
        """A decorator adding its function or class under `name`, unchanged."""
        return self.register_as(name, lambda item: typing.cast(T, item))

    def register_as(self, name: str, entry: Callable[[U], T]) -> Callable[[U], U]:
        """A decorator adding `entry(item)` under `name` (for entries that carry more than the
        function: what it needs, how it reports); the decorated item is unchanged."""

        def decorator(item: U) -> U:
            if name in self._items:
                raise ValueError(f"{self.what} {name!r} is already registered")
            self._items[name] = entry(item)
            return item

        return decorator

    def unregister(self, name: str) -> None:
        """Remove `name` (a plugin unloaded, a test's temporary entry)."""
        del self._items[name]

    def lookup(self, name: str) -> T:
        """The entry for `name`; an unknown name is a ValueError naming the field and listing
        what is registered."""
        if name not in self._items:
            raise ValueError(f"{self.field}: {name!r} is unknown; expected {self.allowed()}")
        return self._items[name]

    def allowed(self) -> str:
        return f"one of {sorted(self._items)}"

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.what}: {', '.join(sorted(self._items))})"
