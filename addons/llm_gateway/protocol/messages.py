"""Messages as JSON or as SSE events: a stream accumulated into its Message, and a Message sent as a stream.

Every part of the gateway that turns one form into the other goes through here (errors are protocol/errors.py,
token counts protocol/tokens.py), so the format is described once.
"""

from __future__ import annotations

from typing import Any

from llm_gateway.protocol import sse
from llm_gateway.protocol.errors import error_body
from llm_gateway.protocol.jsoncodec import dumps
from llm_gateway.protocol.partialjson import parse_partial_json
from llm_gateway.protocol.tokens import merge_delta_usage

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


# message_delta usage the API sends (and message_to_events repeats) besides output_tokens.
_DELTA_USAGE_SENT = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "server_tool_use")


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
        """Feed one SSE event, skipping what the SDK's stream skips: ping, empty data, and an event with
        neither a name nor a `type` in its data (`Event.kind`)."""
        name = event.kind
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
