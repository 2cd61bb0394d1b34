"""A route's list of upstreams (failover): the first serves; on a connect failure, a 529/5xx or a connection closed
before the first byte of the answer, the next one serves the same request (addons/failover.py, mitm/layers.py).

    routes:
      - match: {api: anthropic}
        upstream:
          - https://api.example.com                      # a URL: Anthropic's format, as the client sent it
          - {url: https://bedrock-runtime.us-east-1.amazonaws.com, provider: bedrock, region: us-east-1}

Each entry is a URL or a mapping with `url` and the translation keys a route takes (`provider`, `region`,
`project`, `models`: policy/clouds.py's `read_translation`); with a list, those keys belong in the entries, not
beside `upstream`. Read with rules.py's `_Reader` (file, line, reason).
"""

from __future__ import annotations

from typing import Any

import yaml

from llm_gateway.policy import clouds
from llm_gateway.policy.spec import Route

TRANSLATION_KEYS = ("provider", "region", "project", "models")


def read_upstreams(reader: Any, m: dict, where: str) -> list[Route]:
    """The routes' targets in order, as `Route`s without matchers (the first becomes the route itself)."""
    beside = [k for k in TRANSLATION_KEYS if k in m]
    if beside:
        raise reader.fail(m[beside[0]], f"{where}.{beside[0]}: with a list of upstreams, put {beside[0]} in the "
                                        f"upstream's own entry ({{url: …, {beside[0]}: …}})")
    items = reader.seq(m["upstream"], f"{where}.upstream")
    if not items:
        raise reader.fail(m["upstream"], f"{where}.upstream: the list needs at least one upstream")
    targets = []
    for i, item in enumerate(items):
        here = f"{where}.upstream[{i}]"
        if isinstance(item, yaml.MappingNode):
            e = reader.mapping(item, here, {"url": True, **dict.fromkeys(TRANSLATION_KEYS, False)})
            targets.append(Route(**clouds.read_translation(reader, e, here), upstream=reader.upstream(e["url"], f"{here}.url")))
        else:
            targets.append(Route(upstream=reader.upstream(item, here)))
    return targets


def serving(route: Route | None, failed: int) -> Route | None:
    """The route's target serving now, after `failed` of its upstreams failed (the route itself first)."""
    if route is None or failed == 0 or not route.fallbacks:
        return route
    return route.fallbacks[min(failed, len(route.fallbacks)) - 1]
