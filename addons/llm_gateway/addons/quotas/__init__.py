"""Cost ceiling: the `quotas` rules (policy/quotas.py) enforced before a request goes upstream, in both modes.

For each Messages request (`POST …/messages`; `count_tokens` is never refused) the addon finds the budgets and rates
it counts against, and in one atomic step of the store (store.py: memory, or Redis every replica shares) checks
each against what was spent **plus what exchanges in flight hold**, and reserves an estimate on each budget:

- input: the session's last prompt (its input-side cost, as recorded) plus the new bytes of this request at about
  4 bytes a token, else the whole body so; output: `max_tokens`; priced at the requested model (policy/pricing.py);
- the reservation is settled with the recorded cost (`Exchange.cost()`) when the exchange ends (`response` or
  `error`, so a client that leaves mid-stream is charged for the usage the stream reported), and expires on its
  own after `quotas.reservation_ttl` if the replica holding it dies. An admitted stream is never cut.

Admission is awaited in the async `request` hook (the event loop never blocks); settlement runs as a task, off
the answer's path. Refusals are Claude Code's own words (reference/claude-code-gateway-protocol.md):

- a budget: 429 `billing_error` (`details.error_code: spend_limit_reached` for the caller's own cap; the group
  form with `…-overage-scope: group_pool` for a pool), `x-should-retry: false`, `retry-after` to the reset, and
  the `anthropic-ratelimit-unified-*` rejection headers;
- a rate: 429 `rate_limit_error` with `retry-after` (the end of the minute), retryable;
- the store unreachable with `on_store_error: closed`: 429 `billing_error`, `x-should-retry: false`,
  `…-overage-disabled-reason: fetch_error`. With `open` (the default) the exchange is admitted and counted in this
  process's memory while the store is down, and the log says so (at most once every 10 seconds).

On every admitted answer counted against a budget, the upstream's own `anthropic-ratelimit-*` headers are replaced
by the caller's standing on its most used budget, so Claude Code shows its "You've used NN% …" notice past 75 %
and 95 %. The record holds `quota_limits` and `quota_refused`; metrics count spend and refusals by limit name.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mitmproxy import http
from prometheus_client import Counter as PromCounter

from llm_gateway.addons.quotas.store import MemoryStore, RedisStore, StoreError, Verdict
from llm_gateway.pipeline import exchange
from llm_gateway.pipeline.answer import native_answer
from llm_gateway.policy import pricing
from llm_gateway.policy import quotas as policy
from llm_gateway.policy.quotas import MICRO, RATELIMIT_PREFIX, UNIFIED, Counter
from llm_gateway.protocol.hosts import path_forms
from llm_gateway.protocol.tokens import token
from llm_gateway.util.files import file_stamp
from llm_gateway.util.logsafe import clean

if TYPE_CHECKING:
    from llm_gateway.addons.metrics import Metrics

logger = logging.getLogger("llm_gateway.quotas")

BYTES_PER_TOKEN = 4  # a rough mean for English text and code (Anthropic's docs: about 3.5 characters a token)
DEFAULT_MAX_TOKENS = 4096  # output reserved when a request names no max_tokens (the API requires one)
SESSIONS_KEPT = 10_000  # sessions whose last prompt is remembered for the estimate, least recent out
COUNTER_CACHE = 4096  # (principal, client, session, model, minute) -> its counters, kept until this many
RATES_KEPT = 256  # models whose per-token prices are remembered (the model comes from the request: bounded)
# A model neither the rules' `pricing` nor genai-prices knows (one released after the price list) is counted at
# the dearest Claude price list entry (claude-opus-4-1: $15 in, $75 out per million tokens, genai-prices): else it
# reserved and settled nothing, and no cap ever held for it.
UNPRICED_AS = "claude-opus-4-1"
PRICE_PROBE_TOKENS = 100_000  # tokens priced once per model for its per-token rates (below the 200K tier)
STORE_TIMEOUT = 1.0  # seconds an admission waits for the shared store before on_store_error decides
PASSWORD_RECHECK = 1.0  # seconds between two looks at quotas.password_file (a Secret rotated in place)
LOUD_EVERY = 10.0  # seconds between two log lines about the same store being down
SPEND_LIMIT_REACHED, RATE_LIMITED, FETCH_ERROR = "spend_limit_reached", "rate_limited", "fetch_error"


@dataclass(slots=True)
class Hold:
    """An admitted exchange's reservation, until it is settled."""

    store: Any
    counters: list[Counter]
    rid: str
    amount: int  # micro-dollars reserved on each budget counter
    standing: tuple[Counter, int] | None  # the most used budget counter and its level when admitted


def is_metered(ex: exchange.Exchange) -> bool:
    """Messages requests count; `count_tokens` (and anything else under the API paths) never does. Judged on every
    form a server may read the path in (protocol/hosts.path_forms: `/v1/messages/`, `/v1/%6Dessages`), so no
    spelling carries a request past its budget."""
    return ex.method == "POST" and any(form.rstrip("/").endswith("/messages") for form in path_forms(ex.path))


class Quotas:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self.local = MemoryStore()  # `memory` rules, and the count while a shared store is down (open)
        self._shared: tuple[tuple, Any] | None = None  # ((url, password source), RedisStore)
        self._holds: weakref.WeakKeyDictionary[http.HTTPFlow, Hold] = weakref.WeakKeyDictionary()
        self._last: OrderedDict[str, tuple[int, int, int]] = OrderedDict()  # session -> (bytes, input cost µ$, prompt tokens)
        self._tasks: set[asyncio.Task] = set()
        self._loud: dict[str, float] = {}
        self._stamped: tuple[float, tuple | None] = (-PASSWORD_RECHECK, None)  # (when, the password file's stamp)
        self._replica = uuid.uuid4().hex[:12]  # reservation ids: this process's prefix and a count
        self._n = 0
        self._rules: Any = None  # the rules the caches below were made for
        self._counter_cache: dict[tuple, tuple[Counter, ...]] = {}
        self._rates: dict[str | None, tuple[float, float]] = {}
        self.spend = self.refusals = self.store_errors = None
        if metrics is not None:
            r = metrics.registry
            self.spend = PromCounter("llm_gateway_quota_spend_usd",
                                     "US dollars settled against each quota budget (by budget name)", ["limit"], registry=r)
            self.refusals = PromCounter("llm_gateway_quota_refusals",
                                        "Requests refused by a quota, by limit name and reason (spend_limit_reached, "
                                        "rate_limited, fetch_error)", ["limit", "reason"], registry=r)
            self.store_errors = PromCounter("llm_gateway_quota_store_errors",
                                            "Quota store calls that failed, by step (admit, settle) and what was done "
                                            "(open: counted locally; closed: refused)", ["step", "on_store_error"],
                                            registry=r)

    # -- the store ---------------------------------------------------------------------------------------

    def store(self, q: policy.Quotas) -> Any:
        if q.store == "memory":
            return self.local
        if q.password_file and time.monotonic() - self._stamped[0] >= PASSWORD_RECHECK:
            self._stamped = (time.monotonic(), file_stamp(q.password_file))  # a rotated Secret: a new client
        source = (q.store, q.cluster, q.password_env, q.password_file, self._stamped[1] if q.password_file else None)
        if self._shared is None or self._shared[0] != source:
            if self._shared is not None:
                self._spawn(self._shared[1].close())
            self._shared = (source, RedisStore(q.store, _password(q), STORE_TIMEOUT, cluster=q.cluster))
        return self._shared[1]

    def done(self) -> None:
        if self._shared is not None:
            self._spawn(self._shared[1].close())

    # -- admission ---------------------------------------------------------------------------------------

    @inspect.markcoroutinefunction  # app.Dispatcher awaits what it returns; nothing to await without quotas
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        ex = exchange.of(flow)
        if ex is None or flow.response or not ex.rules.quotas.active or not is_metered(ex):
            return None
        return self._admit(flow, ex)

    async def _admit(self, flow: http.HTTPFlow, ex: exchange.Exchange) -> None:
        q = ex.rules.quotas
        now = time.time()
        counters = self._counters_of(ex, now)
        if not counters:
            return
        names = {c.name for c in counters}
        ex.quota_limits = tuple(item.name for item in (*q.budgets, *q.rates) if item.name in names)  # rule order
        self._n += 1
        rid = f"{self._replica}-{self._n}"  # unique across replicas without a uuid per request
        amount = self.estimate(ex, len(flow.request.raw_content or b""))
        store = self.store(q)
        try:
            if store is self.local:  # nothing to wait for: no coroutine, no timer
                verdict = store.admit_now(counters, rid, amount, q.reservation_ttl, now)
            else:
                verdict = await asyncio.wait_for(store.admit(counters, rid, amount, q.reservation_ttl, now),
                                                 STORE_TIMEOUT * 2)
        except (StoreError, asyncio.TimeoutError) as e:
            self._count_store_error("admit", q.on_store_error)
            self._loudly(q.store, f"quota store {q.store} failed ({clean(str(e) or 'timed out', 300)}); "
                                  + ("refusing requests (on_store_error: closed)" if q.on_store_error == "closed"
                                     else "admitting and counting in this process only (on_store_error: open)"))
            if store is not self.local:  # the script may have run, its answer lost: give its reservation back
                self._spawn(self._release(store, counters, rid))
            if q.on_store_error == "closed":
                self._refuse_unavailable(flow, ex)
                return
            store = self.local
            verdict = store.admit_now(counters, rid, amount, q.reservation_ttl, now)
        if verdict.refused is not None:
            self._refuse(flow, ex, counters[verdict.refused], verdict, now)
            return
        budgets = [(c, level) for c, level in zip(counters, verdict.levels) if c.kind == "usd"]
        standing = max(budgets, key=lambda b: b[1] / b[0].limit) if budgets else None
        self._holds[flow] = Hold(store, counters, rid, amount, standing)

    def _fresh(self, ex: exchange.Exchange) -> None:
        """The caches below hold for one version of the rules."""
        if ex.rules is not self._rules:
            self._rules = ex.rules
            self._counter_cache.clear()
            self._rates.clear()

    def _counters_of(self, ex: exchange.Exchange, now: float) -> tuple[Counter, ...]:
        """policy.counters, worked out once per minute for each (principal, client, session, model): the windows
        and keys change at minute boundaries at most. Ordered by when each lifts, latest first (`total` first, rates
        last): the store refuses by the first counter reached, so the answer names the limit the caller must wait
        for (daily and monthly both reached: the month's end, not midnight)."""
        self._fresh(ex)
        minute = int(now // 60)
        key = (ex.principal, ex.client, ex.session, ex.model_requested, minute)
        found = self._counter_cache.get(key)
        if found is None:
            if len(self._counter_cache) >= COUNTER_CACHE:
                self._counter_cache.clear()
            found = self._counter_cache[key] = tuple(sorted(
                policy.counters(ex.rules.quotas, ex.principal, ex.client, ex.session, ex.model_requested, minute * 60.0),
                key=lambda c: -math.inf if c.reset is None else -c.reset))
        return found

    def rates(self, ex: exchange.Exchange, model: str | None) -> tuple[float, float]:
        """Micro-dollars per input token and per output token of `model` (the rules' pricing, else genai-prices;
        `UNPRICED_AS`'s for an unknown model), priced once per model at 100K tokens: the base tier of a long-context price."""
        self._fresh(ex)
        found = self._rates.get(model)
        if found is None:
            if len(self._rates) >= RATES_KEPT:
                self._rates.clear()
            per = PRICE_PROBE_TOKENS
            inp = pricing.cost(ex.rules.pricing, model, {"input_tokens": per}).cost_usd
            out = pricing.cost(ex.rules.pricing, model, {"output_tokens": per}).cost_usd
            if inp is None or out is None:
                inp = pricing.cost(ex.rules.pricing, UNPRICED_AS, {"input_tokens": per}).cost_usd
                out = pricing.cost(ex.rules.pricing, UNPRICED_AS, {"output_tokens": per}).cost_usd
            found = self._rates[model] = ((inp or 0.0) * MICRO / per, (out or 0.0) * MICRO / per)
        return found

    def estimate(self, ex: exchange.Exchange, size: int) -> int:
        """Micro-dollars to reserve: the input as the session's last prompt plus what is new (else the whole body,
        `BYTES_PER_TOKEN`), and `max_tokens` of output, at the requested model's price (`rates`)."""
        body = ex.body if isinstance(ex.body, dict) else {}
        out = body.get("max_tokens")
        out = out if isinstance(out, int) and not isinstance(out, bool) and out > 0 else DEFAULT_MAX_TOKENS
        last = self._last.get(ex.session) if ex.session else None
        known = 0
        if last is not None and size >= last[0]:
            known, new = last[1], (size - last[0]) // BYTES_PER_TOKEN
        else:
            new = size // BYTES_PER_TOKEN
        per_in, per_out = self.rates(ex, ex.model_requested)
        return known + round(new * per_in + out * per_out)

    # -- refusals ----------------------------------------------------------------------------------------

    def _refuse(self, flow: http.HTTPFlow, ex: exchange.Exchange, c: Counter, verdict: Verdict, now: float) -> None:
        message = policy.refusal_message(c, verdict.spent, verdict.held, now)
        if c.kind == "usd":
            reason = SPEND_LIMIT_REACHED
            details = None if c.pooled else {"error_code": SPEND_LIMIT_REACHED}
            flow.response = native_answer("billing_error", message, policy.refusal_headers(c, now), status=429,
                                          details=details)
        else:
            reason = RATE_LIMITED
            wait = policy.seconds_to(c.reset, now)
            flow.response = native_answer("rate_limit_error", message,
                                          {"retry-after": str(wait), "x-should-retry": "true"})
        self._refused(ex, c.name, reason, message)

    def _refuse_unavailable(self, flow: http.HTTPFlow, ex: exchange.Exchange) -> None:
        message = "The gateway cannot read its spend counters right now and refuses requests until it can; try again later."
        flow.response = native_answer("billing_error", message, {
            "x-should-retry": "false", UNIFIED + "overage-disabled-reason": FETCH_ERROR}, status=429)
        self._refused(ex, "store", FETCH_ERROR, message)

    def _refused(self, ex: exchange.Exchange, limit: str, reason: str, message: str) -> None:
        ex.quota_refused = limit
        ex.stop(reason)
        ex.note(f"quota: refused by {limit} ({reason})")
        if self.refusals is not None:
            self.refusals.labels(limit, reason).inc()
        logger.warning(f"quota refused {clean(ex.client)} principal {clean(ex.principal)} session {clean(ex.session)}: "
                       f"{limit} ({reason}): {message}")

    # -- the caller's standing ---------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """The upstream's own `anthropic-ratelimit-*` headers never reach a capped caller (an org-wide quota is not
        theirs); the caller's standing goes on a success only (the protocol's "each successful POST"): on an
        upstream 429 or 529 an `allowed` status would contradict the error Claude Code is reading."""
        hold = self._holds.get(flow)
        if hold is None or hold.standing is None or flow.response is None:
            return
        headers = flow.response.headers
        for name in [n for n in headers if n.lower().startswith(RATELIMIT_PREFIX)]:
            del headers[name]
        if not 200 <= flow.response.status_code < 300:
            return
        counter, level = hold.standing
        headers.update(policy.standing_headers(counter, level, time.time()))

    # -- settlement --------------------------------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        self._settle(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._settle(flow)

    def _settle(self, flow: http.HTTPFlow) -> None:
        hold = self._holds.pop(flow, None)
        ex = exchange.of(flow)
        if hold is None or ex is None:
            return
        usage = ex.usage or {}
        dollars = ex.cost().cost_usd
        if dollars is None and usage:  # a model nobody prices: counted as UNPRICED_AS
            dollars = pricing.cost(ex.rules.pricing, UNPRICED_AS, usage).cost_usd
        dollars = dollars or 0.0
        cost = round(dollars * MICRO)
        inp = (token(usage, "input_tokens") or 0) + (token(usage, "cache_creation_input_tokens") or 0)
        out = token(usage, "output_tokens") or 0
        session = ex.session
        if session and usage and cost:
            size = len(flow.request.raw_content or b"")
            prompt = inp + (token(usage, "cache_read_input_tokens") or 0)
            input_side = max(cost - round(out * self.rates(ex, ex.model)[1]), 0)  # what the prompt cost
            self._last[session] = (size, input_side, prompt)
            self._last.move_to_end(session)
            while len(self._last) > SESSIONS_KEPT:
                self._last.popitem(last=False)
        if self.spend is not None and dollars:
            for name in dict.fromkeys(c.name for c in hold.counters if c.kind == "usd"):
                self.spend.labels(name).inc(dollars)
        if hold.store is self.local:
            self.local.settle_now(hold.counters, hold.rid, cost, inp, out)
        else:
            self._spawn(self._settle_in(hold, ex.rules.quotas, cost, inp, out))

    async def _release(self, store: Any, counters: tuple[Counter, ...], rid: str) -> None:
        """A failed admission's reservation given back (a settlement of nothing), in case the store ran the script
        and only its answer was lost (a slow store): else the shared budget stays held, for every replica, for
        reservation_ttl. Best effort, after the lost call had time to land; if it fails, the reservation expires."""
        await asyncio.sleep(STORE_TIMEOUT)
        try:
            await asyncio.wait_for(store.settle(counters, rid, 0, 0, 0), STORE_TIMEOUT * 2)
        except (StoreError, asyncio.TimeoutError):
            pass

    async def _settle_in(self, hold: Hold, q: policy.Quotas, cost: int, inp: int, out: int) -> None:
        try:
            await asyncio.wait_for(hold.store.settle(hold.counters, hold.rid, cost, inp, out), STORE_TIMEOUT * 2)
        except (StoreError, asyncio.TimeoutError) as e:
            self._count_store_error("settle", q.on_store_error)
            self._loudly(q.store, f"quota store {q.store} failed to settle ({clean(str(e) or 'timed out', 300)}): "
                                  f"${cost / MICRO:.6f} counted in this process only; the reservation expires "
                                  f"in at most {q.reservation_ttl:g} s")
            self.local.settle_now(hold.counters, hold.rid, cost, inp, out)

    # -- helpers -----------------------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (a unit test driving hooks by hand): run nothing, close the coroutine
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _loudly(self, store: str, text: str) -> None:
        now = time.monotonic()
        if now - self._loud.get(store, -LOUD_EVERY) >= LOUD_EVERY:
            self._loud[store] = now
            logger.error(text)

    def _count_store_error(self, step: str, on_error: str) -> None:
        if self.store_errors is not None:
            self.store_errors.labels(step, on_error).inc()


def _password(q: policy.Quotas) -> str | None:
    """The store's password, from the environment variable or file the rules name (never from the rules)."""
    if q.password_env:
        return os.environ.get(q.password_env) or None
    if q.password_file:
        try:
            return Path(q.password_file).read_text(encoding="utf-8").strip() or None
        except OSError as e:
            logger.error(f"quota store password file {q.password_file}: {e}")
    return None
