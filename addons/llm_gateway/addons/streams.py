"""Stream preference: a client rule may force the upstream `stream` flag on or off, while the client
still gets exactly the form it asked for.

A JSON answer to a streaming request makes Claude Code send the whole request again without
streaming (the upstream is paid twice) and makes LiteLLM emit empty chunks, so whenever the upstream
form differs from the requested one the answer is converted faithfully: upstream SSE is accumulated
into the Message the Anthropic SDK would build, upstream JSON is replayed as a complete event stream.
Streams the client asked for pass through the relay unbuffered. This addon forces the flag; the answer
is converted back by the answer pipeline (pipeline/answer.py), on the same path as every other answer.
"""

from __future__ import annotations

from mitmproxy import http

from llm_gateway.pipeline import exchange
from llm_gateway.protocol import jsoncodec, leanjson, providers
from llm_gateway.protocol.providers import ANTHROPIC
from llm_gateway.protocol.hosts import path_of


def takes_stream_flag(flow: http.HTTPFlow, ex: exchange.Exchange) -> bool:
    """Only Messages creation takes `stream` (not count_tokens, batches, …)."""
    return (
        flow.request.method == "POST"
        and path_of(flow.request.path).rstrip("/").endswith("/v1/messages")
        and isinstance(ex.body, dict)
    )


class StreamPreference:
    def request(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or flow.response:
            return
        if ex.translated:  # the cloud's path will say it (addons/translate.py): no preference forced there
            if takes_stream_flag(flow, ex):
                ex.stream_requested = ex.stream_upstream = ex.body.get("stream") is True
                exchange.publish(flow, ex)
            return
        if ex.provider != ANTHROPIC:
            # Bedrock and Vertex name the answer's form in the path, and the client signed the request (SigV4,
            # OAuth bearer): the gateway changes nothing in it, so no stream preference applies.
            _, stream = providers.request_facts(ex.provider, ex.path)
            ex.stream_requested = ex.stream_upstream = stream
            if ex.stream_preference in ("on", "off"):
                ex.note(f"stream preference {ex.stream_preference} not applied: {ex.provider} requests are signed")
            exchange.publish(flow, ex)
            return
        if not takes_stream_flag(flow, ex):
            return
        requested = ex.body.get("stream") is True
        ex.stream_requested = ex.stream_upstream = requested
        pref = ex.stream_preference
        wanted = {"on": True, "off": False}.get(pref, requested)
        if wanted != requested:
            if isinstance(ex.body, leanjson.LeanBody):  # a large body: only the flag changes, in place
                flow.request.content = ex.body.with_stream(flow.request.get_content(strict=False), wanted)
            else:  # read again exactly (ex.body was read fast: an integer past 64 bits may be a float there)
                body = jsoncodec.parse_json_body(flow.request.get_content(strict=False))
                body = body if isinstance(body, dict) else ex.body
                body["stream"] = ex.body["stream"] = wanted
                flow.request.content = jsoncodec.dumps(body)
            ex.stream_upstream = wanted
            ex.note(f"stream forced {pref} upstream")
        exchange.publish(flow, ex)
