"""HTTP upgrades other than WebSocket are refused, so no connection leaves the policy's sight.

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

from llm_gateway.pipeline import exchange
from llm_gateway.pipeline.answer import native_answer
from llm_gateway.protocol.hosts import path_of
from llm_gateway.util.logsafe import clean

logger = logging.getLogger("llm_gateway.upgrades")

MESSAGE = "the upstream switched protocols ({}); the gateway relays only HTTP and WebSocket"


class UpgradeGuard:
    def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or response.status_code != 101 or flow.websocket is not None:
            return
        protocol = clean(response.headers.get("upgrade", "") or "no Upgrade header")[:60]
        logger.warning(f"refused a switch to {protocol!r} from {flow.request.pretty_host}"
                       f"{path_of(flow.request.path)[:200]!r}: only WebSocket upgrades are relayed")
        ex = exchange.of(flow)
        if ex is not None:
            ex.stop("upgrade refused")
        answer = native_answer("api_error", MESSAGE.format(protocol), {"connection": "close", "x-should-retry": "false"})
        answer.status_code, answer.reason = 502, "Bad Gateway"
        flow.response = answer
