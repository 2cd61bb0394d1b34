"""gateway_head_size_limit: a request or answer head longer than this is refused (mitm/heads.py).

mitmproxy 12 buffers an HTTP/1 head until its blank line comes, however long that takes (issue 30: a client that
sends header lines forever grows the process without bound; bare mitmdump does the same). With the bound:

- a request head (either listener, inside CONNECT tunnels too) longer than the limit gets a native error and the
  connection is closed. Status 431 "Request Header Fields Too Large" (RFC 6585 section 5: the status for exactly
  this); the body's type is `request_too_large`, Anthropic's type for "the request exceeds the maximum allowed
  number of bytes" (API reference, "Errors"), which names the cause; `invalid_request_error` would say the
  request is malformed, which it need not be. `x-should-retry: false`: the same head is refused again. The
  Anthropic SDKs map an unknown status to their plain status error (no retry for a 4xx other than 408/409/429).
  There is no flow and no record: nothing of the request was read (its Host, path or token may lie beyond the
  limit), so the log line is the trace;
- an answer head longer than the limit ends the exchange as any upstream failure does (the `error` hook: the
  native 502 for an API exchange, recorded with that status; mitmproxy's own 502 for other traffic).

The same bound holds the lines inside a chunked body (a chunk-size line, the trailers) and a request sent while
the last one is answered (HTTP/1 pipelining); there no 431 fits, so the connection is only closed (mitm/heads.py).

Each refusal is a warning in the log (the peer's address and the byte count, never the head) and counts in
`llm_gateway_heads_refused_total{side}`.

The default, 256 KiB, is generous: Claude Code's and the SDKs' request heads are a few kB, nginx takes at most
4 × 8 KiB (`large_client_header_buffers`), Node.js 16 KiB (`--max-http-header-size`). Memory per connection
waiting for a head is then at most the limit plus one read (64 KiB). `0` turns the bound off (mitmproxy's own
behaviour).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mitmproxy import ctx, exceptions, http
from mitmproxy.utils import human

from llm_gateway.mitm import heads
from llm_gateway.pipeline.answer import native_answer

if TYPE_CHECKING:
    from llm_gateway.addons.metrics import Metrics

logger = logging.getLogger("llm_gateway.heads")

DEFAULT_LIMIT = "256k"
STATUS, REASON = 431, "Request Header Fields Too Large"  # RFC 6585 section 5


def refusal(limit: int) -> http.Response:
    """The answer to a request head longer than `limit` bytes: a native 431 that closes."""
    answer = native_answer(
        "request_too_large", f"the request head (request line and headers) is longer than {limit} bytes",
        {"connection": "close", "x-should-retry": "false"}, status=STATUS)
    answer.reason = REASON
    return answer


def report(side: str, peer: str, received: int, metrics: Metrics | None = None) -> None:
    """Log one refused head (who and how much, never its bytes) and count it."""
    if metrics is not None:
        metrics.heads_refused.labels(side.replace(" ", "_")).inc()
    limit = heads.installed()
    most = limit.limit if limit else "the limit's"
    if side == "request":
        logger.warning(f"refused a request head from {peer}: {received} bytes without its end, over {most} "
                       f"(gateway_head_size_limit); answered {STATUS} and closed the connection")
    elif side == "next request":
        logger.warning(f"refused a request head from {peer}, sent while its last request was answered: {received} "
                       f"bytes without its end, over {most} (gateway_head_size_limit); closed the connection")
    elif side.endswith(" body"):
        who = f"the client {peer}" if side == "request body" else f"the upstream {peer}"
        logger.warning(f"a chunked {side} from {who}: a chunk-size or trailer line of {received} bytes without "
                       f"its end, over {most} (gateway_head_size_limit); the connection is closed and the exchange "
                       f"fails")
    else:
        logger.warning(f"an answer head from the upstream {peer}: {received} bytes without its end, over {most} "
                       f"(gateway_head_size_limit); the upstream connection is closed and the exchange fails")


class HeadLimit:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics  # llm_gateway_heads_refused_total{side}

    def report(self, side: str, peer: str, received: int) -> None:
        report(side, peer, received, self.metrics)

    def load(self, loader) -> None:
        loader.add_option(
            "gateway_head_size_limit", str, DEFAULT_LIMIT,
            "Longest HTTP/1 request or answer head (request or status line and headers) taken, in bytes or with "
            "a unit (256k, 1m). A longer request head gets a native 431 and its connection is closed; a longer "
            "answer head fails the exchange (a native 502). 0: no bound (mitmproxy's own behaviour).",
        )

    def configure(self, updated: set[str]) -> None:
        if "gateway_head_size_limit" not in updated:
            return
        setting = ctx.options.gateway_head_size_limit
        try:
            limit = human.parse_size(setting) or 0
        except ValueError as e:
            raise exceptions.OptionsError(f"gateway_head_size_limit: {e}") from None
        if limit <= 0:
            heads.uninstall()
            return
        heads.install(heads.HeadBound(limit, refusal(limit), self.report))

    def done(self) -> None:
        heads.uninstall()
