"""A value worked out once per object, found by the object's identity.

For what is parsed once per rule load (the rules' tuples of frozen data: compiled globs, signatures by name)
or kept by a library (genai-prices' `ModelPrice`): hashing or comparing such an object on every request would
cost more than the value saves, and its identity is enough because it never changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class PerObject(Generic[T]):
    """`cache(obj, *args)`: `build(obj, *args)` on the first call for `obj`, the same value after (`args` are
    not part of the key: one call site, one way to build). Each entry keeps its object alive, so its id
    cannot be reused while the entry exists; past `limit` entries the cache starts over."""

    def __init__(self, build: Callable[..., T], limit: int) -> None:
        self.build = build
        self.limit = limit
        self._entries: dict[int, tuple[Any, T]] = {}

    def __call__(self, obj: Any, *args: Any) -> T:
        entry = self._entries.get(id(obj))
        if entry is None or entry[0] is not obj:
            if len(self._entries) >= self.limit:
                self._entries.clear()
            entry = self._entries[id(obj)] = (obj, self.build(obj, *args))
        return entry[1]

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
