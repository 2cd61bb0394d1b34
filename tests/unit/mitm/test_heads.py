"""mitm/heads.py: mitmproxy's own HTTP/1 layers (Http1Server, Http1Client) fed a head that does not end: past the
bound they refuse it (a request: the refusal, then the close; an answer: the close and a protocol error for the
exchange) and hold nothing; a head within the bound, however it arrives, is read as before."""

from __future__ import annotations

import pytest
from mitmproxy import http, options
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    Http1Client,
    Http1Server,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.test import tflow, tutils

from llm_gateway.addons import heads as heads_addon
from llm_gateway.mitm import heads

LIMIT = 1024
REFUSAL = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n"
ANSWER = http.Response.make(431, b"", {"content-length": "0"})
ANSWER.reason = "Request Header Fields Too Large"


@pytest.fixture
def reports():
    found: list[tuple] = []
    heads.install(heads.HeadBound(LIMIT, ANSWER, lambda *a: found.append(a)))
    yield found
    heads.uninstall()


def server() -> tuple[Http1Server, Context]:
    context = Context(tflow.tclient_conn(), options.Options())
    layer = Http1Server(context)
    assert list(layer.handle_event(events.Start())) == []
    return layer, context


def feed(layer, connection, *pieces: bytes) -> list:
    out = []
    for piece in pieces:
        out += list(layer.handle_event(events.DataReceived(connection, piece)))
    return out


def received(out: list) -> list:
    return [c.event for c in out if type(c).__name__ == "ReceiveHttp"]


def test_a_request_head_that_does_not_end_is_refused_and_dropped(reports):
    layer, context = server()
    out = feed(layer, context.client, b"GET / HTTP/1.1\r\n", *[b"x-pad: " + b"a" * 100 + b"\r\n"] * 20)
    sends = [c for c in out if isinstance(c, commands.SendData)]
    assert [s.data for s in sends] == [REFUSAL]
    assert isinstance(out[-1], commands.CloseConnection) and out[-1].connection is context.client
    assert received(out) == [], "no flow: nothing of the request was read"
    assert len(layer.buf) == 0
    [(side, peer, size)] = reports
    assert side == "request" and peer == "127.0.0.1:22" and LIMIT < size < LIMIT + 120
    # what still arrives before the close is not read as a head again, and nothing is answered twice
    assert feed(layer, context.client, b"x-more: 1\r\n\r\n") == [] and len(reports) == 1


def test_without_the_bound_mitmproxy_keeps_every_byte():
    layer, context = server()
    out = feed(layer, context.client, b"GET / HTTP/1.1\r\n", *[b"x-pad: " + b"a" * 100 + b"\r\n"] * 20)
    assert out == [] and len(layer.buf) > 2000  # the hole this closes


@pytest.mark.parametrize("pieces", [1, 3, 200])
def test_a_head_within_the_bound_is_read_as_before_however_it_arrives(reports, pieces):
    head = b"POST /v1/messages HTTP/1.1\r\nhost: a.example\r\ncontent-length: 5000\r\n"
    head += b"x-pad: " + b"a" * (LIMIT - len(head) - 11) + b"\r\n\r\n"
    assert len(head) == LIMIT
    wire = head + b"b" * 5000  # the body after it may take the buffer far past the bound
    step = -(-len(wire) // pieces)
    layer, context = server()
    out = feed(layer, context.client, *[wire[i:i + step] for i in range(0, len(wire), step)])
    events_ = received(out)
    assert isinstance(events_[0], RequestHeaders) and events_[0].request.path == "/v1/messages"
    assert isinstance(events_[-1], RequestEndOfMessage)
    assert not any(isinstance(c, commands.SendData) for c in out) and reports == []


def test_one_byte_over_the_bound_is_refused_even_in_one_read(reports):
    head = b"GET / HTTP/1.1\r\nx-pad: " + b"a" * LIMIT + b"\r\n\r\n"
    layer, context = server()
    out = feed(layer, context.client, head)
    assert [c.data for c in out if isinstance(c, commands.SendData)] == [REFUSAL] and reports


def test_the_next_request_on_a_kept_connection_is_bounded_too(reports):
    layer, context = server()
    out = feed(layer, context.client, b"GET /one HTTP/1.1\r\nhost: a.example\r\n\r\n")
    [first] = [e for e in received(out) if isinstance(e, RequestHeaders)]
    response = tutils.tresp()
    response.headers["content-length"] = "0"
    for event in (ResponseHeaders(1, response, True),):
        list(layer.handle_event(event))
    from mitmproxy.proxy.layers.http import ResponseEndOfMessage

    list(layer.handle_event(ResponseEndOfMessage(1)))
    out = feed(layer, context.client, b"GET /two HTTP/1.1\r\n", b"x-pad: " + b"a" * 2 * LIMIT)
    assert [c.data for c in out if isinstance(c, commands.SendData)] == [REFUSAL] and len(reports) == 1


def client() -> tuple[Http1Client, Context]:
    context = Context(tflow.tclient_conn(), options.Options())
    context.server = tflow.tserver_conn()
    layer = Http1Client(context)
    list(layer.handle_event(events.Start()))
    list(layer.handle_event(RequestHeaders(1, tutils.treq(content=b""), True)))
    list(layer.handle_event(RequestEndOfMessage(1)))
    return layer, context


def test_an_answer_head_that_does_not_end_fails_the_exchange(reports):
    layer, context = client()
    out = feed(layer, context.server, b"HTTP/1.1 200 OK\r\n", *[b"x-pad: " + b"a" * 500 + b"\r\n"] * 4)
    assert isinstance(out[0], commands.CloseConnection) and out[0].connection is context.server
    [error] = received(out)
    assert isinstance(error, ResponseProtocolError) and error.code == ErrorCode.GENERIC_SERVER_ERROR
    assert "longer than 1024 bytes" in error.message and "x-pad" not in error.message
    assert len(layer.buf) == 0 and [r[0] for r in reports] == ["answer"]
    # the close that follows says nothing more (mitmproxy would report the buffer as an unexpected answer)
    assert list(layer.handle_event(events.ConnectionClosed(context.server))) == []


def test_an_answer_head_within_the_bound_is_read_as_before(reports):
    layer, context = client()
    out = feed(layer, context.server, b"HTTP/1.1 200 OK\r\n", b"content-length: 2\r\n", b"\r\nok")
    assert isinstance(received(out)[0], ResponseHeaders) and reports == []


def test_uninstall_gives_mitmproxy_its_readers_back(reports):
    assert Http1Server.read_headers.__wrapped__ is not None
    heads.uninstall()
    assert not hasattr(Http1Server.read_headers, "__wrapped__") and not hasattr(Http1Client.read_headers, "__wrapped__")
    for name in ("wait", "read_body"):
        assert name not in Http1Server.__dict__, f"Http1Server's `{name}` is its base class's again"
    assert "read_body" not in Http1Client.__dict__
    assert heads.installed() is None


def test_the_refusal_is_a_native_431_that_closes():
    raw = http1.assemble_response(heads_addon.refusal(262144))
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"\r\nconnection: close" in head and b"\r\nx-should-retry: false" in head
    assert body == (b'{"type":"error","error":{"type":"request_too_large","message":'
                    b'"the request head (request line and headers) is longer than 262144 bytes"}}')


def test_bytes_after_a_refusal_are_not_held(reports):
    layer, context = server()
    feed(layer, context.client, b"GET / HTTP/1.1\r\nx-pad: " + b"a" * 2 * LIMIT)
    assert feed(layer, context.client, b"a" * 10 * LIMIT, b"\r\n\r\n") == [] and len(layer.buf) == 0


def test_the_option_installs_changes_and_turns_off_the_bound():
    from mitmproxy import exceptions
    from mitmproxy.test import taddons

    addon = heads_addon.HeadLimit()
    try:
        with taddons.context(addon) as tctx:
            addon.configure({"gateway_head_size_limit"})  # as mitmproxy does at start, for every option
            assert heads.installed().limit == 256 * 1024  # the default
            tctx.configure(addon, gateway_head_size_limit="1m")
            assert heads.installed().limit == 1024 * 1024 and hasattr(Http1Server.read_headers, "__wrapped__")
            with pytest.raises(exceptions.OptionsError):
                tctx.configure(addon, gateway_head_size_limit="lots")
            tctx.configure(addon, gateway_head_size_limit="0")
            assert heads.installed() is None and not hasattr(Http1Server.read_headers, "__wrapped__")
    finally:
        heads.uninstall()


def answer_headers(layer) -> None:
    response = tutils.tresp()
    response.headers["content-length"] = "4"
    list(layer.handle_event(ResponseHeaders(1, response, False)))


def test_a_next_head_that_does_not_end_while_the_answer_runs_closes_the_connection(reports):
    layer, context = server()
    feed(layer, context.client, b"GET /one HTTP/1.1\r\nhost: a.example\r\n\r\n")
    answer_headers(layer)  # the answer is under way: mitmproxy holds what the client sends next (`wait`)
    out = feed(layer, context.client, b"GET /two HTTP/1.1\r\n", *[b"x-pad: " + b"a" * 100 + b"\r\n"] * 20)
    assert not any(isinstance(c, commands.SendData) for c in out), "no 431 in the middle of an answer"
    assert isinstance(out[0], commands.CloseConnection) and out[0].connection is context.client
    [error] = received(out)
    assert isinstance(error, RequestProtocolError) and error.code == ErrorCode.CLIENT_DISCONNECTED
    assert error.message.startswith("Client disconnected") and "x-pad" not in error.message
    assert len(layer.buf) == 0 and [r[0] for r in reports] == ["next request"]


def test_a_pipelined_request_within_the_bound_waits_for_its_turn(reports):
    layer, context = server()
    feed(layer, context.client, b"GET /one HTTP/1.1\r\nhost: a.example\r\n\r\n")
    answer_headers(layer)
    body = b"b" * 4 * LIMIT
    head = b"POST /two HTTP/1.1\r\nhost: a.example\r\ncontent-length: %d\r\n\r\n" % len(body)
    out = feed(layer, context.client, head, *[body[i:i + 500] for i in range(0, len(body), 500)])
    assert out == [] and reports == []  # held, as mitmproxy holds it
    from mitmproxy.proxy.layers.http import ResponseData, ResponseEndOfMessage

    list(layer.handle_event(ResponseData(1, b"done")))
    out = list(layer.handle_event(ResponseEndOfMessage(1)))
    [second] = [e for e in received(out) if isinstance(e, RequestHeaders)]
    assert second.request.path == "/two" and second.stream_id == 3


def test_a_refusal_is_logged_without_the_head_and_counted(caplog):
    from llm_gateway.addons.metrics import Metrics

    metrics = Metrics()
    addon = heads_addon.HeadLimit(metrics)
    try:
        heads.install(heads.HeadBound(LIMIT, ANSWER, addon.report))
        layer, context = server()
        with caplog.at_level("WARNING", logger="llm_gateway.heads"):
            feed(layer, context.client, b"GET /?key=sk-secret HTTP/1.1\r\nx-api-key: sk-secret" + b"a" * 2 * LIMIT)
        assert "refused a request head from 127.0.0.1:22" in caplog.text and "answered 431" in caplog.text
        assert "sk-secret" not in caplog.text and "GET" not in caplog.text
        assert b'llm_gateway_heads_refused_total{side="request"} 1.0' in metrics.exposition()[1]
    finally:
        heads.uninstall()


def test_empty_lines_before_a_head_are_dropped_not_held(reports):
    """mitmproxy skips one empty line per read: a flood of them would hold everything sent behind them."""
    layer, context = server()
    out = feed(layer, context.client, *[b"\r\n" * 500] * 10)  # 10 kB of empty lines, no head
    assert out == [] and len(layer.buf) <= LIMIT and reports == []
    # empty lines, then a head within the bound, then its body: the head is read at once
    layer, context = server()
    wire = b"\r\n" * 600 + b"POST /v1/messages HTTP/1.1\r\nhost: a.example\r\ncontent-length: 3000\r\n\r\n" + b"b" * 3000
    out = feed(layer, context.client, wire[:1000], wire[1000:2000], wire[2000:])
    [head] = [e for e in received(out) if isinstance(e, RequestHeaders)]
    assert head.request.path == "/v1/messages" and isinstance(received(out)[-1], RequestEndOfMessage)
    # empty lines hiding a head that never ends
    layer, context = server()
    out = feed(layer, context.client, b"\r\n" * 300, b"GET / HTTP/1.1\r\nx-pad: " + b"a" * 2 * LIMIT)
    assert [c.data for c in out if isinstance(c, commands.SendData)] == [REFUSAL] and len(reports) == 1


def chunked_request(layer, context) -> list:
    return feed(layer, context.client, b"POST /v1/messages HTTP/1.1\r\nhost: a.example\r\ntransfer-encoding: chunked\r\n\r\n")


def test_a_chunk_size_line_that_does_not_end_fails_the_exchange(reports):
    layer, context = server()
    chunked_request(layer, context)
    out = feed(layer, context.client, b"5\r\nhello\r\n", *[b"0" * 300] * 5)  # a size line that never ends
    assert bytes(received(out)[0].data) == b"hello", "the chunk before goes on first"
    assert [c.connection for c in out if isinstance(c, commands.CloseConnection)] == [context.client]
    [error] = [e for e in received(out) if isinstance(e, RequestProtocolError)]
    assert "chunk-size or trailer line longer than 1024 bytes" in error.message
    assert error.message.startswith("Client disconnected")  # recorded as such: the client gets no answer
    assert error.code == ErrorCode.CLIENT_DISCONNECTED and len(layer.buf) == 0
    assert [r[0] for r in reports] == ["request body"]


def test_trailers_that_do_not_end_fail_an_answer(reports):
    layer, context = client()
    feed(layer, context.server, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n")
    out = feed(layer, context.server, *[b"x-trailer: " + b"t" * 200 + b"\r\n"] * 6)
    [error] = [e for e in received(out) if isinstance(e, ResponseProtocolError)]
    assert "trailer line longer than 1024 bytes" in error.message and [r[0] for r in reports] == ["answer body"]


def test_a_chunked_body_within_the_bound_passes_whole(reports):
    layer, context = server()
    chunked_request(layer, context)
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in [b"x" * 3000, b"y" * 5000]) + b"0\r\n\r\n"
    out = feed(layer, context.client, *[body[i:i + 700] for i in range(0, len(body), 700)])
    data = b"".join(e.data for e in received(out) if type(e).__name__ == "RequestData")
    assert data == b"x" * 3000 + b"y" * 5000 and isinstance(received(out)[-1], RequestEndOfMessage) and reports == []
