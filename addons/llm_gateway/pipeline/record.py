"""The usage record of one exchange, built from what the answer pipeline left on the Exchange: tokens,
cost (US dollars), the cache break, and what the client received (`status`, `error_type`, `complete`,
`reason`). records/schema.py says what the fields mean.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from mitmproxy import http

from llm_gateway.pipeline import exchange
from llm_gateway.protocol.hosts import path_of
from llm_gateway.protocol.tokens import (
    TOKEN_FIELDS,
    cache_share,
    cache_write_split,
    token,
)


def build_record(flow: http.HTTPFlow, ex: exchange.Exchange, now: float) -> dict[str, Any]:
    """The usage record of one exchange: from the exchange alone, as the answer pipeline (pipeline/answer.py) left
    it; `status`, `error_type`, `request_id` and `reason` are what the client received."""
    usage = ex.usage
    five, hour = cache_write_split(usage)
    price = ex.cost()
    first_byte = ex.response_started
    return {
        "kind": "usage",
        "ts": datetime.fromtimestamp(ex.started, timezone.utc).isoformat(timespec="milliseconds"),
        "mode": ex.mode,
        "client": ex.client,
        "principal": ex.principal,
        "session": ex.session,
        "agent_id": ex.agent_id,
        "parent_agent_id": ex.parent_agent_id,
        "api": ex.api,
        "method": ex.method,
        "host": ex.host,
        "path": path_of(ex.path),
        "upstream": ex.upstream,
        "provider": ex.provider,
        "translated": ex.translated,
        "failed_upstreams": list(ex.failed_upstreams),
        "model": ex.model,
        "status": ex.status,
        "stream_requested": ex.stream_requested,
        "stream_upstream": ex.stream_upstream,
        **{key: token(usage, key) for key in TOKEN_FIELDS},
        "cache_creation_5m_input_tokens": five,
        "cache_creation_1h_input_tokens": hour,
        "cache_hit_share": cache_share(usage),
        "cost_usd": price.cost_usd,
        "saved_usd": price.saved_usd,
        "price_source": price.source,
        "request_id": ex.request_id,
        "error_type": ex.error_type,
        "reason": ex.reason,
        "quota_limits": list(ex.quota_limits) or None,
        "quota_refused": ex.quota_refused,
        "unwrapped": ex.unwrapped,
        "unwrapped_from": ex.unwrapped_from,
        "converted": ex.converted,
        "cache_break": ex.cache_break,
        "cache_break_reason": ex.cache_break_reason,
        "cache_break_detail": ex.cache_break_detail,
        "cache_break_tokens_lost": ex.cache_break_tokens_lost,
        "cache_break_cost_usd": ex.cache_break_cost_usd,
        "complete": ex.complete,
        "user_agent": ex.user_agent if ex.client == "unknown" else None,
        "ttfb_ms": round((first_byte - ex.started) * 1000, 1) if first_byte else None,
        "duration_ms": round((now - ex.started) * 1000, 1),
    }
