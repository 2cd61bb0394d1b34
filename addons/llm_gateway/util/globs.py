"""Case-insensitive glob patterns, checked once when the rules are read.

`*` matches any run of characters (including `/` and `.`), `?` one character, `[abc]` a set.
A pattern with an unclosed `[` or an empty pattern is refused rather than silently taken literally.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from llm_gateway.util.perobject import PerObject


@dataclass(frozen=True)
class Glob:
    pattern: str
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_glob(self.pattern)
        object.__setattr__(self, "_regex", re.compile(fnmatch.translate(self.pattern.lower()), re.S))

    def match(self, text: str | None) -> bool:
        return text is not None and self._regex.match(text.lower()) is not None

    def __str__(self) -> str:
        return self.pattern


def check_glob(pattern: str) -> None:
    """Raise ValueError for a pattern that cannot mean what its author meant."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("a glob must be a non-empty string")
    depth = 0
    for ch in pattern:
        if ch == "[":
            if depth:
                raise ValueError(f"nested '[' in glob {pattern!r}")
            depth = 1
        elif ch == "]" and depth:
            depth = 0
    if depth:
        raise ValueError(f"unclosed '[' in glob {pattern!r}")


class GlobSet:
    """Several globs as one regular expression: one `re` call and one `lower()` per text, whatever their
    number, instead of one of each per glob. `first` says which glob matched: the first in order."""

    def __init__(self, globs: Iterable[Glob]) -> None:
        self.globs = tuple(globs)
        alternatives = "|".join(f"(?P<g{i}>{fnmatch.translate(g.pattern.lower())})" for i, g in enumerate(self.globs))
        self._regex = re.compile(alternatives, re.S) if self.globs else None

    def first(self, text: str | None) -> int | None:
        """The index of the first glob that matches `text`, or None. Alternatives are tried in order, and
        each ends with `\\Z`, so the one that matches is the first glob that matches the whole text."""
        if text is None or self._regex is None:
            return None
        m = self._regex.match(text.lower())
        return None if m is None else int(m.lastgroup[1:])

    def match(self, text: str | None) -> bool:
        return text is not None and self._regex is not None and self._regex.match(text.lower()) is not None


MAX_SETS = 256  # distinct rule tuples kept compiled (a few per rule load)


def _compile(items: tuple, glob_of: Callable[[Any], Glob] | None) -> GlobSet:
    return GlobSet(items if glob_of is None else (glob_of(item) for item in items))


_sets: PerObject[GlobSet] = PerObject(_compile, MAX_SETS)


def glob_set(items: tuple, glob_of: Callable[[Any], Glob] | None = None) -> GlobSet:
    """The compiled `GlobSet` of a tuple from the rules (globs, or items whose glob `glob_of` gives),
    built once per tuple, so once per rule load (`PerObject`)."""
    return _sets(items, glob_of)
