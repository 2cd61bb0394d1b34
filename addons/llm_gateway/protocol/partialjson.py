"""The value of a JSON text cut short (tool input when a stream stops at max_tokens), as the Anthropic
SDK's partial-JSON reader (jiter's partial mode) gives it.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Partial JSON, as the SDK reads tool input: jiter's `partial_mode=True`. A cut-off document keeps what
# is complete: open arrays and objects are closed, a value (string, number, literal, key) cut short is
# dropped. Only needed when a stream ends inside a tool input; complete JSON takes json.loads.
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


_JSON_SCALAR = re.compile(
    r'"(?:[^"\\]|\\.)*"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null|NaN|-?Infinity',
    re.S,
)


_JSON_CUT_TOKEN = re.compile(r"[-+.0-9A-Za-z]*")  # what a number or literal cut by the end looks like


def parse_partial_json(text: str) -> Any:
    """`text` as JSON, or if the text ends early, what the SDK's partial parser makes of it.

    Raises ValueError when nothing can be read (the SDK raises too). Like jiter, anything after the
    first complete value is ignored.
    """
    try:
        return json.loads(text)
    except ValueError:
        pass
    value, _ = _partial_value(text, 0)
    if value is _CUT:
        raise ValueError("JSON ends before its first value is complete")
    return value


def _partial_value(s: str, i: int) -> tuple[Any, int | None]:
    """The value at s[i:] and the index after it; None for the index when the text ended inside it."""
    n = len(s)
    i = _JSON_SPACE.match(s, i).end()
    if i == n:
        return _CUT, None
    if s[i] in "[{":
        return _partial_container(s, i)
    m = _JSON_SCALAR.match(s, i)
    if m and (m.end() == n or s[m.end()] in " \t\n\r,:]}"):
        return json.loads(m.group()), m.end()
    if s[i] == '"' or _JSON_CUT_TOKEN.fullmatch(s, i):
        return _CUT, None  # a string, number or literal the text ends inside
    raise ValueError(f"invalid JSON at {i}")


def _partial_container(s: str, i: int) -> tuple[Any, int | None]:
    n = len(s)
    is_object = s[i] == "{"
    container: Any = {} if is_object else []
    close = "}" if is_object else "]"
    i = _JSON_SPACE.match(s, i + 1).end()
    if i < n and s[i] == close:
        return container, i + 1
    while True:
        i = _JSON_SPACE.match(s, i).end()
        if i == n:
            return container, None
        if is_object:
            if s[i] != '"':
                raise ValueError(f"invalid JSON at {i}")
            key, i = _partial_value(s, i)
            if i is None:
                return container, None
            i = _JSON_SPACE.match(s, i).end()
            if i == n:
                return container, None
            if s[i] != ":":
                raise ValueError(f"invalid JSON at {i}")
            i += 1
        value, i = _partial_value(s, i)
        if value is not _CUT:
            if is_object:
                container[key] = value
            else:
                container.append(value)
        if i is None:
            return container, None
        i = _JSON_SPACE.match(s, i).end()
        if i == n:
            return container, None
        if s[i] == close:
            return container, i + 1
        if s[i] != ",":
            raise ValueError(f"invalid JSON at {i}")
        i += 1


_CUT: Any = object()
