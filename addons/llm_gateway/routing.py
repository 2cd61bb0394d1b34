"""Which flows are LLM API flows, and where they go.

API flows are recognised by host and path globs in egress (regular) mode, and by the path alone on the
base-URL (reverse) listener: everything that arrives there at an API path is an API exchange, whatever the
reverse target is (`scripts/gateway --upstream http://litellm:4000` must not switch the gateway off because
`apis[].hosts` names api.anthropic.com). They get an `Exchange`, keep their request bodies buffered so later parts can rewrite them, and
may be re-sent to another upstream. Everything else is left alone.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from . import exchange, leanjson
from .globs import glob_set
from .rulefile import RuleFile
from .rules import Api, Route, Rules

logger = logging.getLogger("llm_gateway.routing")


def match_api(rules: Rules, host: str | None, path: str) -> Api | None:
    """The first API whose host and path globs match; `host=None` (the base-URL listener) matches any host."""
    path = path.split("?", 1)[0]
    for api in rules.apis:
        if (host is None or glob_set(api.hosts).match(host)) and glob_set(api.paths).match(path):  # compiled once per rule load
            return api
    return None


def match_route(rules: Rules, api: str, mode: str, host: str, path: str) -> Route | None:
    path = path.split("?", 1)[0]
    for route in rules.routes:
        if (
            (route.host is None or route.host.match(host))
            and (route.path is None or route.path.match(path))
            and (route.mode is None or route.mode == mode)
            and (route.api is None or route.api == api)
        ):
            return route
    return None


def proxy_mode(flow: http.HTTPFlow) -> str:
    return flow.client_conn.proxy_mode.type_name


class ApiRouter:
    def __init__(self, rule_file: RuleFile) -> None:
        self.rule_file = rule_file

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or exchange.of(flow):
            return
        rules = self.rule_file.rules
        host = flow.request.host.lower().rstrip(".")
        mode = proxy_mode(flow)
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
            ),
        )

    def request(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or flow.response:
            return
        ex.body = leanjson.parse_request_body(flow.request.get_content(strict=False))
        if isinstance(ex.body, dict) and isinstance(ex.body.get("model"), str):
            ex.model = ex.body["model"][:200]
        route = match_route(ex.rules, ex.api, ex.mode, ex.host, ex.path)
        if route is None:
            ex.upstream = f"{flow.request.scheme}://{flow.request.host}:{flow.request.port}"
        else:
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
            ex.notes.append(f"routed to {up}")
        exchange.publish(flow, ex)
