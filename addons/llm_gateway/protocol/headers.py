"""Request headers as one plain dict: lower-case name -> value, read once per request.

mitmproxy's `Headers.items()` scans every field per name (quadratic in the number of fields); this reads the
raw fields in one pass, bounded by `MAX_HEADERS` distinct names. No mitmproxy import: anything with a `fields`
tuple of (name, value) bytes pairs (mitmproxy's `Headers`) or with `items()` is read.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

MAX_HEADERS = 512  # distinct header names read; the rest are ignored


def normalize(headers: Any) -> dict[str, str]:
    """Header name (lower-case) -> value, first occurrence wins; junk entries are skipped. mitmproxy's
    `Headers` give what their `items()` would (repeated fields folded with ", ", names and values decoded
    as UTF-8 with surrogate escapes), read from their raw fields in one pass instead of a scan per name."""
    out: dict[str, str] = {}
    if headers is None:
        return out
    fields = getattr(headers, "fields", None)  # mitmproxy's Headers: the raw (name, value) pairs
    if isinstance(fields, tuple):
        return normalize_fields(fields)
    try:
        items = headers.items()
    except (AttributeError, TypeError):  # not a mapping
        return out
    try:
        for name, value in islice(items, MAX_HEADERS):
            if isinstance(name, bytes):
                name = name.decode("latin-1")
            if isinstance(value, bytes):
                value = value.decode("utf-8", "surrogateescape")
            if isinstance(name, str) and isinstance(value, str):
                out.setdefault(name.lower(), value)
    except (TypeError, ValueError):  # an item that is not a (name, value) pair
        pass
    return out


def normalize_fields(fields: tuple[tuple[bytes, bytes], ...]) -> dict[str, str]:
    groups: dict[bytes, list[bytes]] = {}  # the first MAX_HEADERS distinct names (ASCII case-folded, as
    for name, value in fields:  # mitmproxy's MultiDict folds them) -> [name as first seen, values…]
        group = groups.get(key := name.lower())
        if group is not None:
            group.append(value)
        elif len(groups) < MAX_HEADERS:
            groups[key] = [name, value]
    out: dict[str, str] = {}
    for name, *values in groups.values():
        out.setdefault(name.decode("utf-8", "surrogateescape").lower(),
                       ", ".join(v.decode("utf-8", "surrogateescape") for v in values))
    return out

