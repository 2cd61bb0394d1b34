"""Request bodies: refuse one over `limits.request_body` with a native 413, without holding it in memory.

Anthropic's API refuses a request over 32 MB with 413 `request_too_large`; the gateway does the same before the
upstream sees it, and before the body fills its memory. mitmproxy's `body_size_limit` option refuses too early
for that (in the layer, before any hook) with its own HTML 413, which no client reads as an Anthropic error, and
it is one limit for every flow; so this keeps mitmproxy's buffering but swaps the buffer of an API request for one
that stops keeping bytes past the limit (`mitm.layers.CappedBody`). A body declared too large by its `content-length` is
answered at once and its bytes are read and dropped, so that the client, which writes its whole request before
it reads, gets the 413 instead of a reset; a chunked body is cut off the same way when it crosses the limit.

The limit counts decoded bytes: a compressed body (`Content-Encoding` gzip, deflate, br, zstd) is decoded here
with `protocol.decoding.decode`, which stops as soon as the output crosses the limit (a 728-byte brotli body
otherwise expands to gigabytes in mitmproxy's unbounded `get_content()`), and answered with the same 413.
Only then is the body read as JSON (`ex.body`, `ex.model_requested`), so nothing before this reads it; a
compressed body, or one over `leanjson.LEAN_ABOVE`, is decoded and read in a worker thread, so its cost never
stalls the event loop (and with it every other stream of the replica).

Answer bodies, the same way: a compressed buffered answer is decoded once (up to `answer.ANSWER_LIMIT`) in a
worker thread in the `response` hook, before key custody and the answer pipeline read it (`answer.body_of`).

Memory: an accepted body is held as mitmproxy's list of received chunks, joined once when it is complete
(briefly twice its size), then read by `leanjson.parse_request_body` (lean above 4 MiB).
"""

from __future__ import annotations

import asyncio
import logging
import weakref

from mitmproxy import http

from llm_gateway.mitm import layers
from llm_gateway.mitm.layers import CappedBody
from llm_gateway.pipeline import exchange
from llm_gateway.pipeline import answer
from llm_gateway.pipeline.answer import native_answer
from llm_gateway.protocol import decoding, leanjson, providers
from llm_gateway.protocol.providers import ANTHROPIC
from llm_gateway.protocol.hosts import path_of
from llm_gateway.util.logsafe import clean

logger = logging.getLogger("llm_gateway.bodies")


def too_large(limit: int, size: int | None) -> http.Response:
    shown = f"{size} bytes" if size is not None else "over the limit"
    return native_answer(
        "request_too_large",
        f"Request exceeds the maximum allowed number of bytes: {shown}; this gateway accepts up to {limit} "
        "(limits.request_body).",
        {"connection": "close", "x-should-retry": "false"},
    )


def read_body(raw: bytes, encoding: str | None, limit: int) -> object:
    """The request body as JSON (`leanjson.parse_request_body`), decoded first with the bound `limit` (bytes;
    `decoding.TooLarge` past it). Runs in a worker thread."""
    return leanjson.parse_request_body(decoding.decode(raw, encoding, limit), exact=False)


class BodyLimit:
    def __init__(self) -> None:
        self._capped: weakref.WeakKeyDictionary[http.HTTPFlow, CappedBody] = weakref.WeakKeyDictionary()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or flow.response:
            return
        limit = ex.rules.limits.request_body
        try:
            declared = int(flow.request.headers.get("content-length", ""))
        except ValueError:
            declared = None
        refused = declared is not None and declared > limit
        # HTTP/1 reads exactly the declared length (RFC 9112 section 6.3): a body declared within the limit
        # cannot cross it, and needs no capped buffer (nor the search for mitmproxy's layer that swaps it in).
        if refused or declared is None or not flow.request.http_version.startswith("HTTP/1"):
            capped = layers.cap_request_body(flow, limit, refused)
            if capped is not None:
                self._capped[flow] = capped
        if refused:
            ex.stop("request_too_large")
            logger.warning(f"refused a {declared}-byte request to {ex.host}{path_of(ex.path)!r} (limit {limit})")
            flow.response = too_large(limit, declared)

    async def request(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or flow.response:
            return
        body = self._capped.pop(flow, None)
        if body is not None and body.refused:
            ex.stop("request_too_large")
            ex.release()
            logger.warning(f"refused a request of over {body.limit} bytes to {ex.host}{path_of(ex.path)!r}")
            flow.response = too_large(body.limit, body.received)
            return
        limit = ex.rules.limits.request_body
        encoding = flow.request.headers.get("content-encoding")
        raw = flow.request.raw_content or b""
        try:
            if encoding or len(raw) > leanjson.LEAN_ABOVE:  # decoding and the lean read: off the event loop
                ex.body = await asyncio.to_thread(read_body, raw, encoding, limit)
            else:
                # read to be looked at: addons/streams.py reads it again exactly where it writes it
                ex.body = leanjson.parse_request_body(raw, exact=False)
        except leanjson.TooManyFields:
            ex.stop("too many top-level fields")
            ex.release()
            logger.warning(f"refused a request body with more than {leanjson.MAX_FIELDS} top-level fields to "
                           f"{ex.host}{path_of(ex.path)!r}")
            flow.response = native_answer(
                "invalid_request_error",
                f"The request body has more than {leanjson.MAX_FIELDS} top-level fields; this gateway does not "
                "read further (a Messages request has about twenty).")
            return
        except decoding.TooLarge:
            ex.stop("request_too_large")
            ex.release()
            logger.warning(f"refused a {clean(encoding, 40)} request decoding to over {limit} bytes to "
                           f"{ex.host}{path_of(ex.path)!r}")
            flow.response = too_large(limit, None)
            return
        if isinstance(ex.body, dict) and isinstance(ex.body.get("model"), str):
            ex.model_requested = ex.body["model"][:200]
        if ex.provider != ANTHROPIC and not ex.translated:  # the clouds name the model in the path (the body has none)
            model, _ = providers.request_facts(ex.provider, ex.path)
            if model:
                ex.model_requested = model[:200]
        exchange.publish(flow, ex)

    async def response(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and exchange.of(flow) is not None:
            await answer.decode_off_loop(flow.response)
