"""The answer pipeline as an addon: picks the path in `responseheaders`, answers in `response`, records
failures in `error`; pipeline/answer.py decides what the answer means.
"""

from __future__ import annotations

import time

from mitmproxy import http

from llm_gateway.mitm import layers
from llm_gateway.pipeline import eventstream, exchange, relay
from llm_gateway.pipeline.answer import (
    MITMPROXY_ERROR_STATUS,
    cloud_error,
    error_answer,
    error_in_success,
    forget,
    is_eventstream,
    is_sse,
    json_to_sse,
    settle,
    settle_failure,
    sse_to_json,
    translated_count,
    translated_error,
)
from llm_gateway.pipeline.streamreader import StreamReader
from llm_gateway.protocol.hosts import path_of
from llm_gateway.protocol.providers import ANTHROPIC, BEDROCK
from llm_gateway.protocol import errors


DETAIL_CHARS = 300


def upstream_failed_answer(reason: str, detail: str = "") -> http.Response:
    """A native 502 `api_error` for an upstream that failed before answering: `settle_failure`'s reason, then
    mitmproxy's own words up to their first ":" (what its page said, without the upstream bytes a parse error
    quotes after it, which could hold anything; at most DETAIL_CHARS characters); retryable: the SDKs retry a
    502 anyway, and a refused or reset connection is worth a retry."""
    detail = detail.split(":", 1)[0].strip()[:DETAIL_CHARS]
    message = f"The gateway's upstream failed: {reason}" + (f" ({detail})." if detail else ".")
    return http.Response.make(
        MITMPROXY_ERROR_STATUS, errors.error_json("api_error", message),
        {"content-type": "application/json", "x-should-retry": "true", "connection": "close"},
    )


class AnswerPipeline:
    """The addon: picks the path in `responseheaders`, answers in `response`, records failures in `error`."""

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None:
            return
        ex.response_started = time.time()
        ex.add_tap(StreamReader(ex), exchange.READ)  # after the scrub; the copy sees the native events
        response = flow.response
        # Relay only a stream the client asked for (or did not say), and only a success: an error sent as a
        # stream is buffered and answered as a native JSON error, like any other error.
        if is_sse(response) and response.status_code < 400 and ex.stream_requested is not False:
            relay.install(flow, ex)
        elif is_eventstream(response) and response.status_code < 400:  # Bedrock's stream: read, never changed
            eventstream.install(flow, ex)

    def response(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None:
            return
        response = flow.response
        try:
            if response.stream:
                pass  # relayed: the reader saw it all
            elif ex.provider == ANTHROPIC and (
                response.status_code >= 400 or (not is_sse(response) and error_in_success(response))
            ):
                error_answer(response, ex)
            elif response.status_code >= 400 and ex.translated:  # an Anthropic client: a native error
                translated_error(response, ex)
            elif ex.translated and ex.provider == BEDROCK and path_of(ex.path).rstrip("/").endswith("/count_tokens"):
                translated_count(response, ex)
            elif response.status_code >= 400:  # a cloud's own error, for its own client: recorded, not rewritten
                cloud_error(response, ex)
            elif ex.provider == ANTHROPIC and ex.stream_requested is not None and (sse := is_sse(response)) != ex.stream_requested:
                # The client gets the form it asked for, whoever chose the other (a rule, or a relay that
                # answers a stream with JSON: Claude Code would resend the turn without streaming).
                (sse_to_json if sse else json_to_sse)(response, ex)
        finally:  # a bug above is mitmproxy's to log (the answer goes on as it is); the record still says what went
            settle(response, ex)
            forget(response)  # the last reader of the decoded body
            exchange.publish(flow, ex)

    def error(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or ex.recorded:
            return
        settle_failure(flow, ex)
        if ex.status == MITMPROXY_ERROR_STATUS and flow.response is None:
            # mitmproxy is about to answer with its text/html 502: the client gets the native error instead
            detail = flow.error.msg if flow.error else ""
            answer = upstream_failed_answer(ex.reason or "upstream failed", detail)
            answered = layers.answer_instead_of_error_page(flow, answer)
            if answered:
                ex.note("native 502 in place of mitmproxy's error page")
        exchange.publish(flow, ex)
