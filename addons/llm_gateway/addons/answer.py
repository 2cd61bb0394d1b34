"""The answer pipeline as an addon: picks the path in `responseheaders`, answers in `response`, records
failures in `error`; pipeline/answer.py decides what the answer means.
"""

from __future__ import annotations

import time

from mitmproxy import http

from llm_gateway.pipeline import eventstream, exchange, relay
from llm_gateway.pipeline.answer import (
    cloud_error,
    error_answer,
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
            elif response.status_code >= 400 and ex.provider == ANTHROPIC:
                error_answer(response, ex)
            elif response.status_code >= 400 and ex.translated:  # an Anthropic client: a native error
                translated_error(response, ex)
            elif ex.translated and ex.provider == BEDROCK and path_of(ex.path).rstrip("/").endswith("/count_tokens"):
                translated_count(response, ex)
            elif response.status_code >= 400:  # a cloud's own error, for its own client: recorded, not rewritten
                cloud_error(response, ex)
            elif ex.stream_requested is not None and (sse := is_sse(response)) != ex.stream_requested:
                if sse:
                    sse_to_json(response, ex)
                elif ex.stream_upstream is False:
                    json_to_sse(response, ex)
        finally:  # a bug above is mitmproxy's to log (the answer goes on as it is); the record still says what went
            settle(response, ex)
            exchange.publish(flow, ex)

    def error(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or ex.recorded:
            return
        settle_failure(flow, ex)
        exchange.publish(flow, ex)
