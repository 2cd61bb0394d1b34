"""The mitmproxy internals the fence (llm_gateway/mitm/) relies on exist on the installed mitmproxy.

None of these is mitmproxy's addon API. A release that renames or moves one fails here, by name, instead of the
gateway falling back at run time (closing instead of answering, a listener without its deeper queue, a key left
in flows). `scripts/test-latest` runs this against the newest mitmproxy 12 the declared range allows.
No network, no event loop: it inspects classes and modules only.
"""

from __future__ import annotations

import inspect

import pytest
from mitmproxy import contentviews, optmanager
from mitmproxy.addons import proxyserver
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layer, layers, mode_servers, server
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http2
from mitmproxy.proxy.utils import ReceiveBuffer

from llm_gateway.mitm import layers as fence_layers


def source(obj) -> str:
    return inspect.getsource(obj)


@pytest.mark.parametrize("state", [fence_layers.WAITING, fence_layers.BUFFERING, fence_layers.STREAMING])
def test_http_stream_states_the_timeouts_and_drain_read(state):
    """mitm/layers.end_early tells the exchange's phase by the name of HttpStream's server-side state."""
    assert callable(getattr(http_layers.HttpStream, state))


def test_http_stream_attributes_end_early_and_the_body_cap_use():
    init = source(http_layers.HttpStream.__init__)
    for name in ("request_body_buf", "response_body_buf", "server_state", "stream_id"):
        assert f"self.{name}" in init, name
    assert "self._paused" in source(http_layers.HttpStream), "_paused: a connect or TLS handshake under way"
    assert callable(http_layers.HttpStream._handle_event)  # replaced per stream by mitm/layers._inject
    assert "self.streams" in source(http_layers.HttpLayer.__init__)  # walked by find_stream


def test_the_event_and_command_types_end_early_feeds_the_stream():
    for name in ("ResponseHeaders", "ResponseData", "ResponseEndOfMessage", "ResponseProtocolError", "ResponseTrailers"):
        assert inspect.isclass(getattr(http_layers, name)), name
    assert inspect.isclass(events.MessageInjected) and inspect.isclass(commands.CloseConnection)
    assert issubclass(fence_layers.CappedBody, ReceiveBuffer) and callable(ReceiveBuffer.__iadd__)
    assert hasattr(layer, "NextLayer") and inspect.isclass(layers.HttpLayer) and inspect.isclass(layers.TCPLayer)
    assert hasattr(http_layers.HTTPMode, "transparent")


def test_the_error_page_answer_instead_of_error_page_replaces():
    """mitm/layers.answer_instead_of_error_page wraps the client's `Http1Server.send`, which writes mitmproxy's own
    error page for a `ResponseProtocolError` sent before any response, found through `HttpLayer.connections`."""
    send = source(http_layers._http1.Http1Server.send)
    assert "ResponseProtocolError" in send and "make_error_response" in send and "self.response" in send
    assert "self.connections" in source(http_layers.HttpLayer.__init__)
    handle = source(http_layers.HttpStream.handle_protocol_error)
    assert handle.index("HttpErrorHook") < handle.index("SendHttp(event, self.context.client)")
    assert "yield from self.send(event)" in source(http_layers._http1.Http1Connection._handle_event)
    assert callable(http1.assemble_response)
    # an HTTP/2 client: `_answer_on_h2` wraps the connection's `_handle_event`, whose protocol-error branch writes
    # the text/html page only while the stream has sent no headers, and writes ResponseHeaders through its writer
    h2_handle = source(_http2.Http2Connection._handle_event)
    assert "ResponseProtocolError" in h2_handle and "headers_sent" in h2_handle and "format_error" in h2_handle
    assert "format_h2_response_headers" in source(_http2.Http2Server._handle_event)
    assert callable(_http2.Http2Connection.is_open_for_us) and "self.h2_conn" in source(_http2.Http2Connection.__init__)
    assert http_layers.Http2Server is _http2.Http2Server


def test_proxyserver_bookkeeping_the_drain_and_the_backlog_use():
    ps = source(proxyserver.Proxyserver)
    assert "self.connections" in ps and "self.servers" in ps and callable(proxyserver.Proxyserver.inject_event)
    assert "self.transports" in source(server.ConnectionHandler.__init__)
    assert "self.client" in source(server.ConnectionHandler.__init__)
    assert "self._servers" in source(mode_servers.AsyncioServerInstance)  # the listening asyncio servers
    assert inspect.iscoroutinefunction(mode_servers.ServerInstance.stop)
    assert "self.changed" in source(proxyserver.Servers.__init__)  # addons/backlog follows new listeners


def test_request_serialisers_key_custody_wraps():
    """mitm/serializers puts the real upstream key into the bytes sent, in these two functions only."""
    assert callable(http1.assemble_request_head) and callable(_http2.format_h2_request_headers)
    # looked up at call time, so that the wrappers installed on the modules are the ones called
    assert "http1.assemble_request_head(" in source(http_layers._http1)
    assert "yield from format_h2_request_headers(" in source(_http2)


def test_option_and_contentview_internals():
    assert "self.deferred" in source(optmanager.OptManager.__init__)  # mitm/options
    assert isinstance(contentviews.registry._by_name, dict)  # mitm/registry.unregister_view


def test_what_failover_replaces_and_calls():
    """mitm/layers.arm_failover: `make_server_connection` looked up on the instance after the `request` hook (so an
    instance attribute takes its place), the connection asked for with `GetHttpConnection`, the request sent as
    `state_consume_request_body` sends it, a failed connection's layer in `HttpLayer.connections`, a hook's answer
    sent by `send_response`, the 502 path `handle_protocol_error`, and our own hook class."""
    consume = source(http_layers.HttpStream.state_consume_request_body)
    assert "yield HttpRequestHook(self.flow)" in consume and "self.make_server_connection()" in consume
    for sent in ("RequestHeaders(", "RequestData(", "RequestTrailers(", "RequestEndOfMessage(self.stream_id)"):
        assert sent in consume, sent
    connect = source(http_layers.HttpStream.make_server_connection)
    assert "GetHttpConnection(" in connect and "self.context.server = self.flow.server_conn = connection" in connect
    assert [f for f in ("address", "tls", "via", "transport_protocol")
            if f in http_layers.GetHttpConnection.__dataclass_fields__] == ["address", "tls", "via", "transport_protocol"]
    assert "self.connections[event.connection]" in source(http_layers.HttpLayer._handle_event)
    assert callable(http_layers.HttpStream.send_response) and callable(http_layers.HttpStream.handle_protocol_error)
    assert http_layers.ErrorCode.CONNECT_FAILED and callable(http_layers.SendHttp)
    assert issubclass(fence_layers.GatewayFailoverHook, commands.StartHook)
    assert fence_layers.GatewayFailoverHook.name == "gateway_failover"


def test_the_head_readers_mitm_heads_wraps():
    """mitm/heads.py replaces `read_headers` on both HTTP/1 connection classes: they must still wait for a head
    by searching the connection's `buf` (`maybe_extract_lines`), be entered through `self.state`, and the
    answer side must still report a bad head as a `ResponseProtocolError` carried by `ReceiveHttp`."""
    http1_module = http_layers._http1
    handle = source(http1_module.Http1Connection._handle_event)
    assert "self.buf += event.data" in handle and "self.state(event)" in handle
    assert "self.state = self.read_headers" in source(http1_module.Http1Connection)
    for cls in (http_layers.Http1Server, http_layers.Http1Client):
        read = source(cls.read_headers)
        assert "self.buf.maybe_extract_lines()" in read and "FIXME: protect against header size DoS" in read, cls
    assert "ResponseProtocolError" in source(http_layers.Http1Client.read_headers)
    assert "self.stream_id" in source(http_layers.Http1Client.read_headers)
    assert callable(http_layers.ReceiveHttp) and callable(http_layers.ErrorCode)
    assert "self.conn.peername" in source(http1_module.Http1Server.read_headers)
    # a pipelined next request is held in `wait` (Http1Server.mark_done), which mitm/heads.py wraps on Http1Server
    assert "self.state = self.wait" in source(http1_module.Http1Server.mark_done)
    assert "Client disconnected" in source(http1_module.Http1Connection.wait)
    assert callable(http_layers.RequestProtocolError) and hasattr(http_layers.ErrorCode, "CLIENT_DISCONNECTED")
    # a chunked body's lines: `read_body` reads what it can with the body reader and leaves the rest in `buf`
    body = source(http1_module.Http1Connection.read_body)
    assert "self.body_reader(self.buf)" in body and "self.ReceiveProtocolError" in body
    assert "self.state = self.read_body" in source(http1_module.Http1Server.read_headers)
    assert "self.state = self.read_body" in source(http1_module.Http1Client.read_headers)
