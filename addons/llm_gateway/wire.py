"""The Anthropic Messages API wire format: errors, and Messages as JSON or as SSE events.

Every part of the gateway that reads or writes Anthropic bodies goes through here, so the format is
described once.
"""

from __future__ import annotations

import json
import re
from typing import Any

from . import sse

# Native error types and the HTTP status the API sends with each.
STATUS_BY_ERROR_TYPE: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "conflict_error": 409,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
ERROR_TYPE_BY_STATUS: dict[int, str] = {s: t for t, s in STATUS_BY_ERROR_TYPE.items()}


def status_for_error_type(error_type: str, default: int = 500) -> int:
    """The status the API sends with `error_type` (unknown types get `default`)."""
    return STATUS_BY_ERROR_TYPE.get(error_type, default)


def error_type_for_status(status: int) -> str:
    """The native error type for an HTTP status; the closest family where there is no exact one."""
    if status in ERROR_TYPE_BY_STATUS:
        return ERROR_TYPE_BY_STATUS[status]
    if status == 408:
        return "timeout_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "api_error"


def error_body(error_type: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    """A native error body: `{"type":"error","error":{"type":…,"message":…},"request_id":…}`."""
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type, "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


def error_json(error_type: str, message: str, request_id: str | None = None) -> bytes:
    """`error_body` serialised as the API does (compact JSON, UTF-8)."""
    return dumps(error_body(error_type, message, request_id))


def is_native_error(body: Any) -> bool:
    """True for a dict shaped like a native error body."""
    return (
        isinstance(body, dict)
        and body.get("type") == "error"
        and isinstance(body.get("error"), dict)
        and isinstance(body["error"].get("type"), str)
    )


def dumps(value: Any) -> bytes:
    """Compact JSON bytes, non-ASCII kept as UTF-8 (the API's own style).

    A lone surrogate (a client's `"\\ud83d"`, half an emoji) cannot be UTF-8: then the text is written
    with escapes, which is the same JSON value, instead of raising."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


# --- Messages as SSE streams -----------------------------------------------------------------------
#
# The reference is the Python SDK's stream accumulator (`anthropic/lib/streaming/_beta_messages.py`,
# `accumulate_event`): a stream turned into a Message must equal what it builds, and a Message turned
# into a stream must accumulate back to the same Message. The beta accumulator is followed because it
# is a superset of the plain one (Claude Code calls `/v1/messages?beta=true`); the extras only fire on
# things the plain API never sends (mcp_tool_use, compaction and fallback blocks, context_management).

# Blocks whose `input` streams as input_json_delta (the SDK's TRACKS_TOOL_INPUT). A tuple, not a set:
# `in` must not raise on an unhashable `type` from a malformed block.
TOOL_INPUT_BLOCKS = ("tool_use", "server_tool_use", "mcp_tool_use")

# message_delta usage fields that overwrite only when present and not null.
OPTIONAL_DELTA_USAGE = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "server_tool_use",
    "output_tokens_details",
    "iterations",
    "fallback_credit",
)

# message_delta usage the API sends (and message_to_events repeats) besides output_tokens.
_DELTA_USAGE_SENT = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "server_tool_use")


# The four token counts of a usage object, in the order records, reports and metrics show them. Cache reads
# and cache writes are not part of input_tokens.
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def token(usage: dict[str, Any] | None, key: str) -> int | None:
    """A token count from a usage object, or None where it is absent or not an integer."""
    value = usage.get(key) if usage else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def cache_write_split(usage: dict[str, Any] | None) -> tuple[int | None, int | None]:
    """(5-minute, 1-hour) cache-write tokens that add up to the final `cache_creation_input_tokens`.

    A stream's `message_delta` may raise the total without a split (message_start said 556 as 456 + 100,
    the end says 7345): the split is then stale. The 1-hour part is taken as reported (at most the total)
    and the rest is the 5-minute part, the API's default TTL; with no split at all every write is 5-minute.
    (None, None) where there is no total."""
    total = token(usage, "cache_creation_input_tokens")
    if total is None or total < 0:
        return None, None
    breakdown = usage.get("cache_creation") if isinstance(usage.get("cache_creation"), dict) else {}
    hour = min(max(token(breakdown, "ephemeral_1h_input_tokens") or 0, 0), total)
    return total - hour, hour


def full_price_prompt_tokens(usage: dict[str, Any] | None) -> int:
    """Prompt tokens not read from cache: `input_tokens` excludes cache reads and cache writes."""
    return (token(usage, "input_tokens") or 0) + (token(usage, "cache_creation_input_tokens") or 0)


def cache_share(usage: dict[str, Any] | None) -> float | None:
    """The share of prompt tokens read from cache, or None where there were no prompt tokens."""
    read = token(usage, "cache_read_input_tokens") or 0
    total = read + full_price_prompt_tokens(usage)
    return round(read / total, 4) if total else None


def merge_delta_usage(usage: dict[str, Any], delta_usage: dict[str, Any]) -> None:
    """Apply a message_delta's usage to `usage` in place.

    Its counts are cumulative totals, so they overwrite rather than add. `output_tokens` is always
    taken (the SDK takes it even when missing, as null); the optional ones are left out when not
    applicable, and then the message_start value must survive.
    """
    usage["output_tokens"] = delta_usage.get("output_tokens")
    for key in OPTIONAL_DELTA_USAGE:
        value = delta_usage.get(key)
        if value is not None:
            usage[key] = value


class MessageAccumulator:
    """Builds the Message a stream of events describes, as the SDK does, without ever raising.

    What it cannot apply (wrong types, missing fields, a bad index, events before message_start) is
    skipped and sets `malformed`. Text, thinking and tool input are collected as pieces and joined
    when read, so long streams stay linear.
    """

    def __init__(self) -> None:
        self._message: dict[str, Any] | None = None
        self.complete = False  # message_stop seen
        self.error: dict[str, Any] | None = None  # body of an `event: error`
        self.malformed = False
        self._pieces: dict[tuple[int, str], list[str]] = {}  # (block index, field) -> pieces
        self._unjoined: set[tuple[int, str]] = set()

    @property
    def message(self) -> dict[str, Any] | None:
        """The Message so far (the live dict: copy it before changing it)."""
        if self._unjoined:
            self._join()
        return self._message

    def feed_event(self, event: sse.Event) -> None:
        """Feed one SSE event, skipping what the SDK's stream skips: no name, ping, empty data."""
        name = event.name
        if name is None or name == "ping":
            return
        if name != "error" and not event.data:
            return
        data = event.json()
        if data is None:
            if name != "error":
                self.malformed = True  # not JSON: the SDK raises here
                return
            data = event.data  # an error that is not JSON: its text becomes the message
        self.feed(name, data)

    def feed(self, name: str | None, data: Any) -> None:
        """Apply one event, `data` being its parsed JSON. Dispatches on `data["type"]` as the SDK does."""
        if name is None or name == "ping":
            return
        kind = data.get("type") if isinstance(data, dict) else None
        if name == "error" or kind == "error":
            if not (isinstance(data, dict) and isinstance(data.get("error"), dict)):
                self.malformed = True
                data = error_body("api_error", data if isinstance(data, str) and data else "malformed error event")
            self.error = data
            return
        if not isinstance(kind, str):
            self.malformed = True
            return
        if kind == "message_start":
            self._message_start(data)
            return
        handler = self._HANDLERS.get(kind)
        if handler is None:
            return  # ping-like and future events: the SDK ignores them too
        if self._message is None:
            self.malformed = True  # the SDK skips everything before message_start
            return
        handler(self, data)

    def _message_start(self, data: dict[str, Any]) -> None:
        message = data.get("message")
        if self._message is not None or not isinstance(message, dict):
            self.malformed = True
            return
        message = dict(message)
        content = message.get("content")
        if not isinstance(content, list):
            self.malformed = True
            content = []
        message["content"] = [_own_block(block) for block in content]
        if isinstance(message.get("usage"), dict):
            message["usage"] = dict(message["usage"])
        self._message = message

    def _block_start(self, data: dict[str, Any]) -> None:
        block = data.get("content_block")
        if not isinstance(block, dict):
            self.malformed = True
            return
        content = self._message["content"]
        if data.get("index") != len(content):
            self.malformed = True  # the SDK appends regardless of the index; so do we
        content.append(_own_block(block))
        if block.get("type") == "fallback":
            # The block naming the model that served the answer relabels the Message (beta SDK).
            to = block.get("to")
            if isinstance(to, dict) and "model" in to:
                self._message["model"] = to["model"]
            else:
                self.malformed = True

    def _block_delta(self, data: dict[str, Any]) -> None:
        index = data.get("index")
        block = self._block(index)
        delta = data.get("delta")
        if block is None or not isinstance(delta, dict):
            self.malformed = True
            return
        kind, block_type = delta.get("type"), block.get("type")
        if kind == "text_delta":
            applies = block_type == "text" and self._add_piece(block, index, "text", delta.get("text"))
        elif kind == "thinking_delta":
            applies = block_type == "thinking" and self._add_piece(block, index, "thinking", delta.get("thinking"))
        elif kind == "input_json_delta":
            applies = block_type in TOOL_INPUT_BLOCKS and self._add_piece(
                block, index, "input", delta.get("partial_json")
            )
        elif kind == "signature_delta":
            applies = block_type == "thinking" and isinstance(delta.get("signature"), str)
            if applies:
                block["signature"] = delta["signature"]  # replaces
        elif kind == "citations_delta":
            citations = block.get("citations")
            applies = block_type == "text" and "citation" in delta and (not citations or isinstance(citations, list))
            if applies:
                if citations:
                    citations.append(delta["citation"])
                else:
                    block["citations"] = [delta["citation"]]
        elif kind == "compaction_delta":
            applies = block_type == "compaction"
            if applies:  # both replace, null when absent (beta SDK)
                block["content"] = delta.get("content")
                block["encrypted_content"] = delta.get("encrypted_content")
        else:
            applies = True  # a delta type from the future: ignored, like the SDK does
        if not applies:
            self.malformed = True

    def _block_stop(self, data: dict[str, Any]) -> None:
        if self._block(data.get("index")) is None:
            self.malformed = True
        elif self._unjoined:
            self._join()

    def _message_delta(self, data: dict[str, Any]) -> None:
        message = self._message
        delta = data.get("delta")
        if isinstance(delta, dict):
            message["stop_reason"] = delta.get("stop_reason")
            message["stop_sequence"] = delta.get("stop_sequence")
            message["stop_details"] = delta.get("stop_details")
            if delta.get("container") is not None:
                message["container"] = delta["container"]
        else:
            self.malformed = True
        for key in ("context_management", "input_transformations"):  # beta: on the event itself
            if data.get(key) is not None:
                message[key] = data[key]
        usage, delta_usage = message.get("usage"), data.get("usage")
        if usage is None:  # some proxies omit it in message_start; the delta's totals then stand alone
            usage = message["usage"] = {}
        if isinstance(usage, dict) and isinstance(delta_usage, dict):
            merge_delta_usage(usage, delta_usage)
        else:
            self.malformed = True

    def _message_stop(self, data: dict[str, Any]) -> None:
        self.complete = True

    _HANDLERS = {
        "content_block_start": _block_start,
        "content_block_delta": _block_delta,
        "content_block_stop": _block_stop,
        "message_delta": _message_delta,
        "message_stop": _message_stop,
    }

    def _block(self, index: Any) -> dict[str, Any] | None:
        content = self._message["content"]
        if type(index) is int and 0 <= index < len(content) and isinstance(content[index], dict):
            return content[index]
        return None

    def _add_piece(self, block: dict[str, Any], index: int, field: str, piece: Any) -> bool:
        if not isinstance(piece, str):
            return False
        key = (index, field)
        pieces = self._pieces.get(key)
        if pieces is None:
            if field != "input" and not isinstance(block.get(field), str):
                return False
            # Text grows from the block's start value; tool input is only the concatenated JSON.
            pieces = self._pieces[key] = [] if field == "input" else [block[field]]
        pieces.append(piece)
        self._unjoined.add(key)
        return True

    def _join(self) -> None:
        for index, field in self._unjoined:
            block = self._message["content"][index]
            text = "".join(self._pieces[index, field])
            if field != "input":
                block[field] = text
            elif text:  # only "" pieces: the SDK keeps the start block's input
                try:
                    block["input"] = parse_partial_json(text)
                except (ValueError, RecursionError):
                    self.malformed = True  # the SDK raises; keep the last input
        self._unjoined.clear()


def _own_block(block: Any) -> Any:
    """A copy of a block that the accumulator may change without touching the caller's event data."""
    if not isinstance(block, dict):
        return block
    block = dict(block)
    if isinstance(block.get("citations"), list):
        block["citations"] = list(block["citations"])
    return block


# Partial JSON, as the SDK reads tool input: jiter's `partial_mode=True`. A cut-off document keeps what
# is complete: open arrays and objects are closed, a value (string, number, literal, key) cut short is
# dropped. Only needed when a stream ends inside a tool input; complete JSON takes json.loads.
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_SCALAR = re.compile(
    r'"(?:[^"\\]|\\.)*"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null|NaN|-?Infinity',
    re.S,
)
_JSON_CUT_TOKEN = re.compile(r"[-+.0-9A-Za-z]*")  # what a number or literal cut by the end looks like
_CUT: Any = object()


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


def message_to_events(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The stream the API would send for `message`, as (event name, data) pairs.

    message_start carries the message with no content, null stop fields and the full usage; each block
    then streams as the API streams it (text and thinking as one delta each, tool input as one
    input_json_delta with its compact JSON, citations one delta each); blocks with nothing to stream
    arrive whole in content_block_start. message_delta sets the stop fields and repeats the usage.
    """
    usage = message.get("usage")
    start = dict(message, content=[], stop_reason=None, stop_sequence=None)
    for key in ("stop_details", "container"):  # sent in message_delta, like stop_reason
        if key in start:
            start[key] = None
    if isinstance(usage, dict):
        start["usage"] = dict(usage)
    events: list[tuple[str, dict[str, Any]]] = [("message_start", {"type": "message_start", "message": start})]

    content = message.get("content")
    for index, block in enumerate(content if isinstance(content, list) else []):
        first, deltas = _streamed_block(block)
        events.append(("content_block_start", {"type": "content_block_start", "index": index, "content_block": first}))
        events.extend(
            ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}) for delta in deltas
        )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))

    delta: dict[str, Any] = {"stop_reason": message.get("stop_reason"), "stop_sequence": message.get("stop_sequence")}
    if "stop_details" in message:
        delta["stop_details"] = message["stop_details"]
    if message.get("container") is not None:
        delta["container"] = message["container"]
    delta_usage: dict[str, Any] = {}
    if isinstance(usage, dict):
        delta_usage["output_tokens"] = usage.get("output_tokens")
        delta_usage.update((key, usage[key]) for key in _DELTA_USAGE_SENT if usage.get(key) is not None)
    events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": delta_usage}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def _streamed_block(block: Any) -> tuple[Any, list[dict[str, Any]]]:
    """A block's content_block_start value and its deltas. Only fields of the expected type stream;
    anything else stays in the start value, which the SDK copies as it is, so nothing is lost."""
    if not isinstance(block, dict):
        return block, []
    first, deltas = dict(block), []
    kind = block.get("type")
    if kind == "text":
        citations = block.get("citations")
        if isinstance(citations, list) and citations:
            first["citations"] = []
            deltas.extend({"type": "citations_delta", "citation": citation} for citation in citations)
        if isinstance(block.get("text"), str) and block["text"]:
            first["text"] = ""
            deltas.append({"type": "text_delta", "text": block["text"]})
    elif kind == "thinking":
        for field, delta_type in (("thinking", "thinking_delta"), ("signature", "signature_delta")):
            if isinstance(block.get(field), str) and block[field]:
                first[field] = ""
                deltas.append({"type": delta_type, field: block[field]})
    elif kind in TOOL_INPUT_BLOCKS and "input" in block:
        first["input"] = {}
        if block["input"] != {}:
            deltas.append({"type": "input_json_delta", "partial_json": dumps(block["input"]).decode()})
    return first, deltas


def message_to_sse(message: dict[str, Any]) -> bytes:
    """`message_to_events` encoded as an SSE body."""
    return b"".join(sse.encode(name, data) for name, data in message_to_events(message))


def message_from_sse(body: bytes) -> MessageAccumulator:
    """A whole SSE body parsed and accumulated (a last event without its blank line counts too)."""
    parser, acc = sse.SSEParser(), MessageAccumulator()
    for event in parser.feed(body) + parser.flush():
        acc.feed_event(event)
    return acc
