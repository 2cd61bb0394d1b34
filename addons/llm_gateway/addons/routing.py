"""Which flows are LLM API flows, and where they go.

API flows are recognised by host and path globs in egress (regular) mode, and by the path alone on the
base-URL (reverse) listener: everything that arrives there at an API path is an API exchange, whatever the
reverse target is (`scripts/gateway --upstream http://litellm:4000` must not switch the gateway off because
`apis[].hosts` names api.anthropic.com). They get an `Exchange`, keep their request bodies buffered so later parts can rewrite them, and
may be re-sent to another upstream. The body is read later, by `BodyLimit` (addons/bodies.py), once it is known
to be within `limits.request_body`. Everything else is left alone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mitmproxy import http

from llm_gateway.pipeline import exchange
from llm_gateway.pipeline.flows import proxy_mode
from llm_gateway.policy.routing import match_api, match_route
from llm_gateway.protocol.hosts import normalize_host


if TYPE_CHECKING:
    from llm_gateway.addons.rulefile import RuleFile
    from llm_gateway.policy.spec import Route

logger = logging.getLogger("llm_gateway.routing")


class ApiRouter:
    def __init__(self, rule_file: RuleFile) -> None:
        self.rule_file = rule_file

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or exchange.of(flow):
            return
        rules = self.rule_file.rules
        mode = proxy_mode(flow)
        if mode == "reverse" and flow.request.authority:
            # An absolute-form target (`POST http://other.example/v1/messages`, RFC 9112 section 3.2.2) on the
            # base-URL listener: mitmproxy sends it on as it came, naming another host to an upstream that may
            # be a proxy itself. Origin form, as for every request there: the target is the operator's.
            flow.request.authority = ""
        host = normalize_host(flow.request.host)
        api = match_api(rules, None if mode == "reverse" else host, flow.request.path)
        if api is None:
            return
        # API request bodies are small and get rewritten: never stream them.
        flow.request.stream = False
        exchange.start(
            flow,
            exchange.Exchange(
                rules=rules,
                api=api.name,
                mode=mode,
                method=flow.request.method,
                host=host,
                path=flow.request.path,
                user_agent=flow.request.headers.get("user-agent"),
                provider=api.provider,
            ),
        )

    def request(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or flow.response:
            return
        route = ex.route = match_route(ex.rules, ex.api, ex.mode, ex.host, ex.path)
        if route is None:
            ex.upstream = f"{flow.request.scheme}://{flow.request.host}:{flow.request.port}"
        else:
            self.aim(flow, ex, route)
        exchange.publish(flow, ex)

    @staticmethod
    def aim(flow: http.HTTPFlow, ex: exchange.Exchange, route: Route) -> None:
        """Send the request to `route`'s upstream, in its provider's format: the per-upstream step, also for the
        next upstream of a failover (addons/failover.py, after it put back the request as routing found it)."""
        up = route.upstream
        request = flow.request
        # Each setter rewrites mitmproxy's request (the host one also its Host header and authority): only
        # what differs is set, which for a base-URL listener already aimed at the upstream is nothing.
        if request.scheme != up.scheme:
            request.scheme = up.scheme
        if request.host != up.host or request.port != up.port:
            request.host = up.host
            request.port = up.port
        if up.prefix:
            request.path = up.prefix + request.path
        if request.host_header != up.host_header:
            request.host_header = up.host_header
        ex.upstream = str(up)
        ex.note(f"routed to {up}")
        if route.provider != ex.provider:  # served in another provider's format: addons/translate.py
            ex.provider, ex.translated = route.provider, True
