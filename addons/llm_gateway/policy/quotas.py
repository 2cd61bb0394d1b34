"""The `quotas` rule section: spend limits (US dollars per UTC calendar period) and rate limits (per minute) per
principal, client, session or one shared pool, as plain data; and the pure arithmetic of admission: which limits
an exchange counts against, their counter keys, the windows and when they reset, and the
`anthropic-ratelimit-unified-*` headers Claude Code reads (reference/claude-code-gateway-protocol.md, "Usage-limit
headers"). The counters themselves live in a store (addons/quotas/store.py: memory or Redis); the addon
(addons/quotas/__init__.py) admits, reserves and settles.

Money is held as integer micro-dollars (1 US dollar = 1_000_000): sums in a shared store never drift.

    quotas:
      store: redis://127.0.0.1:6379/0      # or memory (the default); rediss:// for TLS
      cluster: false                       # true: a Redis Cluster (the URL names any node)
      password_env: QUOTA_REDIS_PASSWORD   # or password_file: a path; never the password itself
      on_store_error: open                 # open (serve, count locally, log) | closed (refuse: 429 fetch_error)
      reservation_ttl: 900                 # seconds an admitted exchange's reservation lives if never settled
      budgets:
        - {name: per-session, per: session, usd: {daily: 5}}
        - {name: team-a, per: principal, match: {principal: "team-a-*"}, usd: {monthly: 300, total: 2000}}
      rates:
        - {name: burst, per: session, per_minute: {requests: 60, output_tokens: 200000}}
"""

from __future__ import annotations

import calendar
import hashlib
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

from llm_gateway.util.globs import Glob

MICRO = 1_000_000  # micro-dollars per US dollar
PERIODS = ("daily", "weekly", "monthly", "total")
PER = ("principal", "client", "session")  # what one counter covers; absent: one pool for every exchange matched
RATE_KINDS = ("requests", "input_tokens", "output_tokens")
ON_STORE_ERROR = ("open", "closed")
MATCH_KEYS = ("principal", "client", "model")
# Claude Code's usage notice: shown past 75 % and again past 95 % (reference/claude-code-gateway-protocol.md)
THRESHOLDS = (0.95, 0.75)
UNIFIED = "anthropic-ratelimit-unified-"
RATELIMIT_PREFIX = "anthropic-ratelimit-"  # the upstream's own headers, removed before ours go on


@dataclass(frozen=True)
class Match:
    """Globs an exchange must match, each given one on its own field (any glob of the field); none given: all."""

    principal: tuple[Glob, ...] = ()
    client: tuple[Glob, ...] = ()
    model: tuple[Glob, ...] = ()

    def matches(self, principal: str | None, client: str | None, model: str | None) -> bool:
        for globs, value in ((self.principal, principal), (self.client, client), (self.model, model)):
            if globs and not any(g.match(value) for g in globs):
                return False
        return True


@dataclass(frozen=True)
class Budget:
    """US dollars per UTC calendar period, as micro-dollars: `limits` is ((period, micro-dollars), …)."""

    name: str
    limits: tuple[tuple[str, int], ...]
    per: str | None = None
    match: Match = Match()


@dataclass(frozen=True)
class Rate:
    """Velocity limits per UTC minute: `limits` is ((kind, count), …), kind in RATE_KINDS."""

    name: str
    limits: tuple[tuple[str, int], ...]
    per: str | None = None
    match: Match = Match()


@dataclass(frozen=True)
class Quotas:
    store: str = "memory"  # "memory" or a redis:// / rediss:// URL without a password
    cluster: bool = False  # the store is a Redis Cluster (any node's URL)
    password_env: str | None = None
    password_file: str | None = None
    on_store_error: str = "open"
    reservation_ttl: float = 900.0  # seconds; a replica that dies holding a reservation frees it after this
    key_prefix: str = "llm-gateway"  # the Redis keys' prefix (one hash tag: every key in one Cluster slot)
    budgets: tuple[Budget, ...] = ()
    rates: tuple[Rate, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.budgets or self.rates)


# ------------------------------------------------------------------------------------------ the reader


def read(reader: Any, node: Any) -> Quotas:
    """The `quotas` section, read with policy/rules.py's `_Reader` (its refusals name file and line)."""
    keys = ("store", "cluster", "password_env", "password_file", "on_store_error", "reservation_ttl", "key_prefix",
            "budgets", "rates")
    m = reader.mapping(node, "quotas", dict.fromkeys(keys, False))
    store = "memory"
    if "store" in m:
        store = reader.string(m["store"], "quotas.store").strip()
        if store != "memory":
            why = _store_problem(store)
            if why:
                raise reader.fail(m["store"], f"quotas.store {why}")
    if "password_env" in m and "password_file" in m:
        raise reader.fail(node, "quotas: give password_env or password_file, not both")
    password_file = None
    if "password_file" in m:
        path = reader.string(m["password_file"], "quotas.password_file")
        password_file = str(reader.folder / path)
    ttl = reader.number(m["reservation_ttl"], "quotas.reservation_ttl") if "reservation_ttl" in m else 900.0
    if ttl < 1:
        raise reader.fail(m["reservation_ttl"], "quotas.reservation_ttl must be at least 1 (seconds)")
    prefix = reader.name(m["key_prefix"], "quotas.key_prefix") if "key_prefix" in m else "llm-gateway"
    budgets = reader.list_of(m["budgets"], "quotas.budgets", lambda n, w: _budget(reader, n, w)) if "budgets" in m else ()
    rates = reader.list_of(m["rates"], "quotas.rates", lambda n, w: _rate(reader, n, w)) if "rates" in m else ()
    reader.unique(m.get("budgets"), budgets, "quotas.budgets")
    reader.unique(m.get("rates"), rates, "quotas.rates")
    both = {b.name for b in budgets} & {r.name for r in rates}
    if both:
        raise reader.fail(m["rates"], f"quotas: {sorted(both)[0]!r} names a budget and a rate (one name, one limit)")
    cluster = reader.boolean(m["cluster"], "quotas.cluster") if "cluster" in m else False
    if cluster and store == "memory":
        raise reader.fail(m["cluster"], "quotas.cluster needs a redis:// store")
    return Quotas(
        store=store,
        cluster=cluster,
        password_env=reader.string(m["password_env"], "quotas.password_env") if "password_env" in m else None,
        password_file=password_file,
        on_store_error=reader.choice(m["on_store_error"], "quotas.on_store_error", ON_STORE_ERROR)
        if "on_store_error" in m else "open",
        reservation_ttl=ttl,
        key_prefix=prefix,
        budgets=budgets,
        rates=rates,
    )


def _store_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        return f"must be memory or redis://host:port/db ({e})"
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        return f"must be memory or redis://host:port/db (or rediss://) (got {url!r})"
    if parts.password or parts.username:
        return "holds credentials: the password never goes in the rule file; give password_env or password_file"
    if parts.path not in ("", "/") and not re.fullmatch(r"/\d{1,2}", parts.path):
        return f"database must be a number, as in redis://host:6379/0 (got {parts.path!r})"
    if parts.query or parts.fragment:
        return "takes no query or fragment: the password comes from password_env or password_file"
    return None


def _common(reader: Any, node: Any, where: str, amounts: str) -> tuple[dict, str, str | None, Match]:
    m = reader.mapping(node, where, {"name": True, "per": False, "match": False, amounts: True})
    name = reader.name(m["name"], f"{where}.name")
    per = reader.choice(m["per"], f"{where}.per", PER) if "per" in m else None
    match = Match()
    if "match" in m:
        mm = reader.mapping(m["match"], f"{where}.match", dict.fromkeys(MATCH_KEYS, False))
        match = Match(**{k: reader.globs(v, f"{where}.match.{k}") for k, v in mm.items()})
    return m, name, per, match


def _budget(reader: Any, node: Any, where: str) -> Budget:
    m, name, per, match = _common(reader, node, where, "usd")
    usd = reader.mapping(m["usd"], f"{where}.usd", dict.fromkeys(PERIODS, False))
    if not usd:
        raise reader.fail(m["usd"], f"{where}.usd needs at least one of {', '.join(PERIODS)}")
    limits = []
    for period in PERIODS:
        if period in usd:
            dollars = reader.number(usd[period], f"{where}.usd.{period}")
            micro = round(dollars * MICRO)
            if micro <= 0:
                raise reader.fail(usd[period], f"{where}.usd.{period} must be above 0 US dollars")
            if micro >= 2**52:
                raise reader.fail(usd[period], f"{where}.usd.{period} is too large")
            limits.append((period, micro))
    return Budget(name, tuple(limits), per, match)


def _rate(reader: Any, node: Any, where: str) -> Rate:
    m, name, per, match = _common(reader, node, where, "per_minute")
    pm = reader.mapping(m["per_minute"], f"{where}.per_minute", dict.fromkeys(RATE_KINDS, False))
    if not pm:
        raise reader.fail(m["per_minute"], f"{where}.per_minute needs at least one of {', '.join(RATE_KINDS)}")
    limits = []
    for kind in RATE_KINDS:
        if kind in pm:
            value = reader.number(pm[kind], f"{where}.per_minute.{kind}")
            if value < 1 or value != int(value) or value >= 2**52:
                raise reader.fail(pm[kind], f"{where}.per_minute.{kind} must be a whole number of at least 1")
            limits.append((kind, int(value)))
    return Rate(name, tuple(limits), per, match)


# ------------------------------------------------------------------------------------ the arithmetic


def window(period: str, now: float) -> tuple[str, float | None]:
    """(window label, reset as Unix seconds) of a period at `now` (Unix seconds), in UTC: a day from 00:00, a week
    from Monday 00:00, a month from the 1st, a minute; `total` never resets (None)."""
    t = datetime.fromtimestamp(now, timezone.utc)
    if period == "daily":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("d%Y%m%d"), (start + timedelta(days=1)).timestamp()
    if period == "weekly":
        start = (t - timedelta(days=t.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("w%Y%m%d"), (start + timedelta(days=7)).timestamp()
    if period == "monthly":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        days = calendar.monthrange(t.year, t.month)[1]
        return start.strftime("m%Y%m"), (start + timedelta(days=days)).timestamp()
    if period == "minute":
        start = math.floor(now / 60) * 60
        return f"M{start}", start + 60.0
    return "total", None


def key_ttl(period: str, now: float) -> int:
    """Seconds a counter key is kept: past the end of its window (a day more), so old windows clean themselves
    up; 0 for `total` (kept)."""
    _, reset = window(period, now)
    return 0 if reset is None else int(reset - now) + (120 if period == "minute" else 86400)


def subject(per: str | None, principal: str | None, client: str | None, session: str | None) -> str | None:
    """What one counter of a limit covers for this exchange ("*" for the shared pool), or None when the exchange
    has no such thing (no principal, no session): then the limit does not apply to it."""
    if per is None:
        return "*"
    value = {"principal": principal, "client": client, "session": session}[per]
    return value if value else None


def counter_key(prefix: str, limit: str, period: str, who: str, label: str) -> str:
    """One counter's key. `{prefix}` is the hash tag: every key in one Redis Cluster slot, so one script checks
    and reserves all of an exchange's counters atomically. `who` may come from a request (a session id): kept as it
    is when it is short and plain, else a readable prefix and a digest of the whole, so two subjects never share a
    counter (and no brace can break the hash tag)."""
    if len(who) > 128 or not re.fullmatch(r"[A-Za-z0-9._@:-]*", who):
        digest = hashlib.sha256(who.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        who = re.sub(r"[^A-Za-z0-9._@:-]", "_", who[:64]) + "~" + digest
    return f"{{{prefix}}}:q:{limit}:{period}:{label}:{who}"


@dataclass(frozen=True, slots=True)
class Counter:
    """One limit of one exchange: a budget period (`kind` "usd", amounts in micro-dollars) or a rate kind
    ("requests", "input_tokens", "output_tokens")."""

    name: str  # the budget's or rate's name
    period: str  # daily | weekly | monthly | total | minute
    kind: str  # usd | requests | input_tokens | output_tokens
    limit: int
    key: str
    reset: float | None  # Unix seconds
    ttl: int  # seconds the key is kept (0: always)
    pooled: bool  # a limit a whole group shares (no `per`)


def counters(quotas: Quotas, principal: str | None, client: str | None, session: str | None, model: str | None,
             now: float) -> list[Counter]:
    """Every counter this exchange counts against: budgets first, then rates."""
    out: list[Counter] = []
    for limits, kinds in ((quotas.budgets, None), (quotas.rates, "rate")):
        for item in limits:
            if not item.match.matches(principal, client, model):
                continue
            who = subject(item.per, principal, client, session)
            if who is None:
                continue
            for what, amount in item.limits:
                period = "minute" if kinds else what
                label, reset = window(period, now)
                out.append(Counter(
                    item.name, period, what if kinds else "usd", amount,
                    counter_key(quotas.key_prefix, item.name, what, who, label), reset, key_ttl(period, now),
                    item.per is None,
                ))
    return out


def seconds_to(reset: float | None, now: float) -> int | None:
    return None if reset is None else max(1, math.ceil(reset - now))


def standing_headers(counter: Counter, level: int, now: float) -> dict[str, str]:
    """The caller's own standing on an admitted answer (`level`: micro-dollars spent and held so far)."""
    used = min(level / counter.limit, 0.99)  # below 1 while requests are still allowed
    status = "allowed_warning" if used >= THRESHOLDS[-1] else "allowed"
    headers = {
        UNIFIED + "status": status,
        UNIFIED + "representative-claim": "overage",
        UNIFIED + "overage-status": status,
        UNIFIED + "overage-utilization": f"{used:.2f}",
    }
    passed = next((t for t in THRESHOLDS if used >= t), None)
    if passed is not None:
        headers[UNIFIED + "overage-surpassed-threshold"] = f"{passed:.2f}"
    if counter.reset is not None:
        headers[UNIFIED + "reset"] = headers[UNIFIED + "overage-reset"] = str(int(counter.reset))
    return headers


def refusal_headers(counter: Counter, now: float) -> dict[str, str]:
    """A budget reached: what Claude Code reads so that neither it nor the SDK retries into the block."""
    headers = {
        "x-should-retry": "false",
        UNIFIED + "status": "rejected",
        UNIFIED + "overage-utilization": "1",
        UNIFIED + "overage-surpassed-threshold": "1",
        UNIFIED + "overage-disabled-reason": "org_spend_cap_reached",
    }
    wait = seconds_to(counter.reset, now)
    if wait is not None:
        headers["retry-after"] = str(wait)
        headers[UNIFIED + "reset"] = headers[UNIFIED + "overage-reset"] = str(int(counter.reset))
    if counter.period in ("daily", "weekly", "monthly"):
        headers[UNIFIED + "overage-period"] = counter.period
    if counter.pooled:
        headers[UNIFIED + "overage-scope"] = "group_pool"
    return headers


def refusal_message(counter: Counter, spent: int, held: int, now: float) -> str:
    """One sentence: which limit, when it resets, what to do."""
    if counter.kind == "usd":
        what = "total" if counter.period == "total" else counter.period
        reached = f"The gateway's {what} spend limit {counter.name!r} (${counter.limit / MICRO:.2f}) is reached"
        if spent < counter.limit:
            reached += f" with exchanges still in flight (${spent / MICRO:.4f} spent, ${held / MICRO:.4f} reserved)"
        if counter.reset is None:
            return reached + "; it does not reset: ask the gateway's operator to raise it."
        when = datetime.fromtimestamp(counter.reset, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return f"{reached}; it resets at {when} (in {seconds_to(counter.reset, now)} s): wait, or ask the gateway's operator to raise it."
    return (f"The gateway's rate limit {counter.name!r} ({counter.limit} {counter.kind.replace('_', ' ')} per minute) "
            f"is reached; retry in {seconds_to(counter.reset, now)} s.")
