"""Failover: a route with several upstreams (`upstream: [url, {url: …, provider: bedrock, region: …}]`,
policy/failover.py) sends the request to the next one when one fails before the first byte of its answer reached
the client: a connect failure, a 5xx answer (529 `overloaded_error` among them) or a connection closed before the
answer's headers. An answer that began (its headers passed on) is never retried.

The request is the one the client sent, as the request hook left it before its translation: taken here after
routing, key custody and the stream preference; put back for each next upstream, which then gets the routing
addon's per-upstream step (`ApiRouter.aim`), key custody, translation and signing again (its own provider, model
id, path, signature). mitm/layers.py's `arm_failover` does the re-sending inside mitmproxy's HttpStream.

The record says who answered (`upstream`, `provider`, `translated`) and who failed before (`failed_upstreams`:
`{upstream, reason}` in order). A failed attempt's answer is never seen by the other parts (no record of its own,
no quota, no metric): only the answer the client gets is.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import http

from llm_gateway.mitm import layers, serializers
from llm_gateway.pipeline import exchange
from llm_gateway.policy.failover import serving
from llm_gateway.util.logsafe import clean
from llm_gateway.util.secretmask import scrub_text, secret_forms

logger = logging.getLogger("llm_gateway.failover")

Step = Callable[[http.HTTPFlow], None]


def retryable(status: int) -> bool:
    """An answer another upstream may serve better: 5xx (Anthropic's 529 overloaded_error, Bedrock's 503
    ServiceUnavailableException, Vertex's 503 UNAVAILABLE, a proxy's 502/504)."""
    return status >= 500


@dataclass
class _Saved:
    headers: http.Headers
    content: bytes | None
    provider: str  # the API's own format, before any route translated it


class Failover:
    """Arms failover for flows whose route lists several upstreams; re-aims them on `gateway_failover`.
    `aim` is the routing addon's per-upstream step; `steps` the request hooks to run again for each next upstream,
    in order (key custody, translation, cloud signing), handed in by app.py."""

    def __init__(self, aim: Callable[[http.HTTPFlow, exchange.Exchange, object], None], steps: list[Step]) -> None:
        self.aim = aim
        self.steps = steps
        self._saved: weakref.WeakKeyDictionary[http.HTTPFlow, _Saved] = weakref.WeakKeyDictionary()

    def request(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or flow.response:
            return
        route = ex.route
        if route is None or not route.fallbacks:
            return
        provider = next((api.provider for api in ex.rules.apis if api.name == ex.api), ex.provider)
        self._saved[flow] = _Saved(flow.request.headers.copy(), flow.request.raw_content, provider)

        def next_upstream(reason: str) -> bool:
            if len(ex.failed_upstreams) >= len(route.fallbacks) or not flow.live:
                return False
            # mitmproxy's words may quote the upstream's bytes: a secret it echoed is masked before the cut
            reason = scrub_text(reason, secret_forms(serializers.sent_secrets(flow.request)))
            ex.failed_upstreams.append({"upstream": ex.upstream or "", "reason": reason[:200]})
            logger.warning(f"upstream {ex.upstream} failed ({clean(reason[:200])}); trying the next one "
                           f"for {clean(ex.host + ex.path)}")
            return True

        if not layers.arm_failover(flow, next_upstream, retryable):
            logger.warning(f"no failover for {clean(ex.host + ex.path)}: mitmproxy's stream was not found")

    def gateway_failover(self, flow: http.HTTPFlow) -> None:
        """The next upstream: the request as routing found it, aimed and prepared again."""
        ex, saved = exchange.of(flow), self._saved.get(flow)
        if ex is None or saved is None:
            return
        route = serving(ex.route, len(ex.failed_upstreams))
        request = flow.request
        request.headers = saved.headers.copy()
        request.raw_content = saved.content
        request.path = ex.path
        ex.provider, ex.translated = saved.provider, False
        ex.note(f"failover after {ex.failed_upstreams[-1]['reason']}")
        self.aim(flow, ex, route)
        exchange.publish(flow, ex)
        for step in self.steps:
            step(flow)
            if flow.response is not None:
                return

    def response(self, flow: http.HTTPFlow) -> None:
        self._saved.pop(flow, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self._saved.pop(flow, None)
