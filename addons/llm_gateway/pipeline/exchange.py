"""What the gateway knows about one API exchange, shared by every addon that handles it.

The live object sits beside the flow (not in `flow.metadata`, which must stay serialisable for
`-w` and mitmweb export); `publish` copies its plain summary into `flow.metadata["gateway"]`.
It holds the rules that were in force when the request arrived, so a reload in the middle of an
exchange never mixes old and new rules.
"""

from __future__ import annotations

import bisect
import functools
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mitmproxy import http

from llm_gateway.policy.cachewatch import CacheWatch
from llm_gateway.policy.pricing import Cost, cost, lost_cost, priced_key

if TYPE_CHECKING:
    from llm_gateway.policy.spec import Rules

METADATA_KEY = "gateway"


# The stages of a stream's taps, in the order each event passes them: secrets masked first (key custody's scrub),
# then read (the answer pipeline's reader: usage, model, errors), then copied for people (mitmweb's body copy).
SCRUB, READ, COPY = 0, 1, 2


class SSETap(Protocol):
    """A part that watches (and may rewrite) the events of a stream as they pass.

    A tap may also have `event_names`, the set of event names it reads (None for events without one):
    the relay then calls it for those events only, which keeps the path of every other event short. While
    no tap reads `content_block_delta` (the bulk of a stream), the relay sends those on without parsing
    them (pipeline/relay.py's quick path); a tap without `event_names` closes that path for its stream, unless it
    only copies events: such a tap has `on_raw(raw: bytes)`, which the quick path calls with the event's bytes,
    or acts only on events that hold certain bytes, named in `event_bytes` (the relay still may call it for others)."""

    def on_event(self, event: Any) -> Any | None:
        """Return the event to forward: the same one, a replacement, or None to keep it unchanged."""

    def on_end(self) -> bytes:
        """Called once when the upstream body ended cleanly; returns raw bytes to append (or b"")."""


@dataclass(eq=False, slots=True, weakref_slot=True)  # slots: one per API request, read by every hook
class Exchange:
    rules: Rules
    api: str
    mode: str
    method: str
    host: str
    path: str
    started: float = field(default_factory=time.time)
    upstream: str | None = None
    route: Any = field(default=None, repr=False)  # the rules' Route this request matched, decided once by addons/routing.py; None: none
    provider: str = "anthropic"  # whose wire format: anthropic | aws.bedrock | gcp.vertex_ai (protocol/providers.py)
    translated: bool = False  # an Anthropic request a route sends to another provider (addons/translate.py)
    failed_upstreams: list[dict[str, str]] = field(default_factory=list)  # failover: {upstream, reason}, in order
    body: Any = None  # the request JSON, parsed once; None when empty or not JSON
    client: str = "unknown"
    session: str | None = None
    agent_id: str | None = None  # Claude Code's x-claude-code-agent-id: which agent (a subagent) of the session
    parent_agent_id: str | None = None  # x-claude-code-parent-agent-id: the agent that started it
    user_agent: str | None = None
    model_requested: str | None = None  # what the request asks for (addons/routing), cut to 200 characters
    stream_preference: str = "as-sent"  # from the matched client rule
    stream_requested: bool | None = None
    stream_upstream: bool | None = None
    principal: str | None = None  # the gateway token's (or pass-through rule's) name (addons/credentials.py)
    quota_limits: tuple[str, ...] = ()  # the budgets and rates it counted against (addons/quotas)
    quota_refused: str | None = None  # the limit that refused it ("store" when the quota store could not answer)
    # filled while the response passes
    response_started: float | None = None
    message: dict[str, Any] | None = None  # the answer as a Message, where a part already built it
    usage: dict[str, Any] | None = None
    model_answered: str | None = None  # the model the answer names (pipeline/answer, pipeline/reader)
    response_id: str | None = None  # the Message's `id` ("msg_…"), cut to 200 characters
    stop_reason: str | None = None  # the Message's `stop_reason` ("end_turn", "tool_use", …), cut to 200 characters
    priced: Any = field(default=None, repr=False)  # `cost()`'s memo: ((model, priced_key), Cost)
    # what the client received, decided once by pipeline/answer.py (settle / settle_failure)
    status: int | None = None
    request_id: str | None = None
    error_type: str | None = None
    unwrapped: bool = False
    unwrapped_from: str | None = None
    converted: str | None = None  # "sse->json" | "json->sse"
    complete: bool = False
    reason: str | None = None  # why the exchange ended early or failed (e.g. "first_byte_timeout")
    cache_break: bool = False
    cache_break_reason: str | None = None  # why (cachewatch.REASONS), when cache_break
    cache_break_detail: str | None = None  # e.g. "system block 2 changed"
    cache_break_tokens_lost: int | None = None  # cached before, not read now
    cache_break_cost_usd: float | None = None  # what those tokens cost more than a cache read (None: no price)
    recorded: bool = False
    metered: bool = False  # counted in the metrics (addons/metrics.py): once, whether the exchange ends in response or error
    notes: list[str] = field(default_factory=list)
    sse_taps: list[SSETap] = field(default_factory=list)  # in stage order: see `add_tap`
    tap_stages: list[int] = field(default_factory=list)  # the stage of each tap in sse_taps
    on_flow_gone: Any = field(default=None, repr=False)  # see `start`
    span: Any = field(default=None, repr=False)  # the OpenTelemetry span while the exchange runs (addons/otel.py)

    @property
    def model(self) -> str | None:
        """The model priced, recorded and counted: the one that answered, else the one asked for."""
        return self.model_answered or self.model_requested

    def stop(self, reason: str) -> None:
        """Say why the exchange ended early or failed (e.g. "first_byte_timeout"). The first reason stands: a
        timeout that ends a stream is why it ended, not the cut stream that follows."""
        if self.reason is None:
            self.reason = reason

    def note(self, text: str) -> None:
        """Add a line for people (mitmweb's comment, the log line); notes are only ever added."""
        self.notes.append(text)

    def add_tap(self, tap: SSETap, stage: int) -> None:
        """Add a stream tap in its stage (`SCRUB` < `READ` < `COPY`), after the taps already in that stage: the
        order in which taps see each event is declared here, not a side effect of which addon's hook ran first."""
        at = bisect.bisect_right(self.tap_stages, stage)
        self.tap_stages.insert(at, stage)
        self.sse_taps.insert(at, tap)

    def release(self) -> None:
        """Let go of the parsed request and answer: once the record is built, or when the request is refused."""
        self.body = self.message = None

    def cost(self) -> Cost:
        """The price of this exchange (its rules' `pricing`, `model` and `usage`), worked out once for its
        record, its log line and its mitmweb comment, and again only when the model or the token counts changed."""
        key = (self.model, priced_key(self.usage) if self.usage else None)
        if self.priced is not None and self.priced[0] == key:
            return self.priced[1]
        found = cost(self.rules.pricing, self.model, self.usage)
        self.priced = (key, found)
        return found

    def explain_break(self, watch: CacheWatch) -> None:
        """Observe one successful exchange and, on a break, fill the exchange's `cache_break*` fields (record, log,
        mitmweb comment and metrics read them there)."""
        usage = self.rules.usage
        found = watch.observe(
            self.session, self.usage, self.body, self.started,
            {"5m": usage.cache_ttl_5m, "1h": usage.cache_ttl_1h}, usage.cache_sessions,
        )
        self.cache_break = found is not None
        if found is not None:
            self.cache_break_reason, self.cache_break_detail = found.reason, found.detail
            self.cache_break_tokens_lost = found.tokens_lost
            self.cache_break_cost_usd = lost_cost(self.rules.pricing, self.model, found.tokens_lost, self.usage)

    def break_text(self) -> str:
        """"lost 9800 cached tokens ($0.0265): system_changed (system block 2 changed)", for log lines and comments."""
        cost = f" (${self.cache_break_cost_usd:.4f})" if self.cache_break_cost_usd is not None else ""
        return f"lost {self.cache_break_tokens_lost} cached tokens{cost}: {self.cache_break_reason} ({self.cache_break_detail})"

    def summary(self) -> dict[str, Any]:
        """The plain, serialisable view kept in flow.metadata."""
        return {
            "api": self.api,
            "mode": self.mode,
            "client": self.client,
            "principal": self.principal,
            "session": self.session,
            "quota_limits": list(self.quota_limits),
            "quota_refused": self.quota_refused,
            "user_agent": self.user_agent,
            "model": self.model,
            "upstream": self.upstream,
            "provider": self.provider,
            "translated": self.translated,
            "failed_upstreams": list(self.failed_upstreams),
            "stream_requested": self.stream_requested,
            "stream_upstream": self.stream_upstream,
            "converted": self.converted,
            "status": self.status,
            "error_type": self.error_type,
            "unwrapped": self.unwrapped,
            "unwrapped_from": self.unwrapped_from,
            "complete": self.complete,
            "reason": self.reason,
            "cache_break": self.cache_break,
            "cache_break_reason": self.cache_break_reason,
            "cache_break_detail": self.cache_break_detail,
            "usage": dict(self.usage) if self.usage else None,
        }


# The live exchange is an attribute of its flow (mitmproxy's flows have no __slots__; `get_state`, and so
# `-w`, flow copies and mitmweb, never see it): every hook of every concern looks it up, and a dict lookup
# on the flow costs a tenth of a WeakKeyDictionary's (which builds a weak reference per lookup).
_ATTRIBUTE = "_llm_gateway_exchange"


def start(flow: http.HTTPFlow, exchange: Exchange) -> Exchange:
    flow.__dict__[_ATTRIBUTE] = exchange
    # The taps on the exchange hold the exchange: a reference cycle, with the parsed request and answer
    # inside it, that only the garbage collector frees, after it has promoted all of it to the oldest
    # generation (full collections were most of the gateway's CPU cost per request). Cut it when the
    # flow goes, so the exchange is freed at once.
    exchange.on_flow_gone = weakref.ref(flow, functools.partial(_release, weakref.ref(exchange)))
    publish(flow, exchange)
    return exchange


def _release(exchange: weakref.ref[Exchange], _flow: weakref.ref) -> None:
    ex = exchange()
    if ex is not None:
        ex.sse_taps.clear()
        ex.tap_stages.clear()


def of(flow: http.HTTPFlow) -> Exchange | None:
    """The flow's exchange, or None for flows that are not LLM API traffic (and for copies of a flow)."""
    return flow.__dict__.get(_ATTRIBUTE)


# Whether `publish` writes flow.metadata: the summary is for people looking at flows (mitmweb, the console,
# saved flows); addons/webview.WebView turns it off where nobody can (plain mitmdump, `gateway_flow_notes`).
publishing = True


def publish(flow: http.HTTPFlow, exchange: Exchange) -> None:
    """Copy the exchange's plain summary into `flow.metadata["gateway"]` (when `publishing`)."""
    if publishing:
        flow.metadata[METADATA_KEY] = exchange.summary()


