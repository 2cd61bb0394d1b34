"""Stream preference: a client rule may force the upstream `stream` flag on or off, while the client
still gets exactly the form it asked for.

A JSON answer to a streaming request makes Claude Code send the whole request again without
streaming (the upstream is paid twice) and makes LiteLLM emit empty chunks, so whenever the upstream
form differs from the requested one the answer is converted faithfully: upstream SSE is accumulated
into the Message the Anthropic SDK would build, upstream JSON is replayed as a complete event stream.
Streams the client asked for pass through the relay unbuffered.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from . import exchange, leanjson, relay, wire
from .logsafe import clean

logger = logging.getLogger("llm_gateway.streams")

SSE_TYPE = "text/event-stream"


def takes_stream_flag(flow: http.HTTPFlow, ex: exchange.Exchange) -> bool:
    """Only Messages creation takes `stream` (not count_tokens, batches, …)."""
    return (
        flow.request.method == "POST"
        and flow.request.path.split("?", 1)[0].rstrip("/").endswith("/v1/messages")
        and isinstance(ex.body, dict)
    )


def is_sse(response: http.Response) -> bool:
    return response.headers.get("content-type", "").lower().startswith(SSE_TYPE)


def set_body(response: http.Response, content: bytes, content_type: str) -> None:
    """Replace a buffered body with identity-encoded content of another type."""
    response.headers.pop("content-encoding", None)
    response.headers["content-type"] = content_type
    response.content = content


def native_error(response: http.Response, ex: exchange.Exchange, error: dict, request_id: str | None) -> None:
    etype = error.get("type") if isinstance(error.get("type"), str) else "api_error"
    message = error.get("message") if isinstance(error.get("message"), str) else "upstream stream failed"
    response.status_code = wire.status_for_error_type(etype)
    response.reason = ""
    set_body(response, wire.error_json(etype, message, request_id), "application/json")
    ex.error_type = etype


class StreamPreference:
    def request(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or flow.response or not takes_stream_flag(flow, ex):
            return
        requested = ex.body.get("stream") is True
        ex.stream_requested = ex.stream_upstream = requested
        pref = ex.stream_preference
        wanted = {"on": True, "off": False}.get(pref, requested)
        if wanted != requested:
            if isinstance(ex.body, leanjson.LeanBody):  # a large body: only the flag changes, in place
                flow.request.content = ex.body.with_stream(flow.request.get_content(strict=False), wanted)
            else:
                ex.body["stream"] = wanted
                flow.request.content = wire.dumps(ex.body)
            ex.stream_upstream = wanted
            ex.notes.append(f"stream forced {pref} upstream")
        exchange.publish(flow, ex)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or not is_sse(flow.response):
            return
        if ex.stream_requested is False:
            return  # the client wants JSON: buffer the stream and convert it in `response`
        relay.install(flow, ex)

    def response(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or ex.stream_requested is None or flow.response.stream:
            return
        if ex.stream_requested == ex.stream_upstream:
            return
        try:
            if not ex.stream_requested and is_sse(flow.response):
                self.sse_to_json(flow, ex)
            elif ex.stream_requested and flow.response.status_code == 200 and not is_sse(flow.response):
                self.json_to_sse(flow, ex)
        except Exception:
            logger.exception(f"could not convert the answer for {clean(ex.client)}; passing it on unchanged")
        exchange.publish(flow, ex)

    def sse_to_json(self, flow: http.HTTPFlow, ex: exchange.Exchange) -> None:
        body = flow.response.get_content(strict=False) or b""
        acc = wire.message_from_sse(body)
        request_id = flow.response.headers.get("request-id")
        ex.converted = "sse->json"
        ex.complete = acc.complete
        if acc.error is not None:
            error = acc.error.get("error") if isinstance(acc.error.get("error"), dict) else {}
            native_error(flow.response, ex, error, acc.error.get("request_id") or request_id)
            ex.notes.append("stream error became an HTTP error")
        elif acc.message is None or not acc.complete:
            native_error(
                flow.response, ex,
                {"type": "api_error", "message": "upstream stream ended before message_stop"}, request_id,
            )
            ex.notes.append("truncated stream became an HTTP error")
        else:
            ex.message = acc.message
            set_body(flow.response, wire.dumps(acc.message), "application/json")
            ex.notes.append("SSE converted to JSON")

    def json_to_sse(self, flow: http.HTTPFlow, ex: exchange.Exchange) -> None:
        message = exchange.parse_json_body(flow.response.get_content(strict=False))
        if not (isinstance(message, dict) and message.get("type") == "message"):
            logger.warning(f"upstream answer is not a Message; passing it on unchanged ({clean(ex.host + ex.path)})")
            return
        ex.message = message
        ex.converted = "json->sse"
        set_body(flow.response, wire.message_to_sse(message), f"{SSE_TYPE}; charset=utf-8")
        ex.notes.append("JSON converted to SSE")

