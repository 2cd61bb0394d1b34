"""Read a large request body without building it: only its small top-level fields become Python objects.

`json.loads` of a 30 MB Messages request holds the bytes, a decoded str of the same size and a tree of every
message block: together about three times the body, on top of mitmproxy's own copies. The gateway needs only the
top-level fields (`model`, `stream`, `metadata`, `system`, `tools`…), never the messages, so for a body over
`LEAN_ABOVE` bytes this scans the top-level object with two regular expressions (C speed, no tree), decodes
each top-level value of up to `KEEP_BELOW` bytes with `json.loads`, and only records where the others are.
The `stream` flag is then rewritten in place (`with_stream`) instead of re-serialising the whole body.
Skipped values are not validated: the upstream still refuses malformed JSON, as it would have anyway.
A large value is skipped a window at a time with bytes and regex calls (`_container_end`), not a Python step
per token: the body is read before anything else is, so its cost must not depend on how it is shaped.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llm_gateway.protocol.jsoncodec import parse_json_body

LEAN_ABOVE = 4 * 1024 * 1024  # bytes: smaller bodies are parsed whole, as before
KEEP_BELOW = 1024 * 1024  # bytes: top-level values up to this size are decoded in a lean body
# Top-level fields a lean body may have. Each is read in a Python step (about 12 µs: a 12 MB body of a million tiny
# fields held a worker thread, and the interpreter lock in turns, for 12 s). A Messages request has about twenty
# (Anthropic's API reference) and the API refuses unknown ones ("Extra inputs are not permitted"), so a body with
# more is refused, not read: returning "not JSON" would let it pass the model-based rules unread.
MAX_FIELDS = 1000


class TooManyFields(ValueError):
    """A lean body with more than MAX_FIELDS top-level fields."""

_WS = re.compile(rb"[ \t\r\n]*")
# Possessive (no backtracking: `[^"\\]` and `\\.` never start alike): twice as fast on escape-heavy text.
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"')
_TOKEN = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"|[\[\]{}]')  # strings are skipped whole, brackets counted
# From outside a string: as far as the bytes go without cutting a string (stops at a string the end cuts).
_UNCUT = re.compile(rb'(?:[^"]++|"[^"\\]*+(?:\\.[^"\\]*+)*+")*+')
_SCALAR = re.compile(rb"[^,}\]\s]+")
_OPEN, _CLOSE, _QUOTE = b"[{", b"]}", ord('"')


class LeanBody(dict):
    """The top-level object of a large body, less its large values (named in `omitted`).

    `spans` maps every top-level key to the (start, end) byte offsets of its value in the body."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: dict[str, tuple[int, int]] = {}
        self.omitted: set[str] = set()
        self.open_brace = 0

    def with_stream(self, content: bytes, stream: bool) -> bytes:
        """`content` (the body this was read from) with its top-level `stream` set to `stream`."""
        value = b"true" if stream else b"false"
        self["stream"] = stream
        if "stream" in self.spans:
            start, end = self.spans["stream"]
            return b"".join((content[:start], value, content[end:]))
        at = self.open_brace + 1
        return b"".join((content[:at], b'"stream":', value, b"," if self.spans else b"", content[at:]))


def _value_end(data: bytes, pos: int) -> int:
    """The end offset of the JSON value starting at `pos`; ValueError if there is none."""
    first = data[pos:pos + 1]
    if first == b'"':
        m = _STRING.match(data, pos)
        if m is None:
            raise ValueError("unterminated string")
        return m.end()
    if first and first in _OPEN:
        return _container_end(data, pos)
    m = _SCALAR.match(data, pos)
    if m is None:
        raise ValueError("no value")
    return m.end()


WINDOW = 16 * 1024  # bytes of a container judged per call at C speed: at most about 1 ms of interpreter lock
PASSES = 1024  # nesting levels a window is reduced through before it is walked token by token (orjson's limit)
_BRACKETS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def _container_end(data: bytes, pos: int) -> int:
    """The end of the array or object at `pos`, found a window at a time with bytes and regex calls rather than
    a Python step per token. A window ends before any string it would cut (`_UNCUT`); its strings are removed
    (`re.sub`), then every byte but the brackets (`translate`), which become "(" and ")", and matched pairs "()"
    are removed until none is left (one `replace` per nesting level). What remains, ")))(((", says where the
    window takes the depth; only the window where the depth may reach zero (or nested past PASSES) is walked
    token by token. Measured on 2 cores: a 10.5 MB body of empty objects took 2.5-3 s of Python steps (issue
    30: its worker thread took the interpreter lock from the event loop in 5 ms slices), now 0.07 s; 8 MB of
    20-deep nested arrays 3.5 s, now 0.6 s; 10 MB of empty strings 1.4 s, now 0.6 s; a 15 MB Messages body
    with long escaped strings 0.3 s, now 0.4 s (strings are read twice). Each C call reads at most a window
    (16 KiB: about 1 ms of lock for the slowest, a window of empty strings), so the lock changes hands often.
    Orjson was the other candidate (50 times faster than a Python walk) but holds the lock for its whole
    parse (tens of ms for 10 MB) and builds every object (3.5 million empty dicts: over 200 MB)."""
    depth, i, n = 1, pos + 1, len(data)
    while i < n:
        end = _UNCUT.match(data, i, min(i + WINDOW, n)).end()
        if end == i:  # a string longer than the window: skipped whole, it holds no bracket
            m = _STRING.match(data, i)
            if m is None:
                raise ValueError("unterminated string")
            i = m.end()
            continue
        window = data[i:end]
        if window.find(b'"') >= 0:
            window = _STRING.sub(b"", window)
        window = window.translate(_BRACKETS, _NOT_BRACKETS)
        for _ in range(PASSES):
            if window.find(b"()") < 0:
                break
            window = window.replace(b"()", b"")
        closes = window.count(b")")
        if closes < depth and window.find(b"()") < 0:  # the container goes on past this window
            depth += len(window) - 2 * closes
            i = end
            continue
        for m in _TOKEN.finditer(data, i):  # the end may be in this window: token by token
            if m.start() >= end:
                i = m.start()
                break
            c = data[m.start()]
            if c == _QUOTE:
                continue
            depth += 1 if c in _OPEN else -1
            if depth == 0:
                return m.end()
        else:
            raise ValueError("unterminated array or object")
    raise ValueError("unterminated array or object")


def parse(data: bytes) -> LeanBody | None:
    """The lean top-level object of `data`, or None if it is not a JSON object. Raises only TooManyFields."""
    try:
        body = LeanBody()
        i = _WS.match(data, 0).end()
        if data[i:i + 1] != b"{":
            return None
        body.open_brace = i
        i = _WS.match(data, i + 1).end()
        if data[i:i + 1] == b"}":
            return body if _WS.match(data, i + 1).end() == len(data) else None
        while True:
            m = _STRING.match(data, i)
            if m is None:
                return None
            key = json.loads(m.group())
            i = _WS.match(data, m.end()).end()
            if data[i:i + 1] != b":":
                return None
            start = _WS.match(data, i + 1).end()
            end = _value_end(data, start)
            body.spans[key] = (start, end)
            if len(body.spans) > MAX_FIELDS:
                raise TooManyFields(f"more than {MAX_FIELDS} top-level fields")
            if end - start <= KEEP_BELOW:
                body[key] = json.loads(data[start:end])
            else:
                body.omitted.add(key)
            i = _WS.match(data, end).end()
            separator = data[i:i + 1]
            if separator == b"}":
                return body if _WS.match(data, i + 1).end() == len(data) else None
            if separator != b",":
                return None
            i = _WS.match(data, i + 1).end()
    except TooManyFields:
        raise
    except (ValueError, RecursionError):
        return None


def parse_request_body(content: bytes | None, exact: bool = True) -> Any:
    """A request body as JSON (`jsoncodec.parse_json_body`, `exact` as there), lean (`LeanBody`) when over
    LEAN_ABOVE bytes."""
    if content and len(content) > LEAN_ABOVE:
        return parse(content)
    return parse_json_body(content, exact)
