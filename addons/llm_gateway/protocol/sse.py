"""Server-Sent Events: the one incremental parser the gateway reads streams with, and the encoder.

The parser sits on the hot path of every streamed response, so it only looks for event boundaries
(`bytes.find`; a regex once a "\r" shows up; no per-byte Python loop) and keeps each event's exact
bytes: an event nobody changes is forwarded byte for byte. Fields are parsed on demand (the name for
every event, the data for the few that are read).

Invariant: every byte fed ends up in exactly one `Event.raw` (from `feed` or `flush`) or in `pending`.
That is why a block holding only comments or nothing (an extra blank line) is still an `Event`, with
`name` None and `data` "": dropping it would break byte-exact forwarding. Consumers read an event by
its `kind` (its name, else the `type` its JSON data states) and skip an event with neither.

Empty events come in runs: a run of blank lines and comment-only blocks that `feed` finds together is
one `Event` (one regex match, C speed), since such blocks dispatch nothing (WHATWG HTML, "Server-sent
events": a blank line with an empty data buffer dispatches no event; a line starting with ":" is ignored).
An upstream could otherwise send millions of them (a `\n` each), each a Python object and a pass through
every tap: about 9 µs each, seconds of event loop per megabyte (issue 30). Where a run is cut depends on
how the bytes arrive (a run never waits for more bytes); every other event is cut the same for any split.
"""

from __future__ import annotations

import re
from typing import Any

from llm_gateway.protocol import jsoncodec

# A line terminator followed by another one: the blank line that ends an event. The atomic groups keep
# "\r\n" one terminator (a regex would otherwise backtrack and read it as "\r" then "\n").
_EVENT_END = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
# A run of empty events: blank lines (at an event's start every "\r" and "\n" ends one), or comment lines
# (":…") and the blank line after them. Possessive (no backtracking): about 5 ns a blank line, 120 ns a
# comment-only event; the atomic-group form of the same rule took 200 ns a byte.
_EMPTY_RUN = re.compile(rb"(?:[\r\n]++|(?::[^\r\n]*+(?:\r\n?+|\n))++(?:\r\n?+|\n))++")
_CR, _LF, _COLON = 13, 10, 58
_UNSET: Any = object()
# Event names as they appear after `event:` (leading space included) -> the name; a stream has few.
_NAMES: dict[bytes, str | None] = {}
_NAMES_MAX = 256


class Event:
    """One event as received: `raw` bytes (with its terminating blank line), fields parsed lazily."""

    __slots__ = ("raw", "_name", "_data", "_json")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._name: str | None = _UNSET
        self._data: str = _UNSET
        self._json: Any = _UNSET

    def __repr__(self) -> str:
        return f"Event({self.raw!r})"

    @property
    def name(self) -> str | None:
        """The `event:` field (the last one wins); None when absent or empty, as the SDK reads it."""
        if self._name is _UNSET:
            raw = self.raw
            # Fast path for the API's own shape, `event: NAME\ndata: …`: read the first line only. Every
            # event of a stream asks this, so: `find` (faster than `in` on bytes), names decoded once.
            cr = raw.find(b"\r")
            if raw.startswith(b"event:") and raw.find(b"\nevent") < 0 and (cr < 0 or raw.find(b"\revent") < 0):
                end = raw.find(b"\n")
                if end < 0:
                    end = len(raw)
                value = raw[6 : cr if 0 <= cr < end else end]
                name = _NAMES.get(value, _UNSET) if type(value) is bytes else _UNSET
                if name is _UNSET:
                    name = (value[1:] if value[:1] == b" " else value).decode("utf-8", "replace") or None
                    if len(_NAMES) < _NAMES_MAX:
                        _NAMES[bytes(value)] = name
                self._name = name
            else:
                self._parse()
        return self._name

    @property
    def data(self) -> str:
        """The `data:` lines joined with "\\n" (UTF-8, invalid bytes replaced); "" when there are none."""
        if self._data is _UNSET:
            self._parse()
        return self._data

    @property
    def kind(self) -> str | None:
        """What the event is: its name, else the `type` its JSON data states. The SSE specification (WHATWG
        HTML, "Server-sent events") makes `event:` optional, and relays send data-only frames whose meaning is
        in the data (`data: {"type":"message_delta",…}`), as each Anthropic event's data also names it."""
        name = self.name
        if name is not None:
            return name
        data = self.json() if self.data.lstrip()[:1] == "{" else None
        kind = data.get("type") if isinstance(data, dict) else None
        return kind if isinstance(kind, str) and kind else None

    def json(self) -> Any:
        """`data` parsed as JSON (parsed once, then cached); None when it is not valid JSON."""
        if self._json is _UNSET:
            self._json = jsoncodec.loads(self.data)
        return self._json

    def _parse(self) -> None:
        name: bytes | None = None
        data: list[bytes] = []
        raw = self.raw
        if raw[:1] in _EMPTY_STARTS and _EMPTY_RUN.fullmatch(raw):  # a run of empty events: no Python loop
            self._name, self._data = None, ""
            return
        for line in _LINE_BREAK.split(raw) if b"\r" in raw else raw.split(b"\n"):
            if not line or line[0] == 0x3A:  # blank, or a ":" comment
                continue
            field, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if field == b"event":
                name = value
            elif field == b"data":
                data.append(value)
            # `id`, `retry` and unknown fields mean nothing to the gateway.
        self._name = name.decode("utf-8", "replace") or None if name is not None else None
        self._data = b"\n".join(data).decode("utf-8", "replace")


_EMPTY_STARTS = (b"\n", b"\r", b":")


class SSEParser:
    """Splits a byte stream, cut anywhere, into `Event`s. Never raises; holds back only a partial event."""

    __slots__ = ("_buf", "_scan", "_cr")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scan = 0  # where to resume looking for the end of the held-back event
        self._cr = False  # a "\r" was seen: line breaks need the full rule from now on

    @property
    def held(self) -> int:
        """How many bytes are held back (`len(pending)`, without copying them)."""
        return len(self._buf)

    @property
    def pending(self) -> bytes:
        """The bytes held back: the start of an event whose blank line has not arrived yet."""
        return bytes(self._buf)

    def feed(self, chunk: bytes) -> list[Event]:
        """The events that `chunk` completes, in order."""
        if self._buf or self._cr or type(chunk) is not bytes or chunk.find(b"\r") >= 0:
            return self._feed(chunk)
        # Nothing held and "\n" line breaks only: the API's own streams, mostly one event per chunk. The
        # events are slices of the chunk itself, and a chunk that is exactly one event is not copied at all.
        n = len(chunk)
        if chunk.find(b"\n\n") == n - 2 and n > 2 and chunk[0] != _LF:
            return [Event(chunk)]
        events: list[Event] = []
        start = 0
        while start < n:
            first = chunk[start]
            if (first == _LF or first == _COLON) and (m := _EMPTY_RUN.match(chunk, start)) is not None:
                end = m.end()  # a run of empty events: one event ("\n" only, so no "\r" to wait for)
            else:
                end = chunk.find(b"\n\n", start)
                if end < 0:
                    self._buf += chunk[start:]
                    self._scan = max(n - start - 3, 0)  # as `_feed` would resume
                    break
                end += 2
            events.append(Event(chunk[start:end]))
            start = end
        return events

    def _feed(self, chunk: bytes) -> list[Event]:
        buf = self._buf
        buf += chunk
        n = len(buf)
        events: list[Event] = []
        start = 0
        scan = self._scan
        while start < n:
            first = buf[start]
            if (first == _LF or first == _CR or first == _COLON) and start >= scan:
                end = self._empty_run(buf, start, n)
                if end > start:  # a run of empty events: one event
                    events.append(Event(bytes(buf[start:end])))
                    start = end
                    continue
            if first == _LF:  # an empty line right at the start: an event of its own
                end = start + 1
            elif first == _CR:
                if start + 1 == n:  # could be the first half of "\r\n"
                    break
                end = start + (2 if buf[start + 1] == _LF else 1)
            else:
                pos = max(scan, start)
                if not self._cr:
                    # "\n" line breaks only (the API's own): the first "\n\n" ends the event, memchr-fast.
                    end = buf.find(b"\n\n", pos)
                    self._cr = buf.find(b"\r", pos, n if end < 0 else end) >= 0
                    end = -1 if end < 0 else end + 2
                if self._cr:
                    m = _EVENT_END.search(buf, pos)
                    end = -1 if m is None else m.end()
                    if end == n and buf[end - 1] == _CR:  # a final "\r" may still become "\r\n"
                        scan = m.start()
                        break
                if end < 0:
                    # Next time, resume close to the end: a blank line needs at most 4 bytes.
                    scan = max(start, n - 3)
                    break
            events.append(Event(bytes(buf[start:end])))
            start = end
        if start:
            del buf[:start]
        self._scan = max(scan - start, 0)
        return events

    @staticmethod
    def _empty_run(buf: bytearray, start: int, n: int) -> int:
        """Where the run of empty events at `start` ends (`start`: none). Not resumed inside a held event
        (`start >= scan`), so a long held comment line is not scanned again on every feed. A run that ends
        with the buffer's last byte, a "\r", stops before that block: it may still become "\r\n"."""
        m = _EMPTY_RUN.match(buf, start)
        if m is None:
            return start
        end = m.end()
        if end == n and buf[n - 1] == _CR:
            m = _EMPTY_RUN.match(buf, start, n - 1)
            end = start if m is None else m.end()
        return end

    def flush(self) -> list[Event]:
        """At the end of the stream: the held-back bytes as a last event (no blank line came), if any."""
        if not self._buf:
            return []
        event = Event(bytes(self._buf))
        self._buf.clear()
        self._scan = 0
        return [event]


def encode(name: str, data: Any) -> bytes:
    """One event: `event: NAME`, then `data:` with compact JSON (a str or bytes is sent as it is)."""
    if isinstance(data, str):
        payload = data.encode("utf-8", "replace")
    elif isinstance(data, (bytes, bytearray)):
        payload = bytes(data)
    else:
        payload = jsoncodec.dumps(data)
    head = b"event: " + name.encode("utf-8", "replace") + b"\n"
    if b"\n" in payload or b"\r" in payload:  # JSON never has them; text must become several lines
        return head + b"".join(b"data: " + line + b"\n" for line in _LINE_BREAK.split(payload)) + b"\n"
    return head + b"data: " + payload + b"\n\n"


SSE_TYPE = "text/event-stream"
# Anthropic's keep-alive event, byte for byte as its API sends it after `message_start` and during silent gaps
# (Anthropic's streaming docs: "Event types": ping); clients ignore it, idle timeouts on the way see bytes.
PING = b'event: ping\ndata: {"type": "ping"}\n\n'
