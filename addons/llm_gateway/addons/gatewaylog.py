"""What the gateway's log shows by default: one line per exchange or decision, and a named failure.

mitmproxy logs four or five lines of its own per connection at `info` (`client connect`, `server connect
…`, `Streaming response from …`, two disconnects), which bury the gateway's one line per API exchange
and egress decision. `GatewayLog` turns exactly those into `debug` lines: gone from the default output,
back with `--set termlog_verbosity=debug`. Everything else mitmproxy logs keeps its level.

A failed request that is no API exchange (those get their usage line) is logged with its method, host
and path (never the query string, which may carry a token), where mitmproxy's own line only says
`error establishing server connection: …`. Claude Code's calls to api.anthropic.com/api/… are such.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from llm_gateway.pipeline import exchange
from llm_gateway.protocol.hosts import path_of
from llm_gateway.util.logsafe import clean

logger = logging.getLogger("llm_gateway.log")

CHATTY_LOGGER = "mitmproxy.proxy.server"  # where mitmproxy's connection handler logs (proxy/server.py)
CHATTER_LINES = frozenset({"client connect", "client disconnect"})
CHATTER_PREFIXES = ("server connect ", "server disconnect ", "Streaming response from ")


class ConnectionChatter(logging.Filter):
    """Turns mitmproxy's per-connection `info` lines into `debug` lines; drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if record.levelno == logging.INFO and isinstance(msg, str) and (msg in CHATTER_LINES or msg.startswith(CHATTER_PREFIXES)):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def where(flow: http.HTTPFlow) -> str:
    """`GET https://api.anthropic.com:443/api/hello`, without the query string, escaped for a log line."""
    request = flow.request
    path = path_of(request.path)
    return clean(f"{request.method} {request.scheme}://{request.pretty_host}:{request.port}{path}")


# One filter for the process: logging keeps a filter once however often it is added, so a gateway script loaded
# again (mitmproxy reloads it on change) or a test that never reached `done` leaves no second copy behind.
CHATTER = ConnectionChatter()


class GatewayLog:
    def __init__(self) -> None:
        self.chatter = CHATTER

    def load(self, loader) -> None:
        logging.getLogger(CHATTY_LOGGER).addFilter(self.chatter)

    def done(self) -> None:
        logging.getLogger(CHATTY_LOGGER).removeFilter(self.chatter)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.error is None or exchange.of(flow) is not None:
            return
        logger.warning(f"failed: {where(flow)}: {clean(flow.error.msg)}")

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        if flow.error is None:
            return
        logger.warning(f"failed: CONNECT {clean(f'{flow.request.pretty_host}:{flow.request.port}')}: "
                       f"{clean(flow.error.msg)}")
