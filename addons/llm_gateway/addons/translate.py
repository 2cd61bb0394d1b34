"""Translation: an Anthropic Messages request (any client) served by Amazon Bedrock, for a route with
`provider: bedrock` (policy/clouds.py's `read_translation`).

The request becomes an InvokeModel call: the path `/model/<Bedrock id>/invoke` (or `/invoke-with-response-stream`
when the body asks to stream), the body without `model` and `stream`, with `anthropic_version` and the
`anthropic-beta` header's betas as `anthropic_beta`, less the fields Bedrock refuses together with their betas
(protocol/providers.py). addons/cloudauth.py then signs it with the gateway's AWS credentials; the answer comes
back to the client as Anthropic's own (pipeline/eventstream.py: the event stream as SSE; pipeline/answer.py:
Bedrock's errors as native errors). The model id: the route's `models` map first, else `bedrock_model_id`.

`count_tokens` has no translation here yet: the client gets a `501` native error of type `not_supported` with
`x-should-retry: false` rather than a request Bedrock would refuse.
"""

from __future__ import annotations

from mitmproxy import http

from llm_gateway.pipeline import exchange
from llm_gateway.policy.routing import match_route
from llm_gateway.protocol import errors, jsoncodec, providers
from llm_gateway.protocol.hosts import path_of
from llm_gateway.util.logsafe import clean

# Request headers that are Anthropic's alone (the key, the version: the body carries it for Bedrock)
ANTHROPIC_ONLY = ("x-api-key", "anthropic-version", "anthropic-beta", "authorization")


class ProviderTranslation:
    def request(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or flow.response or not ex.translated or ex.provider != providers.BEDROCK:
            return
        route = match_route(ex.rules, ex.api, ex.mode, ex.host, ex.path)
        request = flow.request
        if not path_of(ex.path).rstrip("/").endswith("/v1/messages") or not isinstance(ex.body, dict):
            # count_tokens and anything else: not translated (Bedrock's CountTokens takes another body)
            flow.response = http.Response.make(
                501, errors.error_json("not_supported", f"{path_of(ex.path)} is not supported on this route (Amazon Bedrock)"),
                {"content-type": "application/json", "x-should-retry": "false"})
            ex.note("not translated: answered 501 not_supported")
            return
        model = ex.model_requested or ""
        region = route.region if route is not None else None
        target = next((to for pattern, to in (route.models if route else ()) if pattern.match(model)), None)
        target = target or providers.bedrock_model_id(model, region)
        betas = [b.strip() for value in request.headers.get_all("anthropic-beta") for b in value.split(",") if b.strip()]
        body, stream, dropped = providers.bedrock_body(dict(ex.body), betas)
        action = "invoke-with-response-stream" if stream else "invoke"
        prefix = route.upstream.prefix if route is not None else ""
        request.path = f"{prefix}/model/{target}/{action}"
        for name in ANTHROPIC_ONLY:
            request.headers.pop(name, None)
        request.headers["accept"] = "application/vnd.amazon.eventstream" if stream else "application/json"
        request.content = jsoncodec.dumps(body)
        ex.note(f"translated for Bedrock: {clean(model)} -> {clean(target)}" + (f"; dropped {', '.join(dropped)}" if dropped else ""))
        exchange.publish(flow, ex)
