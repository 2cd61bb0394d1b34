"""The one JSON codec: request and answer bodies read, Anthropic bodies and records written.

Bodies are read as `json.loads` reads them (orjson where it gives the same value, about three times faster on
an agent's request); Anthropic bodies are written compact with non-ASCII kept as UTF-8, as the API writes
them; records are one JSON line each. Standard library, and orjson where it is installed (the gateway always
has it; the usage report also runs where only the standard library is).
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # the usage report on a machine with the standard library alone: json does it all
    orjson = None


def dumps(value: Any) -> bytes:
    """Compact JSON bytes, non-ASCII kept as UTF-8 (the API's own style).

    A lone surrogate (a client's `"\\ud83d"`, half an emoji) cannot be UTF-8: then the text is written
    with escapes, which is the same JSON value, instead of raising."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


def loads(text: str | bytes) -> Any:
    """A JSON text's value, or None where it is not JSON (never raises): an event's data, a log line, a header."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def canonical(value: Any) -> bytes:
    """The one canonical text of a value, for hashing and comparing: keys sorted, compact, UTF-8 with lone
    surrogates kept (a client's half emoji hashes as itself), unknown types as their str().

    orjson writes it where it can (about ten times faster: the cache watch hashes every block of every agent
    request, 60–300 kB each); what it refuses (lone surrogates, integers past 64 bits, keys that are not
    strings, unknown types) json writes. Each value always takes the same path, so equal values give equal
    texts; the one blur: orjson writes NaN and ±Infinity as null (only a body json had to read holds them)."""
    if orjson is not None:
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
            pass
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return text.encode("utf-8", "surrogatepass")


def parse_json_body(content: bytes | None, exact: bool = True) -> Any:
    """A body as JSON, or None: never raises, whatever the client sent. Always what `json.loads` gives:
    orjson (strict RFC 8259, about three times faster on an agent's request) reads it, except where it would
    differ: what it refuses (NaN, escaped lone surrogates, nesting past 1024) and a body with a run of 19 or
    more digits (orjson reads an integer past 64 bits as a float) go to json.

    `exact=False` skips that digit search, which costs as much as orjson's whole read (0.4 ms on a 280 kB
    Claude Code request): for a body that is only looked at (an integer past 64 bits may then read as a
    float), never written again; whoever writes it reads it again exactly (addons/streams.py)."""
    if not content or content[:1] not in (b"{", b"[", b" ", b"\n", b"\r", b"\t"):
        return None
    if orjson is not None and (not exact or _LONG_DIGITS not in content.translate(_DIGITS_AS_ZERO)):
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError:
            pass
    return loads(content)


# 19 digits in a row, found by one `translate` and one substring search (a regular expression is 20 times slower)
_DIGITS_AS_ZERO = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))
_LONG_DIGITS = b"0" * 19


def encode_line(record: dict[str, Any]) -> bytes:
    """One JSON line of a record (UTF-8, compact, unknown types as their str()); ValueError or TypeError for a
    record that is not JSON (a cycle). orjson writes it (about ten times faster than json; NaN and infinities
    as null, where json would write invalid JSON); what orjson refuses (a lone surrogate from a client's JSON,
    an integer past 64 bits) goes to json, a lone surrogate replaced."""
    if orjson is not None:
        try:
            return orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE)
        except TypeError:
            pass
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
    return (text + "\n").encode("utf-8", "replace")
