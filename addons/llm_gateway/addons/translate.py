"""Translation: an Anthropic Messages request (any client) served by Amazon Bedrock or Google Vertex AI, for a route
with `provider: bedrock` or `provider: vertex` (policy/clouds.py's `read_translation`).

Vertex: `POST /v1/projects/<project>/locations/<region>/publishers/anthropic/models/<id@date>:rawPredict` (or
`:streamRawPredict`), the body without `model`, with `anthropic_version: vertex-2023-10-16`; the betas stay in the
`anthropic-beta` header; the answer is Anthropic's own JSON or SSE already. Bedrock:

The request becomes an InvokeModel call: the path `/model/<Bedrock id>/invoke` (or `/invoke-with-response-stream`
when the body asks to stream), the body without `model` and `stream`, with `anthropic_version` and the
`anthropic-beta` header's betas as `anthropic_beta`, less the fields Bedrock refuses together with their betas
(protocol/providers.py). addons/cloudauth.py then signs it with the gateway's AWS credentials; the answer comes
back to the client as Anthropic's own (pipeline/eventstream.py: the event stream as SSE; pipeline/answer.py:
Bedrock's errors as native errors). The model id: the route's `models` map first, else `bedrock_model_id`.

Bedrock sends no pings; Anthropic's API does, and idle timeouts on the way (proxies, load balancers, Claude Code's
own stream watchdog) need bytes while a model thinks. A translated Bedrock stream gets `event: ping` right after
`message_start` (pipeline/eventstream.py) and one whenever the upstream has been silent for `PING_INTERVAL`
seconds (counted from its last chunk or the last ping), put between two whole events through mitm/layers.py's
`send_to_client`. Pings are the gateway's: `timeouts.stream_idle` still counts the upstream's silence.

`count_tokens` goes to the clouds' own count endpoints (Bedrock's CountTokens, Vertex's `count-tokens:rawPredict`);
other paths get a `501` native error of type `not_supported` with `x-should-retry: false`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import http

from llm_gateway.mitm import layers
from llm_gateway.pipeline import exchange, relay
from llm_gateway.pipeline.answer import is_eventstream
from llm_gateway.policy.failover import serving
from llm_gateway.protocol import errors, jsoncodec, providers, sse
from llm_gateway.protocol.hosts import path_of
from llm_gateway.util.logsafe import clean

# Request headers that are Anthropic's alone (the key, the version: the body carries it for Bedrock)
ANTHROPIC_ONLY = ("x-api-key", "anthropic-version", "anthropic-beta", "authorization")
# Seconds of upstream silence before a translated Bedrock stream gets an `event: ping`: well under the idle
# timeouts of common intermediaries (60 s and more) and of Claude Code's stream watchdog.
PING_INTERVAL = 10.0

logger = logging.getLogger("llm_gateway.translate")


class ProviderTranslation:
    def request(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or flow.response or not ex.translated or ex.provider not in (providers.BEDROCK, providers.VERTEX):
            return
        route = serving(ex.route, len(ex.failed_upstreams))
        request = flow.request
        path = path_of(ex.path).rstrip("/")
        counting = path.endswith("/v1/messages/count_tokens")
        if not (path.endswith("/v1/messages") or counting) or not isinstance(ex.body, dict):
            # anything else (batches, models, …): not translated
            flow.response = http.Response.make(
                501, errors.error_json("not_supported", f"{path_of(ex.path)} is not supported on this route ({ex.provider})"),
                {"content-type": "application/json", "x-should-retry": "false"})
            ex.note("not translated: answered 501 not_supported")
            return
        model = ex.model_requested or ""
        region = route.region if route is not None else None
        target = next((to for pattern, to in (route.models if route else ()) if pattern.match(model)), None)
        betas = [b.strip() for value in request.headers.get_all("anthropic-beta") for b in value.split(",") if b.strip()]
        prefix = route.upstream.prefix if route is not None else ""
        if counting:
            self._count(flow, ex, target, region, betas, prefix, route)
            return
        if ex.provider == providers.BEDROCK:
            target = target or providers.bedrock_model_id(model, region)
            body, stream, dropped = providers.bedrock_body(dict(ex.body), betas)
            request.path = f"{prefix}/model/{target}/{'invoke-with-response-stream' if stream else 'invoke'}"
            for name in ANTHROPIC_ONLY:
                request.headers.pop(name, None)
            request.headers["accept"] = "application/vnd.amazon.eventstream" if stream else "application/json"
        else:
            target = target or providers.vertex_model_id(model)
            body, stream, kept, dropped = providers.vertex_body(dict(ex.body), betas)
            project = route.project if route is not None else ""
            request.path = (f"{prefix}/v1/projects/{project}/locations/{region}/publishers/anthropic/models/"
                            f"{target}:{'streamRawPredict' if stream else 'rawPredict'}")
            for name in ANTHROPIC_ONLY:
                request.headers.pop(name, None)
            if kept:
                request.headers["anthropic-beta"] = ",".join(kept)
        request.content = jsoncodec.dumps(body)
        ex.note(f"translated for {ex.provider}: {clean(model)} -> {clean(target)}"
                + (f"; dropped {', '.join(dropped)}" if dropped else ""))
        exchange.publish(flow, ex)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        response = flow.response
        if (ex is None or not ex.translated or ex.provider != providers.BEDROCK or response is None
                or response.status_code >= 400 or not is_eventstream(response)):
            return
        asyncio.get_running_loop().call_later(PING_INTERVAL, self._ping, flow, time.monotonic())

    def _ping(self, flow: http.HTTPFlow, last_ping: float) -> None:
        """One look at a translated Bedrock stream (one timer per stream, no task): a ping if the upstream and
        the pings have both been silent for PING_INTERVAL; then the next look, until the stream ends."""
        try:
            stream = relay.of(flow)
            if stream is None or not flow.live or stream.final is not None:
                return  # ended, or being ended by the gateway
            now = time.monotonic()
            last = max(stream.last_chunk, last_ping)
            if now - last >= PING_INTERVAL:
                if not layers.send_to_client(flow, sse.PING):
                    return  # the stream is no longer under way
                last = last_ping = now
            asyncio.get_running_loop().call_later(max(last + PING_INTERVAL - now, 0.01), self._ping, flow, last_ping)
        except Exception:  # a keep-alive timer must never cost the exchange
            logger.exception("ping timer")

    @staticmethod
    def _count(flow: http.HTTPFlow, ex: exchange.Exchange, target: str | None, region: str | None, betas: list[str],
               prefix: str, route) -> None:
        """count_tokens: Bedrock's CountTokens (its `{"inputTokens": N}` becomes `{"input_tokens": N}` in
        pipeline/answer.py), or Vertex's `count-tokens:rawPredict`, which takes the model in the body and answers
        Anthropic's shape."""
        request, model = flow.request, ex.model_requested or ""
        for name in ANTHROPIC_ONLY:
            request.headers.pop(name, None)
        if ex.provider == providers.BEDROCK:
            target = providers.foundation_model_id(target or providers.bedrock_model_id(model, region))
            request.path = f"{prefix}/model/{target}/count-tokens"
            body = providers.bedrock_count_request(dict(ex.body), betas)
        else:
            target = target or providers.vertex_model_id(model)
            body, _, kept, _ = providers.vertex_body(dict(ex.body), betas)
            body["model"] = target
            request.path = (f"{prefix}/v1/projects/{route.project if route else ''}/locations/{region}/publishers/"
                            "anthropic/models/count-tokens:rawPredict")
            if kept:
                request.headers["anthropic-beta"] = ",".join(kept)
        request.headers["accept"] = "application/json"
        request.content = jsoncodec.dumps(body)
        ex.note(f"count_tokens translated for {ex.provider}: {clean(model)} -> {clean(target)}")
        exchange.publish(flow, ex)
