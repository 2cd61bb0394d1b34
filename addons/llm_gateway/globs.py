"""Case-insensitive glob patterns, checked once when the rules are read.

`*` matches any run of characters (including `/` and `.`), `?` one character, `[abc]` a set.
A pattern with an unclosed `[` or an empty pattern is refused rather than silently taken literally.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field


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


def any_match(globs: tuple[Glob, ...], text: str | None) -> bool:
    return any(g.match(text) for g in globs)
