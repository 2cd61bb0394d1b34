"""What the gateway says once it listens: where each base-URL listener really sends API requests, and
the set-ups that would quietly not work.

- A banner line per base-URL (reverse) listener naming the destination the rules give its API requests
  (a route may send them elsewhere than the reverse target mitmproxy's own line names).
- A warning when a listener was given no address: mitmproxy then listens on every network interface, so
  anyone who can reach the machine can use the gateway (and its upstream credentials).
- A warning for `connection_strategy=eager` with a base-URL listener: mitmproxy then dials the reverse
  target when a client connects, before any route applies, so without DNS for it every request fails.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mitmproxy import ctx
from mitmproxy.proxy import mode_specs

from llm_gateway.policy.rules import Rules
from llm_gateway.protocol.hosts import normalize_host

if TYPE_CHECKING:
    from llm_gateway.addons.rulefile import RuleFile

logger = logging.getLogger("llm_gateway.startup")


def api_destinations(rules: Rules, target: mode_specs.ReverseMode) -> str:
    """Where a reverse listener's API requests go, by the first routes that can match them:
    `http://litellm:4000/anthropic (routes[0])`, or several `for <path glob>` parts, then the target."""
    host = normalize_host(target.address[0])
    apis = {api.name for api in rules.apis}
    parts = []
    for i, route in enumerate(rules.routes):
        if route.mode not in (None, "reverse") or (route.api is not None and route.api not in apis):
            continue
        if route.host is not None and not route.host.match(host):
            continue
        api = f" of {route.api}" if route.api is not None and len(apis) > 1 else ""
        if route.path is None and not api:
            parts.append(f"{route.upstream} (routes[{i}])")
            return ", ".join(parts)
        parts.append(f"{route.upstream} for{api} paths {route.path or '*'} (routes[{i}])")
    parts.append(f"{target.data} (the reverse target, no route)" if parts else f"{target.data} (no route)")
    return ", ".join(parts)


def describe_listener(mode: mode_specs.ProxyMode) -> str:
    host = mode.listen_host(ctx.options.listen_host) or "*"
    return f"{host}:{mode.listen_port(ctx.options.listen_port)}"


class StartupReport:
    def __init__(self, rule_file: RuleFile) -> None:
        self.rule_file = rule_file

    def running(self) -> None:
        try:
            self.report()
        except Exception:  # a banner must never stop the gateway
            logger.exception("start-up report")

    def report(self) -> None:
        rules = self.rule_file.rules
        for spec in ctx.options.mode:
            mode = mode_specs.ProxyMode.parse(spec)
            if not mode.listen_host(ctx.options.listen_host):
                logger.warning(
                    f"the {mode.type_name} listener ({spec}) has no address and listens on every network interface: "
                    f"anyone who can reach this machine can use it. Bind it to 127.0.0.1, e.g. --mode "
                    f"{mode.full_spec.split('@')[0]}@127.0.0.1:{mode.listen_port(ctx.options.listen_port)}"
                )
            if not isinstance(mode, mode_specs.ReverseMode):
                continue
            if rules.apis:
                logger.info(f"base-URL listener {describe_listener(mode)}: API requests go to "
                            f"{api_destinations(rules, mode)}; other requests to {mode.data}")
            if ctx.options.connection_strategy == "eager":
                logger.warning(
                    f"connection_strategy=eager: the base-URL listener connects to {mode.data} as soon as a client "
                    f"connects, before any route applies; without DNS for it every request fails. "
                    f"Use --set connection_strategy=lazy (scripts/gateway does)"
                )
