"""The one reader of stream events, on every path that carries events (relay, replayed conversion)."""

from __future__ import annotations

from llm_gateway.pipeline import exchange
from llm_gateway.pipeline.answer import TRUNCATED_MESSAGE
from llm_gateway.protocol import envelopes, errors, sse, tokens


# The events of a Messages stream (Anthropic's API reference, "Streaming messages"): a data-only frame whose
# JSON `type` is one of these is that event.
ANTHROPIC_EVENTS = frozenset({
    "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
    "message_stop", "ping", "error",
})


class StreamReader:
    """The one reader of stream events, on every path that carries events (relay, replayed conversion).

    Reads `message_start` (usage, the model that answered; a `fallback` block names another), the cumulative
    `message_delta` usage,
    `message_stop`, and error frames: named `event: error` and LiteLLM's unnamed `data: {"error":…}`, which
    it replaces by the native error event (when `errors.unwrap` is on). A stream that ends with neither
    message_stop nor an error gets a native `api_error` event appended, so a cut answer is never taken as
    complete. What it finds goes on the exchange; it decides nothing else."""

    event_names = frozenset({"message_start", "content_block_start", "message_delta", "message_stop", "error", None})

    def __init__(self, ex: exchange.Exchange) -> None:
        self.ex = ex
        self.finished = False  # message_stop or an error seen

    def on_event(self, event: sse.Event) -> sse.Event | None:
        ex, renamed = self.ex, None
        name = event.name
        if name is None and (kind := event.kind) in ANTHROPIC_EVENTS:
            # A data-only frame (relays send them): its data says what it is. The client gets it named, as
            # the API sends it, since the SDKs dispatch on the name and would skip it.
            event = renamed = sse.Event(sse.encode(kind, event.data))
            name = kind
        if name == "message_start":
            data = event.json()
            message = data.get("message") if isinstance(data, dict) else None
            if isinstance(message, dict):
                if isinstance(message.get("usage"), dict):
                    ex.usage = dict(message["usage"])
                if isinstance(message.get("model"), str) and message["model"]:
                    ex.model_answered = message["model"]  # price and record the model that answered
                if isinstance(message.get("id"), str):
                    ex.response_id = message["id"][:200]
        elif name == "message_delta":
            data = event.json()
            if isinstance(data, dict) and isinstance(data.get("usage"), dict):
                if ex.usage is None:
                    ex.usage = {}
                tokens.merge_delta_usage(ex.usage, data["usage"], billed=True)
            delta = data.get("delta") if isinstance(data, dict) else None
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                ex.stop_reason = delta["stop_reason"][:200]
        elif name == "message_stop":
            self.finished = ex.complete = True
        elif name == "content_block_start":
            if b'"fallback"' in event.raw:  # the block naming the model that served the answer (beta)
                data = event.json()
                block = data.get("content_block") if isinstance(data, dict) else None
                to = block.get("to") if isinstance(block, dict) and block.get("type") == "fallback" else None
                if isinstance(to, dict) and isinstance(to.get("model"), str) and to["model"]:
                    ex.model_answered = to["model"]
        elif name == "error" or (name is None and '"error"' in event.data):
            return self._error(event) or renamed
        return renamed

    def _error(self, event: sse.Event) -> sse.Event | None:
        data, ex = event.json(), self.ex
        native = envelopes.unwrap_error_event(data) if ex.rules.errors.unwrap and isinstance(data, dict) else None
        if native is not None:
            ex.unwrapped, ex.unwrapped_from = True, "stream error event"
            ex.note("stream error event unwrapped")
        elif event.name is None:
            return None  # an unnamed frame that holds no error: not ours to judge
        found = native if native is not None else data
        self.finished = True
        if errors.is_native_error(found):
            ex.error_type = found["error"]["type"]
            ex.request_id = ex.request_id or errors.request_id_of(found)
        else:
            ex.error_type = "api_error"  # an error event that is not JSON: its text is the message
        ex.stop("stream error event")  # a part that ended the stream itself said why first
        return sse.Event(sse.encode("error", native)) if native is not None else None

    def on_end(self) -> bytes:
        if self.finished:
            return b""
        self.ex.error_type = "api_error"
        self.ex.stop("upstream stream ended before message_stop")
        self.ex.note("truncated stream: api_error appended")
        return sse.encode("error", errors.error_body("api_error", TRUNCATED_MESSAGE))
