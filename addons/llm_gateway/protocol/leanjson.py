"""Read a large request body without building it: only its small top-level fields become Python objects.

`json.loads` of a 30 MB Messages request holds the bytes, a decoded str of the same size and a tree of every
message block: together about three times the body, on top of mitmproxy's own copies. The gateway needs only the
top-level fields (`model`, `stream`, `metadata`, `system`, `tools`…), never the messages, so for a body over
`LEAN_ABOVE` bytes this scans the top-level object with two regular expressions (C speed, no tree), decodes
each top-level value of up to `KEEP_BELOW` bytes with `json.loads`, and only records where the others are.
The `stream` flag is then rewritten in place (`with_stream`) instead of re-serialising the whole body.
Skipped values are not validated: the upstream still refuses malformed JSON, as it would have anyway.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llm_gateway.protocol.jsoncodec import parse_json_body

LEAN_ABOVE = 4 * 1024 * 1024  # bytes: smaller bodies are parsed whole, as before
KEEP_BELOW = 1024 * 1024  # bytes: top-level values up to this size are decoded in a lean body

_WS = re.compile(rb"[ \t\r\n]*")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')  # strings are skipped whole, brackets counted
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
        depth = 0
        for m in _TOKEN.finditer(data, pos):
            c = data[m.start()]
            if c == _QUOTE:
                continue
            depth += 1 if c in _OPEN else -1
            if depth == 0:
                return m.end()
        raise ValueError("unterminated array or object")
    m = _SCALAR.match(data, pos)
    if m is None:
        raise ValueError("no value")
    return m.end()


def parse(data: bytes) -> LeanBody | None:
    """The lean top-level object of `data`, or None if it is not a JSON object. Never raises."""
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
    except (ValueError, RecursionError):
        return None


def parse_request_body(content: bytes | None, exact: bool = True) -> Any:
    """A request body as JSON (`jsoncodec.parse_json_body`, `exact` as there), lean (`LeanBody`) when over
    LEAN_ABOVE bytes."""
    if content and len(content) > LEAN_ABOVE:
        return parse(content)
    return parse_json_body(content, exact)
