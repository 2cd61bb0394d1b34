"""Facts about a flow that every part reads the same way: which listener it came through (base-URL
`reverse` or egress `regular` mode) and the `flow.metadata` keys the gateway writes.
"""

from __future__ import annotations

from mitmproxy import connection, http

# Where a refused flow says so, for mitmweb's markers (addons/webview.py reads it).
EGRESS_METADATA = "gateway_egress"


def is_regular(conn: connection.Client) -> bool:
    return conn.proxy_mode.type_name == "regular"


def proxy_mode(flow: http.HTTPFlow) -> str:
    return flow.client_conn.proxy_mode.type_name
