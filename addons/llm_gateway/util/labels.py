"""Label values that come from requests, kept few: a metric series is held for every distinct value until the
process stops, and a client chooses its model (or client) name freely. Used by the Prometheus counters
(addons/metrics.py) and the OpenTelemetry GenAI metrics (addons/otel.py)."""

from __future__ import annotations

from llm_gateway.util.logsafe import clean

MAX_VALUES = 64  # distinct values per label before "other"
OTHER = "other"


class Bounded:
    """Label values as they come (escaped: a `\\r` in a model name would break the exposition's lines),
    until there are `limit` of them; then "other"."""

    def __init__(self, limit: int = MAX_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str | None, default: str = "unknown") -> str:
        value = clean(value or default, 200)
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(value)
        return value
