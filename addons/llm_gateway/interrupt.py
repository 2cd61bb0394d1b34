"""End a live exchange early, from outside its data path: the one place that reaches into mitmproxy's layers.

A timeout or a shutdown deadline fires while mitmproxy waits for the upstream, so no hook is running for the
flow and mitmproxy offers no API to answer it. Closing the upstream connection alone would make mitmproxy send
its own HTML 502 (before any byte) or cut the client connection (mid-stream) — a silent cut that a naive client
takes as a finished answer. Instead this finds the flow's `HttpStream` (the layer that owns the exchange) and
feeds it, through `proxyserver.inject_event` (the route mitmproxy itself uses to inject WebSocket messages), the
events an upstream would have sent:

- nothing sent to the client yet (waiting for headers, or a buffered body): a whole native error answer, which
  then passes the usual responseheaders/response hooks (so it is recorded like any answer);
- a stream under way: the end of the body, after the relay was told to append a native `event: error` frame.

The upstream connection is closed first; events the upstream still sends for this exchange are dropped.
An upstream spoken to over HTTP/2 (egress mode, a client that chose h2), or one still being connected to (TCP or
TLS handshake: the layer waits for it and queues what it is sent), cannot be addressed this way: there the upstream
connection is only closed, and mitmproxy answers (its 502) or cuts as it would for an upstream that failed.
Read from mitmproxy 12's proxy/layers/http/__init__.py (HttpStream states, HttpLayer's MessageInjected routing).
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import (
    HttpLayer,
    HttpStream,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    ResponseTrailers,
)

from . import relay, sse, wire

logger = logging.getLogger("llm_gateway.interrupt")

# What mitmproxy's HttpStream is doing, by the name of its server-side state.
WAITING, BUFFERING, STREAMING = "state_wait_for_response_headers", "state_consume_response_body", "state_stream_response_body"
_UPSTREAM_EVENTS = (ResponseHeaders, ResponseData, ResponseTrailers, ResponseEndOfMessage, ResponseProtocolError)


def native_answer(error_type: str, message: str, headers: dict[str, str] | None = None) -> http.Response:
    """A native Anthropic error response (JSON body, status from the error type)."""
    return http.Response.make(
        wire.status_for_error_type(error_type), wire.error_json(error_type, message),
        {"content-type": "application/json", **(headers or {})},
    )


def error_frame(error_type: str, message: str) -> bytes:
    """One `event: error` SSE frame, as the API sends it mid-stream."""
    return sse.encode("error", wire.error_body(error_type, message))


def _connection_handler(flow: http.HTTPFlow) -> Any:
    proxyserver = ctx.master.addons.get("proxyserver")
    return proxyserver.connections.get(flow.client_conn.id) if proxyserver else None


def find_stream(flow: http.HTTPFlow) -> HttpStream | None:
    """The HttpStream layer handling `flow`, searched from its client connection's layer stack; None if gone."""
    handler = _connection_handler(flow)
    todo: list[Any] = [handler.layer] if handler is not None else []
    while todo:
        node = todo.pop()
        if isinstance(node, HttpStream) and getattr(node, "flow", None) is flow:
            return node
        if isinstance(node, HttpLayer):
            todo.extend(node.streams.values())
        for attr in ("layer", "child_layer"):  # NextLayer.layer, tunnel and passthrough layers' child_layer
            child = getattr(node, attr, None)
            if isinstance(child, layer.Layer):
                todo.append(child)
    return None


def state_of(stream: HttpStream) -> str:
    return getattr(stream.server_state, "__name__", "")


def close_upstream(flow: http.HTTPFlow) -> None:
    """Close the flow's upstream connection (mitmproxy then answers or cuts as for a failed upstream)."""
    handler = _connection_handler(flow)
    if handler is None:
        return
    targets = [flow.server_conn]
    if flow.server_conn not in handler.transports:  # still being opened: the flow gets its connection once it is up
        address = (flow.request.host, flow.request.port)
        targets = [c for c in handler.transports if c is not handler.client and c.address == address and not c.tls_established]
    for connection in targets:
        io = handler.transports.get(connection)
        if io is not None and io.handler is not None:
            io.handler.cancel("ended by the gateway")


def end_early(flow: http.HTTPFlow, answer: http.Response, frame: bytes) -> str:
    """End `flow` now: `answer` if the client got no byte yet, else `frame` (an SSE event) appended to its stream.

    Returns what was done: "answered", "stream-ended", "closed" (only the upstream closed: HTTP/2 upstream or a
    body that is neither relayed nor buffered) or "gone" (the exchange already ended). Never raises.
    """
    try:
        stream = find_stream(flow)
        if stream is None or not flow.live:
            return "gone"
        state = state_of(stream)
        sid = stream.stream_id
        connecting = state == WAITING and stream._paused is not None  # connect or TLS handshake under way
        if connecting or flow.server_conn.alpn == b"h2" or state not in (WAITING, BUFFERING, STREAMING):
            close_upstream(flow)
            return "closed"
        body = answer.content or b""
        head = answer.copy()
        head.content = b""
        head.headers["content-length"] = str(len(body))
        if state == WAITING:
            head.timestamp_start = head.timestamp_end = None
            synthetic = [ResponseHeaders(sid, head, False), ResponseData(sid, body), ResponseEndOfMessage(sid)]
            done = "answered"
        elif state == BUFFERING:  # nothing went to the client: replace the answer under way
            stream.response_body_buf.clear()
            flow.response = head
            synthetic = [ResponseData(sid, body), ResponseEndOfMessage(sid)]
            done = "answered"
        elif (relayed := relay.of(flow)) is not None:
            relayed.interrupt(frame)
            synthetic = [ResponseEndOfMessage(sid)]
            done = "stream-ended"
        else:  # streamed untouched (an unknown encoding): bytes appended would corrupt it
            close_upstream(flow)
            return "closed"
        _inject(flow, stream, synthetic)
        return done
    except Exception:  # mitmproxy internals changed under us: fall back to closing the upstream
        logger.exception("cannot end the exchange cleanly; closing its upstream connection")
        close_upstream(flow)
        return "closed"


class _Token:
    """The injected message that tells our handler to run; identity only."""


def _inject(flow: http.HTTPFlow, stream: HttpStream, synthetic: list[events.Event]) -> None:
    original = stream._handle_event
    token = _Token()
    ended = False

    def handle(event: events.Event) -> layer.CommandGenerator[None]:
        nonlocal ended
        if isinstance(event, events.MessageInjected) and event.message is token:
            ended = True
            yield commands.CloseConnection(flow.server_conn)
            for synthetic_event in synthetic:
                yield from original(synthetic_event)
        elif ended and isinstance(event, _UPSTREAM_EVENTS):
            return  # the upstream's late bytes or its close: this exchange is over
        else:
            yield from original(event)

    # An instance attribute, as mitmproxy itself does when a stream turns into a passthrough.
    stream._handle_event = handle  # type: ignore[method-assign]
    ctx.master.addons.get("proxyserver").inject_event(events.MessageInjected(flow, token))
