"""Which API a request belongs to (`apis[]`: host and path globs) and where it goes (`routes[]`): decisions
on the rules alone, for addons/routing.py, the egress policy and key custody.
"""

from __future__ import annotations

from llm_gateway.policy.rules import Api, Route, Rules
from llm_gateway.protocol.hosts import path_of
from llm_gateway.util.globs import glob_set


def match_api(rules: Rules, host: str | None, path: str) -> Api | None:
    """The first API whose host and path globs match; `host=None` (the base-URL listener) matches any host."""
    path = path_of(path)
    for api in rules.apis:
        if (host is None or glob_set(api.hosts).match(host)) and glob_set(api.paths).match(path):  # compiled once per rule load
            return api
    return None


def match_route(rules: Rules, api: str, mode: str, host: str, path: str) -> Route | None:
    path = path_of(path)
    for route in rules.routes:
        if (
            (route.host is None or route.host.match(host))
            and (route.path is None or route.path.match(path))
            and (route.mode is None or route.mode == mode)
            and (route.api is None or route.api == api)
        ):
            return route
    return None
