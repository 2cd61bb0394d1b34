"""Prometheus metrics: what the usage records say, summed, for the platform's dashboards and alerts.

Counted once per finished API exchange (after `Usage` wrote its record, in the same `response`/`error`
hook), labelled by client and model, never by session: labels must stay few, and a session id is new
every run. Client and model names come from requests, so each label keeps at most `MAX_VALUES` distinct
values and folds the rest into "other".

Egress decisions are counted from the egress records as `RecordLog` writes them (its `observers`):
the egress addon writes exactly one record per decision, including those it takes on a TLS ClientHello,
where there is no flow. The exposition is served by `endpoints.Endpoints`.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from mitmproxy import http
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import choose_encoder

from llm_gateway.pipeline import exchange
from llm_gateway.policy import cachewatch
from llm_gateway.protocol import errors
from llm_gateway.protocol.tokens import TOKEN_FIELDS, full_price_prompt_tokens, token
from llm_gateway.records.schema import INCOMPLETE, NO_RESPONSE, outcome
from llm_gateway.util.labels import MAX_VALUES, OTHER  # noqa: F401 - MAX_VALUES kept under its old name here
from llm_gateway.util.labels import Bounded as _Bounded

if TYPE_CHECKING:
    from llm_gateway.addons.recordlog import RecordLog

logger = logging.getLogger("llm_gateway.metrics")

MAX_LABEL_SETS = 4096  # raw label value sets whose children are kept (`Metrics._labels`)
# error_type label values: the native types, and the two outcomes without one
ERROR_KINDS = frozenset(errors.STATUS_BY_ERROR_TYPE) | {INCOMPLETE, NO_RESPONSE}
TOKEN_KINDS = dict(zip(("input", "output", "cache_read", "cache_write"), TOKEN_FIELDS))  # label -> field
_DECISION = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class Metrics:
    def __init__(self, records: RecordLog | None = None) -> None:
        # A registry of our own: a reloaded script registers its metrics again without clashing, and
        # the exposition holds the gateway's numbers only.
        self.registry = CollectorRegistry()
        labels = ["client", "model"]
        r = self.registry
        self.requests = Counter(
            "llm_gateway_requests", "API exchanges finished, by HTTP status ('none': no response)",
            [*labels, "status"], registry=r,
        )
        self.tokens = Counter(
            "llm_gateway_tokens", "Tokens reported in usage, by kind: input, output, cache_read, cache_write",
            [*labels, "kind"], registry=r,
        )
        self.cache_hit_ratio = Gauge(
            "llm_gateway_cache_hit_ratio",
            "Share of prompt tokens read from cache since start: cache_read / (input + cache_read + cache_write)",
            labels, registry=r,
        )
        self.cache_breaks = Counter(
            "llm_gateway_cache_breaks", "Requests of a session that had cached its prompt and read none of it",
            labels, registry=r,
        )
        self.cache_break_reasons = Counter(
            "llm_gateway_cache_break_reasons", "Cache breaks by the reason the gateway found (see cachewatch.REASONS)",
            ["client", "reason"], registry=r,
        )
        self.errors = Counter(
            "llm_gateway_errors",
            "Exchanges that failed or are unfinished (records/schema.outcome), by native error type, "
            "'incomplete' (cut short) or 'no_response'", [*labels, "error_type"],
            registry=r,
        )
        self.unwrapped = Counter(
            "llm_gateway_unwrapped_errors",
            "Errors restored to Anthropic's native form from a proxy's envelope or a stream error event",
            [*labels, "error_type"], registry=r,
        )
        self.egress = Counter(
            "llm_gateway_egress_decisions", "Egress policy decisions (egress mode), by decision", ["decision"],
            registry=r,
        )
        self.ended_early = Counter(
            "llm_gateway_ended_early",
            "Exchanges the gateway ended or refused itself, by the record's reason: first_byte_timeout, "
            "stream_idle_timeout, shutdown, request_too_large",
            ["reason"], registry=r,
        )
        self.heads_refused = Counter(
            "llm_gateway_heads_refused",
            "HTTP/1 heads longer than gateway_head_size_limit, refused (addons/heads.py), by side: request, "
            "next_request (sent while the last request was answered), answer (an upstream's), request_body and "
            "answer_body (a chunked body's chunk-size or trailer line)",
            ["side"], registry=r,
        )
        self.principal_requests = Counter(
            "llm_gateway_principal_requests",
            "API exchanges finished, by principal (the gateway token's name; 'none': no token) and HTTP status",
            ["principal", "status"], registry=r,
        )
        self.principal_tokens = Counter(
            "llm_gateway_principal_tokens", "Tokens reported in usage, by principal and kind", ["principal", "kind"],
            registry=r,
        )
        self._clients, self._models, self._principals = _Bounded(), _Bounded(), _Bounded()
        self._prompt: dict[tuple[str, str], list[int]] = {}  # (client, model) -> [cache_read, all prompt tokens]
        self._children: dict[tuple, Any] = {}  # (metric, label values) -> its child
        self._label_sets: dict[tuple, tuple] = {}  # raw (client, model, principal, status) -> `_labels`
        if records is not None:
            records.observers.append(self.record)

    def exposition(self, accept: str | None = None) -> tuple[str, bytes]:
        """(content type, body): the format the scraper's Accept header asks for (OpenMetrics or text)."""
        encoder, content_type = choose_encoder(accept or "")
        return content_type, encoder(self.registry)

    # -- API exchanges -------------------------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        self._exchange(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._exchange(flow)

    def _exchange(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or ex.metered:
            return
        ex.metered = True
        try:
            self.observe(ex, ex.status)  # what the client got (pipeline/answer.py), as the record says
        except Exception:  # metrics must never cost an exchange
            logger.exception("metrics")

    def observe(self, ex: exchange.Exchange, status: int | None) -> None:
        labels = self._labels(ex.client, ex.model, ex.principal, status)
        client, model, requests, principal_requests, tokens = labels
        requests.inc()
        principal_requests.inc()
        usage = ex.usage
        if usage:
            for field, child, principal_child in tokens:
                n = token(usage, field)
                if n:
                    child.inc(n)
                    principal_child.inc(n)
        read = token(usage, "cache_read_input_tokens") or 0
        prompt = read + full_price_prompt_tokens(usage)
        if prompt:
            totals = self._prompt.setdefault((client, model), [0, 0])
            totals[0] += read
            totals[1] += prompt
            self._child(self.cache_hit_ratio, client, model).set(totals[0] / totals[1])
        if ex.reason:
            self._child(self.ended_early, ex.reason).inc()
        if ex.cache_break:
            self._child(self.cache_breaks, client, model).inc()
            if ex.cache_break_reason in cachewatch.REASONS:
                self._child(self.cache_break_reasons, client, ex.cache_break_reason).inc()
        found = outcome(status, ex.error_type, ex.complete)  # as the record, gateway.stats and the report say
        if found.error:
            kind = found.kind if found.kind in ERROR_KINDS else OTHER
            self._child(self.errors, client, model, kind).inc()
            if ex.unwrapped:
                self._child(self.unwrapped, client, model, kind).inc()

    def _labels(self, client: str | None, model: str | None, principal: str | None, status: int | None) -> tuple:
        """(client label, model label, and the counters every exchange with these values adds to: its requests,
        and its tokens by kind, which start at 0 as Prometheus advises for counters), kept per
        raw value set: an agent fleet sends the same few again and again, and escaping and bounding the values
        and finding the children cost more than the counting. At most MAX_LABEL_SETS are kept."""
        key = (client, model, principal, status)
        found = self._label_sets.get(key)
        if found is None:
            if len(self._label_sets) >= MAX_LABEL_SETS:
                self._label_sets.clear()
            client_label, model_label = self._clients(client), self._models(model)
            principal_label = self._principals(principal, "none")
            status_label = str(status) if status else "none"
            found = self._label_sets[key] = (
                client_label, model_label,
                self._child(self.requests, client_label, model_label, status_label),
                self._child(self.principal_requests, principal_label, status_label),
                tuple((field, self._child(self.tokens, client_label, model_label, kind),
                       self._child(self.principal_tokens, principal_label, kind)) for kind, field in TOKEN_KINDS.items()),
            )
        return found

    def _child(self, metric, *labels: str):
        """The labelled child of a metric, looked up in prometheus_client (a lock and a few tuples) once per
        label set, then kept: the label values are bounded, so the children are too."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- egress decisions ----------------------------------------------------------------------------

    def record(self, record: dict[str, Any]) -> None:
        """A `RecordLog` observer: counts egress decision records."""
        decision = record.get("decision")
        if record.get("kind") == "egress" and isinstance(decision, str):
            count = record.get("count", 1)  # a summary record stands for `count` allowed decisions
            count = count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 1
            self.egress.labels(decision if _DECISION.fullmatch(decision) else OTHER).inc(count)
