"""A bound on the lines of HTTP/1 messages: a head that never ends no longer grows the process without bound.

mitmproxy 12's HTTP/1 layer appends every byte a peer sends to the connection's receive buffer and, while it
waits for a head, looks for the blank line that ends it (`Http1Server.read_headers`, `Http1Client.read_headers`
in proxy/layers/http/_http1.py); until that line comes it keeps everything, with no limit (its own comment:
`FIXME: protect against header size DoS`). A client that sends `GET / HTTP/1.1\\r\\nX: aaaa…` forever, or an
upstream whose answer head never ends, costs memory in proportion to what it sends, on both listeners and inside
CONNECT tunnels (the inner HTTP layer is the same class). mitmproxy has no option for it.

`install(bound)` puts wrappers in place of mitmproxy's methods on the classes (looked up when a connection enters
that state, so every connection from then on has them; `uninstall` puts mitmproxy's back). A wrapper costs one
`len()` per read; only when the buffer holds more than `bound.limit` bytes does it look for the line's end within
the first `limit` bytes (once: the head is then either taken by mitmproxy's reader or refused). Past the bound,
whether the bytes came in one read or many, what was received is dropped and:

- a request head (`Http1Server.read_headers`): the client gets `bound.refusal` (an `http.Response`: the gateway's
  native 431, written as it is) and the connection is closed; no flow exists yet, so no hook runs;
- an answer head (`Http1Client.read_headers`): the upstream connection is closed and the exchange gets a
  `ResponseProtocolError`, exactly as mitmproxy sends one for an answer head it cannot parse: the `error` hook
  runs and the client gets what it gets for any upstream failure (the gateway's native 502 for an API exchange);
- a client's next request head, sent while its last request is answered (HTTP/1 pipelining: mitmproxy holds it
  in `Http1Server.wait`): the answer under way leaves no room for a 431, so the connection is closed and the
  exchange ends as when its client goes away (`RequestProtocolError`, `CLIENT_DISCONNECTED`, as mitmproxy's own
  `wait` reports a close). A next head found within the bound is looked for once only;
- a chunked body's chunk-size line or trailers (lines h11's body reader waits to see whole, while mitmproxy holds
  everything behind them; `read_body` of both classes): the connection is closed; an answer's exchange gets the
  protocol error mitmproxy sends for a body it cannot parse (the client a 502), a request's ends as when its
  client goes away (it gets no answer). mitmproxy 12 then stops reading the client socket but may leave it open
  until the client closes it, as it does after its own body protocol errors.

Each time `bound.report(side, peer, received)` is called (side "request", "next request", "answer", "request
body" or "answer body"; `peer` an address, never the bytes) so the caller can log it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("llm_gateway")

# Where a head ends: h11's ReceiveBuffer.maybe_extract_lines looks for this (h11/_receivebuffer.py).
HEAD_END = re.compile(rb"\n\r?\n")
EMPTY_LINES = re.compile(rb"(?:\r?\n)+")  # before a head: skipped (h11's maybe_extract_lines skips one a call)


@dataclass(frozen=True)
class HeadBound:
    limit: int  # bytes: the longest head taken, request line or status line included
    refusal: Any  # the answer (mitmproxy's http.Response) a client whose request head is longer gets
    report: Callable[[str, str, int], None]  # (side, peer, bytes received): once per refused head


_bound: HeadBound | None = None
_refusal = b""  # _bound.refusal as HTTP/1 bytes, assembled once
_originals: dict[tuple[type, str], Any] = {}  # (class, method) -> mitmproxy's own while ours is installed


def too_long(buf: Any, limit: int) -> bool:
    """Whether the receive buffer `buf` (h11's ReceiveBuffer: `len`, `bytes`, `maybe_extract_at_most`) holds more
    than `limit` bytes and no whole head within the first `limit`.

    Empty lines before a head are dropped from `buf` first: RFC 9112 section 2.2 lets a reader skip them, and
    mitmproxy does, but one per read, so a peer sending empty lines faster than that would grow the buffer behind
    them without bound (or hide a head that never ends behind a few)."""
    if len(buf) <= limit:
        return False
    first = bytes(buf)[:limit]  # one copy of at most `limit` bytes, once per head over the limit
    while (empty := EMPTY_LINES.match(first)) is not None:
        buf.maybe_extract_at_most(empty.end())
        if len(buf) <= limit:
            return False
        first = bytes(buf)[:limit]
    return HEAD_END.search(first) is None


def _peer(address: Any) -> str:
    try:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    except (TypeError, IndexError):
        return "an unknown peer"


def _dropping(layer: Any) -> Callable[[Any], Any]:
    """A state for a refused connection's HTTP/1 layer: whatever still arrives before the close is dropped
    (mitmproxy appends every byte to the buffer before it asks the state, even in its `done` state)."""

    def dropped(event: Any) -> Any:
        if len(layer.buf):
            layer.buf = type(layer.buf)()
        yield from ()

    return dropped


def _refuse_request(self: Any, bound: HeadBound) -> Any:
    """Generator of mitmproxy commands: the refusal, then the connection closed (Http1Server)."""
    from mitmproxy.connection import ConnectionState
    from mitmproxy.proxy import commands

    received = len(self.buf)
    self.buf = type(self.buf)()  # what was held goes now, not when the connection object does
    self.state = _dropping(self)  # whatever still arrives before the close is not read as a head again
    if self.conn.state & ConnectionState.CAN_WRITE:
        yield commands.SendData(self.conn, _refusal)
    yield commands.CloseConnection(self.conn)
    bound.report("request", _peer(self.conn.peername), received)


def _refuse_answer(self: Any, bound: HeadBound) -> Any:
    """Generator of mitmproxy commands: the upstream closed, the exchange told it failed (Http1Client)."""
    from mitmproxy.proxy import commands
    from mitmproxy.proxy.layers.http import ErrorCode, ResponseProtocolError
    from mitmproxy.proxy.layers.http._base import ReceiveHttp

    received = len(self.buf)
    self.buf = type(self.buf)()
    self.state = _dropping(self)  # its close must not report the dropped bytes as an "unexpected server response"
    yield commands.CloseConnection(self.conn)
    yield ReceiveHttp(ResponseProtocolError(
        self.stream_id, f"the upstream's answer head is longer than {bound.limit} bytes",
        ErrorCode.GENERIC_SERVER_ERROR))
    bound.report("answer", _peer(self.conn.address), received)


def _refuse_pipelined(self: Any, bound: HeadBound) -> Any:
    """Generator of mitmproxy commands: a client that sent a next request head past the bound while its last
    request is being answered (Http1Server in its `wait` state; the answer under way leaves no room for a 431).
    The connection is closed and the exchange ends as when such a client goes away (mitmproxy's own `wait`)."""
    from mitmproxy.proxy import commands
    from mitmproxy.proxy.layers.http import ErrorCode, RequestProtocolError
    from mitmproxy.proxy.layers.http._base import ReceiveHttp

    received = len(self.buf)
    self.buf = type(self.buf)()
    self.state = _dropping(self)
    yield commands.CloseConnection(self.conn)
    yield ReceiveHttp(RequestProtocolError(
        self.stream_id, f"Client disconnected: its next request head, sent while this answer ran, is longer than "
        f"{bound.limit} bytes", ErrorCode.CLIENT_DISCONNECTED))
    bound.report("next request", _peer(self.conn.peername), received)


def _refuse_body_line(self: Any, bound: HeadBound) -> Any:
    """Generator of mitmproxy commands: a chunked body whose chunk-size line or trailers do not end within the
    bound (the body reader waits for the line's end and mitmproxy holds everything meanwhile). Ended as mitmproxy
    ends a body it cannot parse (`read_body` on an h11.ProtocolError): the connection closed, a protocol error
    for the exchange."""
    from mitmproxy.proxy import commands
    from mitmproxy.proxy.layers.http._base import ReceiveHttp

    from mitmproxy.proxy.layers.http import ErrorCode

    received = len(self.buf)
    self.buf = type(self.buf)()
    self.state = _dropping(self)
    yield commands.CloseConnection(self.conn)
    server = self.conn is self.context.client
    line = f"a chunk-size or trailer line longer than {bound.limit} bytes"
    if server:  # the client gets no answer: the exchange ends as when its client goes away (see `wait`)
        yield ReceiveHttp(self.ReceiveProtocolError(
            self.stream_id, f"Client disconnected: its chunked body has {line}", ErrorCode.CLIENT_DISCONNECTED))
    else:
        yield ReceiveHttp(self.ReceiveProtocolError(
            self.stream_id, f"HTTP/1 protocol error: {line}", ErrorCode.GENERIC_SERVER_ERROR))
    bound.report("request body" if server else "answer body",
                 _peer(self.conn.peername if server else self.conn.address), received)


def _wrap_body(original: Any) -> Any:
    def read_body(self: Any, event: Any) -> Any:
        from mitmproxy.proxy import events

        yield from original(self, event)
        bound = _bound
        # the reader took all it could: what is left waits for a line's end (chunk size, trailers)
        if (bound is not None and isinstance(event, events.DataReceived) and len(self.buf) > bound.limit
                and self.state == self.read_body):
            yield from _refuse_body_line(self, bound)

    read_body.__wrapped__ = original  # type: ignore[attr-defined]
    return read_body


def _wrap(original: Any, refuse: Callable[[Any, HeadBound], Any], needs_stream: bool) -> Any:
    def read_headers(self: Any, event: Any) -> Any:
        from mitmproxy.proxy import events

        bound = _bound
        self.gateway_next_head_seen = False  # a head is awaited again (see `wait`)
        if (bound is not None and isinstance(event, events.DataReceived) and len(self.buf) > bound.limit
                and (not needs_stream or self.stream_id is not None) and too_long(self.buf, bound.limit)):
            yield from refuse(self, bound)
            return
        yield from original(self, event)

    read_headers.__wrapped__ = original  # type: ignore[attr-defined]
    return read_headers


def _wrap_wait(original: Any) -> Any:
    def wait(self: Any, event: Any) -> Any:
        from mitmproxy.proxy import events

        bound = _bound
        if (bound is not None and isinstance(event, events.DataReceived) and len(self.buf) > bound.limit
                and not getattr(self, "gateway_next_head_seen", False)):
            if too_long(self.buf, bound.limit):
                yield from _refuse_pipelined(self, bound)
                return
            self.gateway_next_head_seen = True  # the rest is its body: not searched again until the next head
        yield from original(self, event)

    wait.__wrapped__ = original  # type: ignore[attr-defined]
    return wait


def install(bound: HeadBound) -> bool:
    """Bound heads from now on (the wrappers go in once per process; a later call changes only the bound).
    False if mitmproxy's HTTP/1 layer no longer has the methods this wraps: heads are then unbounded, as in
    bare mitmproxy."""
    global _bound, _refusal
    from mitmproxy.net.http import http1

    _bound, _refusal = bound, http1.assemble_response(bound.refusal)
    if _originals:
        return True
    try:
        from mitmproxy.proxy.layers.http import Http1Client, Http1Server

        server, client, wait = Http1Server.read_headers, Http1Client.read_headers, Http1Server.wait
        body = Http1Server.read_body
    except (ImportError, AttributeError) as e:
        logger.warning(f"cannot find mitmproxy's HTTP/1 head reader ({e}): request and answer heads are unbounded")
        _bound = None
        return False
    for cls, name in ((Http1Server, "read_headers"), (Http1Client, "read_headers"), (Http1Server, "wait"),
                      (Http1Server, "read_body"), (Http1Client, "read_body")):
        _originals[cls, name] = cls.__dict__.get(name)  # None: inherited (Http1Server's `wait` is its base's)
    Http1Server.read_headers = _wrap(server, _refuse_request, needs_stream=False)  # type: ignore[method-assign]
    # Http1Client: data before a request is mitmproxy's case ("Unexpected data from server"), left to it
    Http1Client.read_headers = _wrap(client, _refuse_answer, needs_stream=True)  # type: ignore[method-assign]
    # the next request's head, arriving while the last one is answered (HTTP/1 pipelining), is held in `wait`
    Http1Server.wait = _wrap_wait(wait)  # type: ignore[method-assign]
    # a chunked body's chunk-size line or trailers: lines too, held whole until they end
    Http1Server.read_body = Http1Client.read_body = _wrap_body(body)  # type: ignore[method-assign]
    return True


def uninstall() -> None:
    """mitmproxy's own head readers again (connections already reading a head keep the wrapper, now unbounded)."""
    global _bound
    _bound = None
    for (cls, name), original in _originals.items():
        if original is None:
            delattr(cls, name)
        else:
            setattr(cls, name, original)
    _originals.clear()


def installed() -> HeadBound | None:
    return _bound
