"""Registries: the extension points of ftwt (head variants, target rules, static methods, run kinds).

A registry maps a name to one class or function. Everything user-facing that lists or checks those
names — CLI choices and help, configuration validation, run records, eval labels — reads the registry,
so adding an entry is one decorated class and nothing else::

    @HEADS.register("my-head")
    class MyHead(DecisionHead): ...
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name no entry of the registry has; the message lists the known ones."""


class Registry(Generic[T]):
    """Name → entry, in registration order."""

    def __init__(self, what: str) -> None:
        self.what = what  # e.g. "head variant", used in messages
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` on a class or function. Names are unique."""

        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.what} {name!r} is registered already")
            self._entries[name] = entry
            return entry

        return add

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register a toy entry clean up with this)."""
        self._entries.pop(name, None)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(f"unknown {self.what} {name!r}; choose from {self.choices()}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def choices(self, separator: str = ", ") -> str:
        """The names for messages and help texts: ``mass, topk``."""
        return separator.join(self._entries)

    def alternatives(self) -> str:
        """The names as a sentence would list them: ``uniform or taylor``, ``a, b or c``."""
        names = self.names()
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"

    def items(self):
        return self._entries.items()
