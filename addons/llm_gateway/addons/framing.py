"""Framing the gateway refuses to pass on: a bare CR in a request header, an HTTP upgrade other than WebSocket.

A bare CR (or LF, NUL) inside a header name or value is kept by mitmproxy's HTTP/1 reader and forwarded as it
came; a server that takes a CR as a line end (Python's http.server does) then reads a second header the gateway
never saw (`x-a: 1\rx-api-key: …`). RFC 9110 section 5.5 forbids CR, LF and NUL in field values; such a request
gets a native 400 `invalid_request_error` and goes nowhere.

Upgrades other than WebSocket are refused, so no connection leaves the policy's sight.

After a `101 Switching Protocols` answer mitmproxy stops reading HTTP on the connection: a WebSocket goes to its
WebSocket layer (messages still pass hooks), anything else to a raw TCP relay (its `rawtcp` option, on by
default; proxy/layers/http/__init__.py, `HttpStream.state_done`). Every later request on that connection would
then pass unjudged: no egress verdict, no blocked paths, no key custody, no record. An upstream that answers an
`Upgrade: h2c` (or any other protocol) with 101 would hand the agent such a relay. So a 101 that does not start
a WebSocket (mitmproxy sets `flow.websocket` before the `response` hook when it does) is replaced by a native
502 `api_error` that closes the connection; the upstream connection goes with it.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from llm_gateway.mitm import layers
from llm_gateway.pipeline import exchange
from llm_gateway.pipeline.answer import native_answer
from llm_gateway.protocol.hosts import path_of
from llm_gateway.util.logsafe import clean

logger = logging.getLogger("llm_gateway.framing")

MESSAGE = "the upstream switched protocols ({}); the gateway relays only HTTP and WebSocket"


_BAD = (b"\r", b"\n", b"\0")


class FramingGuard:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        # one pass over the raw fields (Headers.items() is quadratic)
        if not any(bad in name or bad in value for name, value in flow.request.headers.fields for bad in _BAD):
            return
        where = f"{clean(flow.request.pretty_host, 100)}{path_of(flow.request.path)[:200]!r}"
        logger.warning(f"refused a request to {where}: a header holds a bare CR, LF or NUL")
        ex = exchange.of(flow)
        if ex is not None:
            ex.stop("malformed header")
        flow.response = native_answer("invalid_request_error", "a request header holds a CR, LF or NUL character",
                                      {"connection": "close", "x-should-retry": "false"})
        layers.cap_request_body(flow, 0, refused=True)  # its body is read and dropped, never held

    def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or response.status_code != 101 or flow.websocket is not None:
            return
        protocol = clean(response.headers.get("upgrade", "") or "no Upgrade header")[:60]
        logger.warning(f"refused a switch to {protocol!r} from {clean(flow.request.pretty_host, 100)}"
                       f"{path_of(flow.request.path)[:200]!r}: only WebSocket upgrades are relayed")
        ex = exchange.of(flow)
        if ex is not None:
            ex.stop("upgrade refused")
        answer = native_answer("api_error", MESSAGE.format(protocol),
                               {"connection": "close", "x-should-retry": "false"})
        answer.status_code, answer.reason = 502, "Bad Gateway"
        flow.response = answer
