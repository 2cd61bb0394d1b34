"""A fake Anthropic Messages API on 127.0.0.1, for end-to-end tests and benchmarks.

Stdlib only, and independent of the gateway (it is the oracle the gateway is checked against).

    with FakeUpstream() as fake:
        client = anthropic.Anthropic(base_url=fake.url, api_key="sk-ant-fake")
        client.messages.create(...)               # default answer: "Hello from the fake upstream"
        fake.script(Scenario.error(529))          # the next Messages request gets a native 529
        FakeUpstream(cache=CacheAccounting(ttl_5m=2))  # usage from an emulated prompt cache (short TTLs)
        fake.requests[-1].json["model"]           # everything received is recorded

A request can also pick its own answer with a header (it wins over the queue and does not consume it):

    x-fake-scenario: {"status": 429, "retry_after": 3}

Standalone: ``python tests/fakes/upstream.py --port 0`` prints ``listening on http://127.0.0.1:PORT``.

What a scenario can do is documented on :class:`Scenario`.
"""

from __future__ import annotations

import argparse
import base64
import copy
import dataclasses
import gzip as _gzip
import hashlib
import http.server
import itertools
import json
import re
import signal
import socket
import sys
import threading
import time
import zlib
from collections import deque
from typing import Any, Iterable, Iterator, Mapping

DEFAULT_TEXT = "Hello from the fake upstream"
DEFAULT_MODEL = "claude-sonnet-4-5-20250929"
# Distinct non-zero numbers, so that a test can tell the four token counts apart.
DEFAULT_USAGE: dict[str, Any] = {
    "input_tokens": 21,
    "cache_creation_input_tokens": 7,
    "cache_read_input_tokens": 13,
    "cache_creation": {"ephemeral_5m_input_tokens": 7, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 9,
    "service_tier": "standard",
}

# status -> the native error.type the real API uses for it
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
ERROR_MESSAGES: dict[str, str] = {
    "invalid_request_error": "messages: field required",
    "authentication_error": "invalid x-api-key",
    "billing_error": "Your credit balance is too low to access the Anthropic API.",
    "permission_error": "Your API key does not have permission to use the specified resource.",
    "not_found_error": "Not found",
    "conflict_error": "Conflict",
    "request_too_large": "Request exceeds the maximum allowed number of bytes.",
    "rate_limit_error": "Number of request tokens has exceeded your per-minute rate limit",
    "api_error": "Internal server error",
    "timeout_error": "Request timed out",
    "overloaded_error": "Overloaded",
}
SCENARIO_HEADER = "x-fake-scenario"
# A request with this header is answered without its body being parsed (the answer is the scenario's alone): a
# hostile-input test measures the proxy's cost, and parsing a 10 MB body here would stall the paced streams this
# same fake serves.
UNREAD_HEADER = "x-fake-unread"


def _error_type_for(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def native_error(error_type: str, message: str | None = None, request_id: str | None = None) -> dict:
    """The body of a native Anthropic error."""
    body: dict[str, Any] = {
        "type": "error",
        "error": {"type": error_type, "message": message if message is not None else ERROR_MESSAGES.get(error_type, error_type)},
    }
    if request_id:
        body["request_id"] = request_id
    return body


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# ---------------------------------------------------------------------------------------------- scenario
@dataclasses.dataclass
class Scenario:
    """One scripted answer. Every field is optional; the defaults give the default answer.

    What kind of answer (first that applies):
      hang            never answer (the connection stays open until the fake stops); for timeout tests
      body            a raw answer: ``status`` (default 200), ``headers`` and this body exactly (str, bytes, or a
                      dict/list sent as JSON), with ``content_type`` (default: JSON for dict/list, else text/plain).
                      Emulates LiteLLM envelopes, an HTML 502, a text/plain 503. ``body_b64`` is the same as bytes.
      status >= 400   a native error: ``error_type`` (default from the status), ``error_message``, ``request_id``.
      otherwise       a Message, served as JSON, or as SSE if the request had ``"stream": true`` (``stream`` forces
                      either way).

    The Message: ``content`` (a list of content blocks of any type: text, tool_use, thinking (+signature),
    redacted_thinking, server_tool_use, web_search_tool_result, ...), or ``text`` for one text block; ``usage``
    (merged over DEFAULT_USAGE; ``cache_creation`` follows ``cache_creation_input_tokens`` unless given);
    ``model`` (default: the request's), ``stop_reason`` (default end_turn, or tool_use if a tool_use block is
    present), ``stop_sequence``, ``message_id``; ``message`` is merged last over the whole Message.

    Headers: ``headers`` (a dict or a list of pairs) are added to any answer; ``request_id`` sets the
    ``request-id`` header (default: a fresh ``req_…``; "" sends none); ``retry_after``, ``retry_after_ms``,
    ``should_retry`` and ``ratelimit`` ({"requests-remaining": 0, ...} -> ``anthropic-ratelimit-requests-remaining``)
    are shortcuts for the retry headers.

    Streams: ``ping`` (send a ping after message_start), ``chunk_size`` (characters per text/thinking delta;
    default: one word per delta), ``json_chunk_size`` (characters per input_json_delta), ``delta_usage``
    ("full": message_delta carries all four token counts; "output": only output_tokens), ``burst`` (N text
    deltas of one word each), ``stream_bytes`` (a stream of about this many bytes, made on the fly; JSON answers
    are made on the fly too).

    Timing and failures: ``delay`` (seconds before the headers), ``event_delay`` (seconds between SSE events),
    ``error_after`` (after N events send ``event: error`` with ``stream_error`` (default overloaded_error) and end
    the body cleanly), ``truncate_after`` (after N events end the body cleanly, no message_stop), ``abort_after``
    (after N events, or for a JSON body after N bytes, close the socket mid-body), ``stall_after`` (after N
    events send nothing more, keeping the connection open until the fake stops; 0: stall right after the
    headers), ``gzip`` (Content-Encoding:
    gzip; SSE as a real streaming gzip, flushed after every event).
    """

    # kind
    hang: bool = False
    status: int | None = None
    body: Any = None
    body_b64: str | None = None
    content_type: str | None = None
    # native error
    error_type: str | None = None
    error_message: str | None = None
    # message
    content: list | None = None
    text: str | None = None
    usage: dict | None = None
    model: str | None = None
    stop_reason: str | None = None
    stop_sequence: str | None = None
    message_id: str | None = None
    message: dict | None = None
    stream: bool | None = None
    # headers
    headers: Any = None
    request_id: str | None = None
    retry_after: Any = None
    retry_after_ms: Any = None
    should_retry: bool | None = None
    ratelimit: dict | None = None
    # stream shape
    ping: bool = True
    chunk_size: int | None = None
    json_chunk_size: int = 12
    delta_usage: str = "full"
    burst: int | None = None
    stream_bytes: int | None = None
    # timing and failures
    delay: float = 0.0
    event_delay: float = 0.0
    error_after: int | None = None
    stream_error: dict | None = None
    truncate_after: int | None = None
    abort_after: int | None = None
    stall_after: int | None = None
    gzip: bool = False

    # -- constructors
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Scenario":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown scenario fields: {sorted(unknown)} (known: {sorted(names)})")
        return cls(**dict(d))

    @classmethod
    def coerce(cls, spec: "Scenario | Mapping[str, Any]") -> "Scenario":
        if isinstance(spec, Scenario):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        if dataclasses.is_dataclass(spec) and hasattr(spec, "to_dict"):
            # the same class imported twice (as fakes.upstream and tests.fakes.upstream)
            return cls.from_dict(json.loads(spec.to_header()))
        raise TypeError(f"a scenario is a Scenario or a dict, not {type(spec).__name__}")

    @classmethod
    def error(cls, status: int, error_type: str | None = None, message: str | None = None, **kw: Any) -> "Scenario":
        """A native Anthropic error."""
        return cls(status=status, error_type=error_type, error_message=message, **kw)

    @classmethod
    def raw(cls, status: int, body: Any, headers: Any = None, content_type: str | None = None, **kw: Any) -> "Scenario":
        """Exactly this status, headers and body."""
        return cls(status=status, body=body, headers=headers, content_type=content_type, **kw)

    @classmethod
    def reply(cls, *content: dict, usage: dict | None = None, **kw: Any) -> "Scenario":
        """A Message with these content blocks."""
        return cls(content=list(content), usage=usage, **kw)

    # -- serialization (for the x-fake-scenario header)
    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                out[f.name] = v
        if isinstance(out.get("body"), (bytes, bytearray)):
            out["body_b64"] = base64.b64encode(bytes(out.pop("body"))).decode()
        return out

    def to_header(self) -> str:
        """The value for an ``x-fake-scenario`` request header."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    # -- derived
    @property
    def kind(self) -> str:
        if self.hang:
            return "hang"
        if self.body is not None or self.body_b64 is not None:
            return "raw"
        if self.status is not None and self.status >= 400:
            return "error"
        return "message"


def litellm_wrapped_error(
    status: int,
    error_type: str | None = None,
    message: str | None = None,
    *,
    request_id: str = "req_011FakeWrapped000000001",
    stream: bool = False,
    **kw: Any,
) -> Scenario:
    """A LiteLLM (<= 1.91) pass-through error envelope around a native error, headers dropped.

    ``stream=True`` gives the form LiteLLM uses for streaming requests (the inner JSON as a Python bytes repr).
    """
    inner = _dumps(native_error(error_type or _error_type_for(status), message, request_id))
    text = repr(inner.encode()) if stream else inner
    body = {"error": {"message": text, "type": "None", "param": "None", "code": str(status)}}
    return Scenario(status=status, body=body, request_id="", **kw)


# ---------------------------------------------------------------------------------------------- messages
def _words(text: str) -> list[str]:
    parts = re.findall(r"\s*\S+|\s+", text)
    return parts or [text]


def _chunks(text: str, size: int | None) -> list[str]:
    if not text:
        return []
    if size is None:
        return _words(text)
    return [text[i : i + size] for i in range(0, len(text), size)]


def build_usage(spec_usage: Mapping[str, Any] | None) -> dict:
    usage = copy.deepcopy(DEFAULT_USAGE)
    if spec_usage:
        spec_usage = copy.deepcopy(dict(spec_usage))
        if "cache_creation_input_tokens" in spec_usage and "cache_creation" not in spec_usage:
            usage["cache_creation"] = {
                "ephemeral_5m_input_tokens": spec_usage["cache_creation_input_tokens"] or 0,
                "ephemeral_1h_input_tokens": 0,
            }
        usage.update(spec_usage)
    return usage


def build_message(spec: Scenario, request_json: Any, message_id: str) -> dict:
    model = spec.model
    if model is None and isinstance(request_json, dict) and isinstance(request_json.get("model"), str):
        model = request_json["model"]
    if spec.content is not None:
        content = copy.deepcopy(spec.content)
    else:
        content = [{"type": "text", "text": spec.text if spec.text is not None else DEFAULT_TEXT}]
    stop_reason = spec.stop_reason
    if stop_reason is None:
        stop_reason = "tool_use" if any(b.get("type") == "tool_use" for b in content) else "end_turn"
    msg = {
        "id": spec.message_id or message_id,
        "type": "message",
        "role": "assistant",
        "model": model or DEFAULT_MODEL,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": spec.stop_sequence,
        "usage": build_usage(spec.usage),
    }
    if spec.message:
        extra = copy.deepcopy(spec.message)
        if isinstance(extra.get("usage"), dict):
            msg["usage"].update(extra.pop("usage"))
        msg.update(extra)
    return msg


def _block_events(index: int, block: dict, spec: Scenario) -> Iterator[tuple[str, dict]]:
    btype = block.get("type")
    if btype == "text":
        start = {k: v for k, v in block.items() if k != "citations"}
        start["text"] = ""
        yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": start}
        for citation in block.get("citations") or []:
            yield "content_block_delta", {
                "type": "content_block_delta", "index": index,
                "delta": {"type": "citations_delta", "citation": citation},
            }
        for piece in _chunks(block.get("text", ""), spec.chunk_size):
            yield "content_block_delta", {
                "type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece},
            }
    elif btype in ("tool_use", "server_tool_use"):
        start = dict(block)
        start["input"] = {}
        yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": start}
        raw = _dumps(block.get("input", {}))
        pieces = [""] + ([] if raw == "{}" else _chunks(raw, spec.json_chunk_size))
        for piece in pieces:
            yield "content_block_delta", {
                "type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": piece},
            }
    elif btype == "thinking":
        start = dict(block)
        start["thinking"] = ""
        start["signature"] = ""
        yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": start}
        for piece in _chunks(block.get("thinking", ""), spec.chunk_size):
            yield "content_block_delta", {
                "type": "content_block_delta", "index": index, "delta": {"type": "thinking_delta", "thinking": piece},
            }
        if block.get("signature"):
            yield "content_block_delta", {
                "type": "content_block_delta", "index": index,
                "delta": {"type": "signature_delta", "signature": block["signature"]},
            }
    else:
        # redacted_thinking, web_search_tool_result and other server tool results arrive whole.
        yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
    yield "content_block_stop", {"type": "content_block_stop", "index": index}


def _message_start(msg: dict) -> dict:
    start = {k: v for k, v in msg.items() if k not in ("content", "usage")}
    start["content"] = []
    start["stop_reason"] = None
    start["stop_sequence"] = None
    start["usage"] = dict(msg["usage"])
    start["usage"]["output_tokens"] = 1
    return {"type": "message_start", "message": start}


def _message_delta(msg: dict, delta_usage: str) -> dict:
    usage = msg["usage"]
    if delta_usage == "output":
        du = {"output_tokens": usage.get("output_tokens")}
    else:
        du = {
            k: usage[k]
            for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens", "server_tool_use")
            if k in usage
        }
    return {
        "type": "message_delta",
        "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": msg.get("stop_sequence")},
        "usage": du,
    }


def message_to_events(msg: dict, spec: Scenario | None = None) -> Iterator[tuple[str, dict]]:
    """The SSE events (name, data) that stream this Message; the SDK accumulates them back to it."""
    spec = spec or Scenario()
    yield "message_start", _message_start(msg)
    if spec.ping:
        yield "ping", {"type": "ping"}
    for i, block in enumerate(msg["content"]):
        yield from _block_events(i, block, spec)
    yield "message_delta", _message_delta(msg, spec.delta_usage)
    yield "message_stop", {"type": "message_stop"}


def sse_frame(name: str, data: Any) -> bytes:
    payload = data if isinstance(data, str) else _dumps(data)
    return f"event: {name}\ndata: {payload}\n\n".encode()


_PATTERN = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\')


def _pattern_text(n: int, offset: int = 0) -> str:
    """n printable characters (no quote, no backslash) of a repeating pattern, starting at offset."""
    start = offset % len(_PATTERN)
    reps = (start + n) // len(_PATTERN) + 1
    return (_PATTERN * reps)[start : start + n]


# ---------------------------------------------------------------------------------------------- cache accounting
class CacheAccounting:
    """Anthropic's prompt-cache accounting, emulated: the fake remembers the prefixes it has cached, with TTLs.

    As the API documents it ("Prompt caching"): the prefix is model, tools, system, messages, block by block;
    each block carrying ``cache_control`` is a breakpoint ("5m" or "1h" TTL). A request reads the longest prefix
    cached at a block boundary reached from one of its breakpoints by looking back at most ``lookback`` blocks;
    it writes the prefix at each later breakpoint at least ``min_tokens`` long; a read refreshes that entry's TTL.
    ``cache_read_input_tokens`` is the read prefix, ``cache_creation_input_tokens`` the rest up to the last
    breakpoint written (split by TTL in ``cache_creation``), ``input_tokens`` everything after.

    Tokens are estimated as one per ``chars_per_token`` characters of a block's compact JSON (at least one).
    TTLs are in seconds; tests give short ones (``ttl_5m=1.5``). Memory holds at most ``max_entries`` prefixes.
    """

    def __init__(self, *, ttl_5m: float = 300.0, ttl_1h: float = 3600.0, min_tokens: int = 1024,
                 lookback: int = 20, chars_per_token: int = 4, max_entries: int = 10_000) -> None:
        self.ttl = {"5m": ttl_5m, "1h": ttl_1h}
        self.min_tokens = min_tokens
        self.lookback = lookback
        self.chars_per_token = chars_per_token
        self.max_entries = max_entries
        self._entries: dict[bytes, tuple[float, str]] = {}  # prefix hash -> (expires at, ttl name)
        self._lock = threading.Lock()

    @staticmethod
    def _blocks(request_json: Mapping[str, Any]) -> tuple[list[Any], int]:
        """The blocks in prefix order, and where the messages start."""
        def as_blocks(value: Any) -> list[Any]:
            return [{"type": "text", "text": value}] if isinstance(value, str) else list(value or [])

        blocks = list(request_json.get("tools") or [])
        blocks += as_blocks(request_json.get("system"))
        first_message = len(blocks)
        for message in request_json.get("messages") or []:
            blocks += as_blocks(message.get("content") if isinstance(message, dict) else None)
        return blocks, first_message

    def usage(self, request_json: Any, now: float | None = None) -> dict:
        """The four prompt token counts (and ``cache_creation``) the API would report for this request."""
        if not isinstance(request_json, Mapping):
            return {}
        now = time.monotonic() if now is None else now
        chain = hashlib.sha256(str(request_json.get("model")).encode())
        prefixes, totals, breakpoints, total = [], [], [], 0
        blocks, first_message = self._blocks(request_json)
        # thinking and tool_choice changes invalidate the cached messages, not tools or system (API docs)
        settings = json.dumps([request_json.get("thinking"), request_json.get("tool_choice")], sort_keys=True)
        for i, block in enumerate(blocks):
            if i == first_message:
                chain.update(settings.encode() + b"\x00")
            control = block.get("cache_control") if isinstance(block, dict) else None
            bare = {k: v for k, v in block.items() if k != "cache_control"} if isinstance(block, dict) else block
            text = json.dumps(bare, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            chain.update(text.encode("utf-8", "surrogatepass") + b"\x00")
            prefixes.append(chain.digest())
            total += max(1, -(-len(text) // self.chars_per_token))
            totals.append(total)
            if isinstance(control, dict):
                breakpoints.append((len(prefixes) - 1, "1h" if control.get("ttl") == "1h" else "5m"))
        with self._lock:
            for key in [k for k, (expires, _) in self._entries.items() if expires <= now]:
                del self._entries[key]
            read_at = -1
            for position, _ in breakpoints:
                for p in range(position, max(-1, position - self.lookback), -1):
                    if prefixes[p] in self._entries:
                        read_at = max(read_at, p)
                        break
            read = totals[read_at] if read_at >= 0 else 0
            if read_at >= 0:
                _, name = self._entries[prefixes[read_at]]
                self._entries[prefixes[read_at]] = (now + self.ttl[name], name)
            written, by_ttl, boundary = 0, {"5m": 0, "1h": 0}, read
            for position, name in breakpoints:
                if position > read_at and totals[position] >= self.min_tokens:
                    self._entries[prefixes[position]] = (now + self.ttl[name], name)
                    by_ttl[name] += totals[position] - boundary
                    boundary = totals[position]
                    written = boundary - read
            while len(self._entries) > self.max_entries:
                del self._entries[next(iter(self._entries))]
        return {
            "input_tokens": total - read - written,
            "cache_read_input_tokens": read,
            "cache_creation_input_tokens": written,
            "cache_creation": {"ephemeral_5m_input_tokens": by_ttl["5m"], "ephemeral_1h_input_tokens": by_ttl["1h"]},
        }

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# ---------------------------------------------------------------------------------------------- recording
class Headers:
    """A case-insensitive, read-only copy of request headers (keeps their order and first spelling)."""

    def __init__(self, items: Iterable[tuple[str, str]]):
        self._items = [(str(k), str(v)) for k, v in items]

    def get(self, name: str, default: str | None = None) -> str | None:
        low = name.lower()
        for k, v in self._items:
            if k.lower() == low:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        low = name.lower()
        return [v for k, v in self._items if k.lower() == low]

    def __getitem__(self, name: str) -> str:
        v = self.get(name)
        if v is None:
            raise KeyError(name)
        return v

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def keys(self) -> list[str]:
        return [k for k, _ in self._items]

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclasses.dataclass
class RecordedRequest:
    method: str
    path: str  # with the query string
    headers: Headers
    body: bytes
    json: Any  # the parsed JSON body, or None
    # what the fake answered (filled in as it answers)
    scenario: Scenario | None = None
    request_id: str | None = None
    status: int | None = None
    message: dict | None = None  # the Message served (for stream_bytes: text blocks hold "" instead of the text)
    bytes_sent: int = 0  # body bytes written (after content encoding)
    done: bool = False  # the answer was written completely (or deliberately cut)
    finished: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False, compare=False)

    def wait_finished(self, timeout: float = 10.0) -> bool:
        """Wait until the fake has finished answering this request (whatever the outcome)."""
        return self.finished.wait(timeout)

    @property
    def path_only(self) -> str:
        return self.path.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.path.split("?", 1)[1] if "?" in self.path else ""

    @property
    def stream(self) -> bool:
        return isinstance(self.json, dict) and self.json.get("stream") is True


# ---------------------------------------------------------------------------------------------- server
class _Abort(Exception):
    """Close the connection now, without finishing the body."""


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, addr, handler, fake: "FakeUpstream"):
        self.fake = fake
        super().__init__(addr, handler)

    def handle_error(self, request, client_address):  # quiet: clients hang up, tests stop us mid-answer
        if self.fake.verbose:
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-anthropic/1.0"
    disable_nagle_algorithm = True  # else each kept-alive answer waits ~40 ms for a delayed ACK

    def version_string(self) -> str:
        return self.server_version
    server: _Server

    # -- plumbing
    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.fake.verbose:
            sys.stderr.write("fake-upstream: " + (format % args) + "\n")

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_POST(self) -> None:
        self._serve()

    do_GET = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_POST

    def do_HEAD(self) -> None:
        self._serve(head=True)

    # -- dispatch
    def _serve(self, head: bool = False) -> None:
        fake = self.server.fake
        body = self._read_body()
        text_body = body
        if self.headers.get(UNREAD_HEADER):  # a test measuring a proxy's stall: this read would be measured too
            text_body = b""
        elif (self.headers.get("Content-Encoding") or "").lower() == "gzip":
            try:
                text_body = _gzip.decompress(body)
            except OSError:
                pass
        try:
            parsed = json.loads(text_body) if text_body else None
        except ValueError:
            parsed = None
        rec = RecordedRequest(
            method=self.command, path=self.path, headers=Headers(self.headers.items()), body=body, json=parsed
        )
        rec.request_id = fake._next_request_id()
        fake._record(rec)
        self._rec = rec
        self._head = head
        path = self.path.split("?", 1)[0].rstrip("/")
        is_messages = self.command == "POST" and path.endswith("/v1/messages")
        is_count = self.command == "POST" and path.endswith("/v1/messages/count_tokens")
        try:
            spec = None
            header = self.headers.get(SCENARIO_HEADER)
            if header is not None:  # on another path only a raw or error scenario answers (else 404)
                try:
                    spec = Scenario.coerce(json.loads(header))
                except (ValueError, TypeError) as e:
                    self._send_simple(500, f"fake upstream: bad {SCENARIO_HEADER} header: {e}\n".encode(), "text/plain")
                    return
            elif is_messages:
                spec = fake._pop_script()
            spec = spec or Scenario()
            rec.scenario = spec
            if spec.delay:
                fake._sleep(spec.delay)
            if spec.kind == "hang":
                fake._stopping.wait()
                raise _Abort
            if not (is_messages or is_count) and spec.kind not in ("raw", "error"):
                self._send_error_spec(Scenario.error(404, message=f"Not found: {self.command} {path or '/'}"))
            elif spec.kind == "raw":
                self._send_raw(spec)
            elif spec.kind == "error":
                self._send_error_spec(spec)
            elif is_count:
                usage = build_usage(spec.usage)
                self._send_json(spec, 200, {"input_tokens": usage["input_tokens"]})
            else:
                self._send_message(spec, parsed)
            rec.done = True
        except _Abort:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
        finally:
            rec.finished.set()

    # -- headers
    def _start(self, status: int, headers: list[tuple[str, str]], spec: Scenario | None) -> None:
        self.send_response(status)
        rid = self._rec.request_id if spec is None or spec.request_id is None else spec.request_id
        self._rec.status = status
        self._rec.request_id = rid or None
        all_headers = list(headers)
        if rid:
            all_headers.append(("request-id", rid))
        if spec is not None:
            if spec.retry_after is not None:
                all_headers.append(("retry-after", str(spec.retry_after)))
            if spec.retry_after_ms is not None:
                all_headers.append(("retry-after-ms", str(spec.retry_after_ms)))
            if spec.should_retry is not None:
                all_headers.append(("x-should-retry", "true" if spec.should_retry else "false"))
            for k, v in (spec.ratelimit or {}).items():
                all_headers.append((f"anthropic-ratelimit-{k}", str(v)))
            extra = spec.headers or []
            if isinstance(extra, Mapping):
                extra = list(extra.items())
            all_headers.extend((str(k), str(v)) for k, v in extra)
        for k, v in all_headers:
            self.send_header(k, v)
        self.end_headers()

    def _write(self, data: bytes) -> None:
        if data and not self._head:
            self.wfile.write(data)
            self._rec.bytes_sent += len(data)

    def _send_body(self, status: int, headers: list[tuple[str, str]], body: bytes, spec: Scenario | None) -> None:
        if spec is not None and spec.gzip:
            body = _gzip.compress(body)
            headers = headers + [("Content-Encoding", "gzip")]
        names = {k.lower() for k, _ in headers}
        if spec is not None and isinstance(spec.headers, Mapping):
            names |= {k.lower() for k in spec.headers}
        elif spec is not None and spec.headers:
            names |= {str(k).lower() for k, _ in spec.headers}
        if "content-length" not in names and "transfer-encoding" not in names:
            headers = headers + [("Content-Length", str(len(body)))]
        self._start(status, headers, spec)
        if spec is not None and spec.abort_after is not None and spec.abort_after < len(body):
            self._write(body[: spec.abort_after])
            raise _Abort
        self._write(body)

    def _send_simple(self, status: int, body: bytes, content_type: str) -> None:
        self._send_body(status, [("Content-Type", content_type)], body, None)

    def _send_json(self, spec: Scenario, status: int, obj: Any) -> None:
        self._send_body(status, [("Content-Type", "application/json")], _dumps(obj).encode(), spec)

    def _send_error_spec(self, spec: Scenario) -> None:
        status = spec.status or 500
        etype = spec.error_type or _error_type_for(status)
        rid = self._rec.request_id if spec.request_id is None else spec.request_id
        self._send_json(spec, status, native_error(etype, spec.error_message, rid))

    def _send_raw(self, spec: Scenario) -> None:
        body = spec.body
        if spec.body_b64 is not None:
            body = base64.b64decode(spec.body_b64)
        if isinstance(body, (dict, list)):
            data, ctype = _dumps(body).encode(), "application/json"
        elif isinstance(body, str):
            data, ctype = body.encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = bytes(body), "application/octet-stream"
        headers = [] if spec.content_type == "" else [("Content-Type", spec.content_type or ctype)]
        spec_names = {k.lower() for k in (spec.headers.keys() if isinstance(spec.headers, Mapping) else [k for k, _ in spec.headers or []])}
        if "content-type" in spec_names:
            headers = []
        self._send_body(spec.status or 200, headers, data, spec)

    # -- messages
    def _send_message(self, spec: Scenario, request_json: Any) -> None:
        fake = self.server.fake
        if fake.cache is not None:  # the emulated cache decides the prompt token counts; a scenario's usage wins
            spec = dataclasses.replace(spec, usage={**fake.cache.usage(request_json), **(spec.usage or {})})
        msg = build_message(spec, request_json, fake._next_message_id())
        wants_stream = isinstance(request_json, dict) and request_json.get("stream") is True
        stream = wants_stream if spec.stream is None else spec.stream
        if spec.burst is not None:
            # one word per delta: "w0", " w1", " w2", ...
            msg["content"] = [{"type": "text", "text": "w0" + "".join(f" w{i}" for i in range(1, spec.burst))}]
            msg["usage"]["output_tokens"] = spec.burst if not spec.usage or "output_tokens" not in spec.usage else spec.usage["output_tokens"]
            spec = dataclasses.replace(spec, chunk_size=None)
        if spec.stream_bytes is not None:
            self._send_sized(spec, msg, stream)
            return
        fake._set_last(self._rec, msg)
        if stream:
            self._send_events(spec, message_to_events(msg, spec))
        else:
            self._send_json(spec, 200, msg)

    def _stream_start(self, spec: Scenario, content_type: str) -> "_ChunkWriter":
        headers = [("Content-Type", content_type), ("Transfer-Encoding", "chunked")]
        if content_type.startswith("text/event-stream"):
            headers.append(("Cache-Control", "no-cache"))
        if spec.gzip:
            headers.append(("Content-Encoding", "gzip"))
        self._start(200, headers, spec)
        return _ChunkWriter(self, spec.gzip)

    def _send_events(self, spec: Scenario, events: Iterable[tuple[str, Any]]) -> None:
        fake = self.server.fake
        out = self._stream_start(spec, "text/event-stream; charset=utf-8")
        n = 0
        for name, data in events:
            if spec.abort_after is not None and n >= spec.abort_after:
                raise _Abort
            if spec.stall_after is not None and n >= spec.stall_after:
                self.wfile.flush()
                fake._stopping.wait()
                raise _Abort
            if spec.truncate_after is not None and n >= spec.truncate_after:
                break
            if spec.error_after is not None and n >= spec.error_after:
                err = spec.stream_error or {"type": "overloaded_error", "message": "Overloaded"}
                if "type" in err and "error" not in err:
                    err = {"type": "error", "error": err, "request_id": self._rec.request_id}
                out.write(sse_frame("error", err))
                break
            if n and spec.event_delay:
                fake._sleep(spec.event_delay)
            out.write(sse_frame(name, data))
            n += 1
        out.close()

    def _send_sized(self, spec: Scenario, msg: dict, stream: bool) -> None:
        """A response of about ``stream_bytes`` bytes, made on the fly."""
        total = int(spec.stream_bytes or 0)
        piece = max(16, spec.chunk_size or 1024)
        if stream:
            overhead = len(sse_frame("content_block_delta", {
                "type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ""}}))
            fixed = 1500  # message_start, ping, block start/stop, message_delta, message_stop
            n_deltas = max(1, (total - fixed) // (piece + overhead))
        else:
            n_deltas = max(1, (total - 600) // piece)
        msg["content"] = [{"type": "text", "text": ""}]
        if not spec.usage or "output_tokens" not in spec.usage:
            msg["usage"]["output_tokens"] = n_deltas
        self.server.fake._set_last(self._rec, msg)
        if stream:
            def events() -> Iterator[tuple[str, Any]]:
                yield "message_start", _message_start(msg)
                if spec.ping:
                    yield "ping", {"type": "ping"}
                yield "content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
                for i in range(n_deltas):
                    yield "content_block_delta", {
                        "type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": _pattern_text(piece, i * piece)},
                    }
                yield "content_block_stop", {"type": "content_block_stop", "index": 0}
                yield "message_delta", _message_delta(msg, spec.delta_usage)
                yield "message_stop", {"type": "message_stop"}

            self._send_events(spec, events())
        else:
            marker = "\x00TEXT\x00"
            msg["content"][0]["text"] = marker
            prefix, suffix = _dumps(msg).split(_dumps(marker)[1:-1], 1)
            out = self._stream_start(spec, "application/json")
            out.write(prefix.encode())
            for i in range(n_deltas):
                out.write(_pattern_text(piece, i * piece).encode())
            out.write(suffix.encode())
            out.close()
            msg["content"][0]["text"] = ""


class _ChunkWriter:
    """Writes a chunked body, optionally as a streaming gzip flushed after every write."""

    def __init__(self, handler: _Handler, gz: bool):
        self.h = handler
        self.z = zlib.compressobj(6, zlib.DEFLATED, 31) if gz else None

    def _chunk(self, data: bytes) -> None:
        if data:
            self.h._write(b"%x\r\n" % len(data) + data + b"\r\n")

    def write(self, data: bytes) -> None:
        if self.z is not None:
            data = self.z.compress(data) + self.z.flush(zlib.Z_SYNC_FLUSH)
        self._chunk(data)

    def close(self) -> None:
        if self.z is not None:
            self._chunk(self.z.flush(zlib.Z_FINISH))
        self.h._write(b"0\r\n\r\n")


class FakeUpstream:
    """A fake api.anthropic.com on 127.0.0.1. See the module docstring and :class:`Scenario`."""

    def __init__(self, port: int = 0, *, host: str = "127.0.0.1", verbose: bool = False,
                 cache: CacheAccounting | None = None):
        self.host = host
        self.cache = cache  # None: fixed usage numbers (DEFAULT_USAGE); else Anthropic's cache accounting
        self._port = port
        self.verbose = verbose
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._queue: deque[Scenario] = deque()
        self._last: RecordedRequest | None = None
        self._request_ids = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._changed = threading.Condition(self._lock)

    # -- lifecycle
    def start(self) -> "FakeUpstream":
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server((self.host, self._port), _Handler, self)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"fake-upstream:{self._port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeUpstream":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    # -- scripting
    def script(self, *responses: "Scenario | Mapping[str, Any]") -> None:
        """Queue answers for the next Messages requests, first in first out."""
        specs = [Scenario.coerce(r) for r in responses]
        with self._lock:
            self._queue.extend(specs)

    @property
    def pending(self) -> int:
        """How many scripted answers are still queued."""
        with self._lock:
            return len(self._queue)

    def clear(self) -> None:
        """Forget the recorded requests, the last message and any queued answers."""
        with self._lock:
            self._requests.clear()
            self._queue.clear()
            self._last = None

    # -- inspection
    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, in order."""
        with self._lock:
            return list(self._requests)

    def messages_requests(self) -> list[RecordedRequest]:
        """The POST …/v1/messages requests (not count_tokens)."""
        return [r for r in self.requests if r.method == "POST" and r.path_only.rstrip("/").endswith("/v1/messages")]

    @property
    def last_message(self) -> dict | None:
        """The Message served for the most recent Messages request that got one."""
        with self._lock:
            return copy.deepcopy(self._last.message) if self._last is not None else None

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> list[RecordedRequest]:
        """Wait until at least n requests have arrived; return them (raises TimeoutError)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"fake upstream: {len(self._requests)} of {n} requests after {timeout}s")
                self._changed.wait(left)
            return list(self._requests)

    # -- used by the handler
    def _record(self, rec: RecordedRequest) -> None:
        with self._changed:
            self._requests.append(rec)
            self._changed.notify_all()

    def _pop_script(self) -> Scenario | None:
        with self._lock:
            return self._queue.popleft() if self._queue else None

    def _set_last(self, rec: RecordedRequest, msg: dict) -> None:
        with self._lock:
            rec.message = msg
            self._last = rec

    def _next_request_id(self) -> str:
        return f"req_011Fake{next(self._request_ids):015d}"

    def _next_message_id(self) -> str:
        return f"msg_011Fake{next(self._message_ids):015d}"

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def _sleep(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise _Abort


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="A fake Anthropic Messages API on 127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port)")
    ap.add_argument("--verbose", action="store_true", help="log every request to stderr")
    ap.add_argument("--cache-ttl-5m", type=float, metavar="SECONDS",
                    help="emulate the prompt cache (CacheAccounting), its '5m' entries living this long")
    args = ap.parse_args(argv)
    cache = CacheAccounting(ttl_5m=args.cache_ttl_5m) if args.cache_ttl_5m is not None else None
    fake = FakeUpstream(args.port, verbose=args.verbose, cache=cache).start()
    print(f"listening on {fake.url}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1):
        pass
    fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
