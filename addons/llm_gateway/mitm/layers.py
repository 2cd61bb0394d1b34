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

`send_to_client` puts bytes into a stream under way the same way (one injected message, handled by the flow's
`HttpStream`): a translated Bedrock stream's `event: ping` during a silent gap (addons/translate.py).

`arm_failover` is the other way in: the same request sent to the next upstream when one fails before the first byte
of its answer (see its docstring).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from mitmproxy import ctx, http
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    GetHttpConnection,
    Http1Server,
    Http2Server,
    HttpLayer,
    HTTPMode,
    HttpResponseHeadersHook,
    HttpStream,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    ResponseTrailers,
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestTrailers,
    SendHttp,
)
from mitmproxy.proxy.utils import ReceiveBuffer

logger = logging.getLogger("llm_gateway.interrupt")

# What mitmproxy's HttpStream is doing, by the name of its server-side state.
WAITING, BUFFERING, STREAMING = "state_wait_for_response_headers", "state_consume_response_body", "state_stream_response_body"
_UPSTREAM_EVENTS = (ResponseHeaders, ResponseData, ResponseTrailers, ResponseEndOfMessage, ResponseProtocolError)


def _connection_handler(flow: http.HTTPFlow) -> Any:
    proxyserver = ctx.master.addons.get("proxyserver")
    return proxyserver.connections.get(flow.client_conn.id) if proxyserver else None


def find_stream(flow: http.HTTPFlow) -> HttpStream | None:
    """The HttpStream layer handling `flow`, searched from its client connection's layer stack; None if gone."""
    found = _find(flow)
    return found[1] if found else None


def _find(flow: http.HTTPFlow) -> tuple[HttpLayer, HttpStream] | None:
    """(the HttpLayer, the HttpStream) handling `flow`; None if gone."""
    handler = _connection_handler(flow)
    todo: list[Any] = [handler.layer] if handler is not None else []
    while todo:
        node = todo.pop()
        if isinstance(node, HttpLayer):
            for stream in node.streams.values():
                if getattr(stream, "flow", None) is flow:
                    return node, stream
            todo.extend(node.streams.values())
        # NextLayer.layer, tunnel and passthrough layers' child_layer; a mode layer (HttpProxy, the egress
        # listener's) hands its events to its child by making the child's `handle_event` its own `_handle_event`
        delegate = getattr(getattr(node, "_handle_event", None), "__self__", None)
        for child in (getattr(node, "layer", None), getattr(node, "child_layer", None), delegate):
            if isinstance(child, layer.Layer) and child is not node:
                todo.append(child)
    return None


def state_of(stream: HttpStream) -> str:
    return getattr(stream.server_state, "__name__", "")


def answer_instead_of_error_page(flow: http.HTTPFlow, answer: http.Response, after_head: bool = False) -> bool:
    """From the `error` hook of a flow the client got no response for: have the client's HTTP/1 connection write
    `answer` where mitmproxy would write its own text/html error page (its 502 for an upstream refused, reset or
    closed before answering), then close as mitmproxy would. `HttpStream.handle_protocol_error` sends the client
    a `ResponseProtocolError` right after the hook, which `Http1Server.send` writes as `make_error_response`;
    this wraps that `send` of the one connection (an instance attribute, as `_inject` does) for this stream's
    event only. An HTTP/2 client gets `answer` on its stream instead (`_answer_on_h2`), its other streams untouched.
    False where it cannot (an HTTP/3 client, the layers gone): mitmproxy's page goes out.
    `after_head`: also when the upstream's answer head came but nothing of it went to the client yet (a body that
    did not parse: mitmproxy's page would quote its bytes)."""
    try:
        found = _find(flow)
        if found is None or (flow.response is not None and not after_head):
            return False
        http_layer, stream = found
        server = http_layer.connections.get(flow.client_conn)
        if isinstance(server, Http2Server):
            _answer_on_h2(server, stream.stream_id, answer)
            return True
        if not isinstance(server, Http1Server) or server.response is not None:
            return False
        original, sid = server.send, stream.stream_id
        raw = http1.assemble_response(answer)

        def send(event: Any) -> layer.CommandGenerator[None]:
            server.send = original  # type: ignore[method-assign]  # one event, then mitmproxy's own again
            if (
                isinstance(event, ResponseProtocolError) and event.stream_id == sid and server.response is None
                and server.conn.state & ConnectionState.CAN_WRITE
            ):
                yield commands.SendData(server.conn, raw)
                yield commands.CloseConnection(server.conn)
                return
            yield from original(event)

        server.send = send  # type: ignore[method-assign]
        return True
    except Exception:  # mitmproxy internals changed under us: its own error page goes out
        logger.exception("cannot answer in place of mitmproxy's error page")
        return False


def _answer_on_h2(server: Http2Server, sid: int, answer: http.Response) -> None:
    """`answer` on an HTTP/2 client's stream `sid` where `Http2Connection._handle_event` would write its text/html
    page for a `ResponseProtocolError` (only while the stream has sent no headers, as there): written by mitmproxy's
    own writer as headers, data and end of stream (its h1-to-h2 header normalisation included); the connection and
    its other streams go on. The wrapper is an instance attribute, as `_inject`'s, and removes itself."""
    original = server._handle_event

    def handle(event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, ResponseProtocolError) and event.stream_id == sid:
            server._handle_event = original  # type: ignore[method-assign]  # one event, then mitmproxy's own
            h2_stream = server.h2_conn.streams.get(sid)
            if h2_stream is not None and server.is_open_for_us(sid) and not h2_stream.state_machine.headers_sent:
                yield from original(ResponseHeaders(sid, answer, end_stream=False))
                yield from original(ResponseData(sid, answer.content or b""))
                yield from original(ResponseEndOfMessage(sid))
                return
        yield from original(event)

    server._handle_event = handle  # type: ignore[method-assign]


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


def end_early(flow: http.HTTPFlow, answer: http.Response, on_streaming: Callable[[], bool]) -> str:
    """End `flow` now: `answer` if the client got no byte yet; mid-stream, `on_streaming()` is called to append
    its last bytes (the relay's error frame) and says whether it could (False: the stream is cut instead).

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
        elif on_streaming():
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
            stream.gateway_ended = True  # type: ignore[attr-defined]  # the answer is the gateway's: no failover
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


class _ClientBytes:
    """An injected message that asks the stream's handler to send `data` to the client."""

    def __init__(self, stream: HttpStream, data: bytes) -> None:
        self.stream, self.data = stream, data


def send_to_client(flow: http.HTTPFlow, data: bytes) -> bool:
    """Send `data` to the client of `flow`'s streamed answer, between two chunks of it, as if the stream callable
    had returned it; nothing when the stream is no longer under way (ended, or ended by the gateway) by the time
    the message is handled, or with an HTTP/2 upstream. The caller keeps `data` whole events: it arrives between the callable's outputs.
    Returns whether the message was injected (False: no stream under way). Never raises."""
    try:
        stream = find_stream(flow)
        # an HTTP/2 upstream: injected messages are routed by its connection, not to this stream (see `end_early`)
        if stream is None or not flow.live or state_of(stream) != STREAMING or flow.server_conn.alpn == b"h2":
            return False
        if not getattr(stream, "gateway_sends", False):  # wrapped once per stream, however many sends
            original = stream._handle_event

            def handle(event: events.Event) -> layer.CommandGenerator[None]:
                message = getattr(event, "message", None)
                if isinstance(event, events.MessageInjected) and isinstance(message, _ClientBytes):
                    if message.stream is stream and state_of(stream) == STREAMING and not getattr(stream, "gateway_ended", False):
                        if stream.context.options.store_streamed_bodies:
                            stream.response_body_buf += message.data
                        yield SendHttp(ResponseData(stream.stream_id, message.data), stream.context.client)
                    return
                yield from original(event)

            stream._handle_event = handle  # type: ignore[method-assign]  # as `_inject` does
            stream.gateway_sends = True  # type: ignore[attr-defined]
        ctx.master.addons.get("proxyserver").inject_event(events.MessageInjected(flow, _ClientBytes(stream, data)))
        return True
    except Exception:  # mitmproxy internals changed under us: no bytes, the stream goes on
        logger.exception("cannot send bytes into the stream")
        return False


class CappedBody(ReceiveBuffer):
    """mitmproxy's request body buffer, which drops everything once the body is over `limit` bytes."""

    def __init__(self, limit: int, refused: bool = False) -> None:
        super().__init__()
        self.limit = limit
        self.received = 0  # bytes, kept or not
        self.refused = refused

    def __iadd__(self, other: bytes) -> CappedBody:
        self.received += len(other)
        if not self.refused and self.received > self.limit:
            self.refused = True
            self.clear()
        if not self.refused:
            super().__iadd__(other)
        return self


def cap_request_body(flow: http.HTTPFlow, limit: int, refused: bool) -> CappedBody | None:
    """Swap the flow's request body buffer (nothing received yet) for a `CappedBody`; None where it cannot."""
    stream = find_stream(flow)
    if stream is None or len(stream.request_body_buf):
        return None
    stream.request_body_buf = capped = CappedBody(limit, refused)
    return capped


def buffered_response_bytes(flow: http.HTTPFlow) -> int | None:
    """How many bytes of a buffered answer body mitmproxy holds so far; None where the layer is gone."""
    stream = find_stream(flow)
    return len(stream.response_body_buf) if stream is not None else None


def _set_layer(nextlayer: layer.NextLayer, new: layer.Layer) -> None:
    # if another addon chose already, take its layer off the stack (a layer adds itself when it is made)
    old = nextlayer.layer
    if old is not None and old in nextlayer.context.layers and old is not new:
        nextlayer.context.layers.remove(old)
    nextlayer.layer = new


def decrypt_as_http(nextlayer: layer.NextLayer) -> None:
    """In the `next_layer` hook: the tunnel's plain bytes are read as HTTP (to answer them), never relayed raw."""
    _set_layer(nextlayer, layers.HttpLayer(nextlayer.context, HTTPMode.transparent))


def relay_untouched(nextlayer: layer.NextLayer) -> None:
    """In the `next_layer` hook: the tunnel's bytes are relayed as they are, not parsed."""
    _set_layer(nextlayer, layers.TCPLayer(nextlayer.context, ignore=True))


# ------------------------------------------------------------------------------------------------- failover


@dataclass
class GatewayFailoverHook(commands.StartHook):
    """Our own hook, `gateway_failover(flow)`: the flow's request goes to its next upstream; the addons that aim,
    translate and sign a request do it again for that upstream (the flow may be intercepted meanwhile: mitmproxy
    waits for `resume` as after any hook)."""

    flow: http.HTTPFlow
    name: ClassVar[str] = "gateway_failover"


class _Discard(layer.Layer):
    """Takes the place of a failed upstream connection's HTTP client layer: what that connection still says (its
    answer's body, its close) concerns an attempt that is over."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from ()


def arm_failover(flow: http.HTTPFlow, next_upstream: Callable[[str], bool], retryable: Callable[[int], bool]) -> bool:
    """Make `flow`'s HttpStream send the same request to the next upstream when this one fails before any byte of
    the answer reached the client: a connect failure, an answer whose status `retryable(status)` accepts (529, 5xx;
    decided on its headers, before the `responseheaders` hook, so no part of the gateway sees that answer), or the
    connection closed before the answer's headers. Each time `next_upstream(reason)` is asked: it records the
    failure and says whether there is a next upstream (False: mitmproxy goes on as without failover: its 502, or
    that answer passed on). Then the `gateway_failover` hook re-aims `flow.request` (the request body is buffered
    for API flows), and the stream connects and sends it again. An answer that began is never retried.

    How, in mitmproxy 12's proxy/layers/http/__init__.py: `HttpStream.state_consume_request_body` calls
    `self.make_server_connection()` after the `request` hook; on a failed `GetHttpConnection` that method answers
    the client through `handle_protocol_error` (the `error` hook, then mitmproxy's 502). An instance attribute takes
    its place here (as `_handle_event` does in `_inject`): on failure it asks for the next upstream and connects
    again. The answer's headers arrive as a `ResponseHeaders` event in `state_wait_for_response_headers`; the
    stream's `_handle_event` is wrapped to take a retryable one before that state sees it: the old connection is
    closed (its HTTP client layer swapped for `_Discard`, so its late events go nowhere), the request re-aimed and
    sent as `state_consume_request_body` sends it. A 5xx or an early close from an HTTP/2 upstream passes on as
    without failover (its connection carries other streams: never closed here); connect failures fail over always.

    Call it in the `request` hook (the stream waits there). Returns False where the stream cannot be found."""
    stream = find_stream(flow)
    if stream is None:
        return False
    original_handle = stream._handle_event
    retried = False  # the failed attempt's answer may still be queued (body, end): it goes nowhere

    def connect() -> layer.CommandGenerator[bool]:
        while True:
            request = flow.request
            connection, err = yield GetHttpConnection(
                (request.host, request.port), request.scheme == "https", flow.server_conn.via,
                flow.server_conn.transport_protocol)
            if not err:
                stream.context.server = flow.server_conn = connection
                return True
            if not next_upstream(f"connect failed: {err}"):
                yield from stream.handle_protocol_error(ResponseProtocolError(stream.stream_id, err, ErrorCode.CONNECT_FAILED))
                return False
            if (yield from reaim()):
                return False

    def reaim() -> layer.CommandGenerator[bool]:
        """The `gateway_failover` hook; True when an addon answered instead (then that answer is sent)."""
        yield GatewayFailoverHook(flow)
        if flow.response is None:
            return False
        flow.response.timestamp_start = time.time()  # as state_consume_request_body does for a hook's answer
        yield HttpResponseHeadersHook(flow)
        yield from stream.send_response()
        return True

    def resend(old: Any) -> layer.CommandGenerator[None]:
        nonlocal retried
        retried = True
        yield commands.CloseConnection(old)
        http_layer = stream.context.layers[stream.context.layers.index(stream) - 1]
        if isinstance(http_layer, HttpLayer) and old in http_layer.connections:
            http_layer.connections[old] = _Discard(stream.context)
        if (yield from reaim()):
            return
        if not (yield from stream.make_server_connection()):
            return
        request = flow.request  # as HttpStream.state_consume_request_body sends a buffered request
        content = request.raw_content
        yield SendHttp(RequestHeaders(stream.stream_id, request, not (content or request.trailers)), stream.context.server)
        if content:
            yield SendHttp(RequestData(stream.stream_id, content), stream.context.server)
        if request.trailers:
            yield SendHttp(RequestTrailers(stream.stream_id, request.trailers), stream.context.server)
        yield SendHttp(RequestEndOfMessage(stream.stream_id), stream.context.server)

    def handle(event: events.Event) -> layer.CommandGenerator[None]:
        state = state_of(stream)
        if retried and isinstance(event, (ResponseData, ResponseTrailers, ResponseEndOfMessage)) and state not in (BUFFERING, STREAMING):
            return  # the failed attempt's body, queued while the stream waited (a hook, the next connection)
        if state == WAITING and flow.server_conn.alpn != b"h2" and not getattr(stream, "gateway_ended", False):
            if isinstance(event, ResponseHeaders) and retryable(event.response.status_code):
                if next_upstream(f"HTTP {event.response.status_code}"):
                    yield from resend(flow.server_conn)
                    return
            elif isinstance(event, ResponseProtocolError) and event.code != ErrorCode.CONNECT_FAILED:
                if next_upstream(f"closed before answering: {event.message}"):
                    yield from resend(flow.server_conn)
                    return
        yield from original_handle(event)

    stream.make_server_connection = connect  # type: ignore[method-assign]
    stream._handle_event = handle  # type: ignore[method-assign]
    return True
