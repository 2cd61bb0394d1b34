"""Quotas: the rule section (policy/quotas.py), the admission arithmetic and both stores (addons/quotas/store.py):
the memory store, and the Redis store's Lua scripts run by fakeredis (a real redis-server runs them in
tests/e2e/test_e2e_quotas.py)."""

from __future__ import annotations

from datetime import datetime, timezone

import fakeredis
import pytest

from llm_gateway.addons.quotas.store import MemoryStore, RedisStore
from llm_gateway.policy import quotas, rules

BASE = """\
apis:
  - name: anthropic
    hosts: [api.anthropic.com]
    paths: ["/v1/messages"]
"""
NOW = datetime(2026, 12, 9, 15, 30, 10, tzinfo=timezone.utc).timestamp()  # a Wednesday


def parse(section: str) -> quotas.Quotas:
    return rules.parse(BASE + "quotas:\n" + section, "r.yaml").quotas


def test_the_section_reads_into_micro_dollars_and_counters():
    q = parse("""\
  store: redis://127.0.0.1:6379/2
  password_env: QPW
  on_store_error: closed
  reservation_ttl: 30
  budgets:
    - {name: per-session, per: session, usd: {daily: 0.05, total: 10}}
    - {name: team, match: {principal: "team-*"}, usd: {monthly: 300}}
  rates:
    - {name: burst, per: principal, per_minute: {requests: 3, output_tokens: 1000}}
""")
    assert q.store == "redis://127.0.0.1:6379/2" and q.on_store_error == "closed" and q.reservation_ttl == 30
    assert q.budgets[0].limits == (("daily", 50_000), ("total", 10_000_000))
    found = quotas.counters(q, "team-a", "claude-code", "s1", "claude-x", NOW)
    assert [(c.name, c.period, c.kind, c.limit) for c in found] == [
        ("per-session", "daily", "usd", 50_000), ("per-session", "total", "usd", 10_000_000),
        ("team", "monthly", "usd", 300_000_000),
        ("burst", "minute", "requests", 3), ("burst", "minute", "output_tokens", 1000),
    ]
    assert all(c.key.startswith("{llm-gateway}:") for c in found)  # one hash tag: one Cluster slot
    # no session: a per-session budget does not apply; another principal: the team pool does not either
    assert [c.name for c in quotas.counters(q, "other", "x", None, "m", NOW)] == ["burst", "burst"]


@pytest.mark.parametrize("section, reason", [
    ("  store: redis://:secret@h:6379/0\n", "6: quotas.store holds credentials"),
    ("  store: http://h:1\n", "6: quotas.store must be memory or redis://"),
    ("  on_store_error: maybe\n", "6: quotas.on_store_error must be one of open, closed"),
    ("  budgets:\n    - {name: a, usd: {}}\n", "7: quotas.budgets[0].usd needs at least one of"),
    ("  budgets:\n    - {name: a, usd: {yearly: 1}}\n", "7: unknown key 'yearly' in quotas.budgets[0].usd"),
    ("  budgets:\n    - {name: a, per: team, usd: {daily: 1}}\n", "7: quotas.budgets[0].per must be one of"),
    ("  budgets:\n    - {name: a, usd: {daily: 0}}\n", "7: quotas.budgets[0].usd.daily must be above 0"),
    ("  rates:\n    - {name: a, per_minute: {requests: 2.5}}\n", "7: quotas.rates[0].per_minute.requests must be a whole"),
    ("  budgets:\n    - {name: a, usd: {daily: 1}}\n    - {name: a, usd: {daily: 2}}\n", "7: quotas.budgets names 'a' twice"),
    ("  password_env: A\n  password_file: b\n", "6: quotas: give password_env or password_file, not both"),
    ("  cluster: true\n", "6: quotas.cluster needs a redis:// store"),
])
def test_a_bad_section_is_refused_with_file_line_and_reason(section, reason):
    with pytest.raises(rules.RulesError) as e:
        parse(section)
    assert str(e.value).startswith(f"r.yaml:{reason}"), str(e.value)


def test_windows_are_utc_calendar_periods():
    assert datetime.fromtimestamp(quotas.window("daily", NOW)[1], timezone.utc) == datetime(2026, 12, 10, tzinfo=timezone.utc)
    assert datetime.fromtimestamp(quotas.window("weekly", NOW)[1], timezone.utc) == datetime(2026, 12, 14, tzinfo=timezone.utc)
    assert datetime.fromtimestamp(quotas.window("monthly", NOW)[1], timezone.utc) == datetime(2027, 1, 1, tzinfo=timezone.utc)
    assert quotas.window("minute", NOW)[1] == NOW - 10 + 60
    assert quotas.window("total", NOW) == ("total", None)


def test_headers_follow_claude_codes_gateway_protocol():
    [c] = quotas.counters(parse("  budgets:\n    - {name: b, per: principal, usd: {daily: 1}}\n"), "p", "c", "s", "m", NOW)
    low = quotas.standing_headers(c, 500_000, NOW)
    assert low["anthropic-ratelimit-unified-status"] == "allowed"
    assert "anthropic-ratelimit-unified-overage-surpassed-threshold" not in low
    high = quotas.standing_headers(c, 960_000, NOW)
    assert high["anthropic-ratelimit-unified-status"] == "allowed_warning"
    assert high["anthropic-ratelimit-unified-overage-utilization"] == "0.96"
    assert high["anthropic-ratelimit-unified-overage-surpassed-threshold"] == "0.95"
    assert high["anthropic-ratelimit-unified-reset"] == str(int(quotas.window("daily", NOW)[1]))
    refused = quotas.refusal_headers(c, NOW)
    assert refused["x-should-retry"] == "false" and refused["anthropic-ratelimit-unified-status"] == "rejected"
    assert int(refused["retry-after"]) == int(quotas.window("daily", NOW)[1] - NOW)
    assert refused["anthropic-ratelimit-unified-overage-period"] == "daily"
    assert "anthropic-ratelimit-unified-representative-claim" not in refused  # else the client drops the message


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return MemoryStore()
    return RedisStore("redis://fake", client=fakeredis.FakeAsyncRedis())


async def test_in_flight_reservations_count_so_parallel_requests_cannot_all_slip_under(store):
    [c] = quotas.counters(parse("  budgets:\n    - {name: b, per: session, usd: {daily: 0.05}}\n"), None, "c", "s", "m", NOW)
    admitted = [await store.admit([c], f"r{i}", 20_000, 60, NOW) for i in range(5)]
    assert [v.refused for v in admitted] == [None, None, None, 0, 0]  # 0, 20k and 40k held are below 50k
    assert admitted[3].spent == 0 and admitted[3].held == 60_000
    await store.settle([c], "r0", 1_000, 10, 10, NOW)  # costs less than reserved: the rest is freed
    assert await store.level(c, NOW) == (1_000, 40_000)
    assert (await store.admit([c], "r5", 20_000, 60, NOW)).refused is None
    assert await store.level(c, NOW) == (1_000, 60_000)


async def test_a_reservation_never_settled_expires(store):
    [c] = quotas.counters(parse("  budgets:\n    - {name: b, usd: {total: 0.01}}\n"), None, "c", "s", "m", NOW)
    assert (await store.admit([c], "dead", 50_000, 5, NOW)).refused is None  # a replica dies holding it
    assert (await store.admit([c], "x", 1, 5, NOW + 1)).refused == 0
    assert (await store.admit([c], "y", 1, 5, NOW + 6)).refused is None
    await store.settle([c], "dead", 0, 0, 0, NOW + 7)  # settled late: nothing held twice
    assert await store.level(c, NOW + 7) == (0, 1)


async def test_rates_count_requests_at_admission_and_tokens_at_settlement(store):
    q = parse("  rates:\n    - {name: r, per_minute: {requests: 2, output_tokens: 100}}\n")
    cs = quotas.counters(q, None, "c", "s", "m", NOW)
    assert (await store.admit(cs, "a", 0, 60, NOW)).refused is None
    await store.settle(cs, "a", 0, 5, 150, NOW)
    v = await store.admit(cs, "b", 0, 60, NOW)
    assert v.refused == 1 and v.spent == 150  # output tokens over the minute's limit
    cs2 = quotas.counters(parse("  rates:\n    - {name: r2, per_minute: {requests: 2}}\n"), None, "c", "s", "m", NOW)
    assert [(await store.admit(cs2, str(i), 0, 60, NOW)).refused for i in range(3)] == [None, None, 0]
    later = quotas.counters(parse("  rates:\n    - {name: r2, per_minute: {requests: 2}}\n"), None, "c", "s", "m", NOW + 60)
    assert (await store.admit(later, "n", 0, 60, NOW + 60)).refused is None  # the next minute


async def test_a_refusal_reserves_nothing_anywhere(store):
    q = parse("  budgets:\n    - {name: a, usd: {total: 1}}\n    - {name: b, usd: {total: 0.01}}\n")
    cs = quotas.counters(q, None, "c", "s", "m", NOW)
    await store.settle(cs[1:], "old", 10_000, 0, 0, NOW)
    v = await store.admit(cs, "r", 500, 60, NOW)
    assert v.refused == 1 and v.spent == 10_000
    assert await store.level(cs[0], NOW) == (0, 0)


# -- the addon, on flows ------------------------------------------------------------------------------------

def _flow(section: str, path: str = "/v1/messages", session: str | None = "s1", max_tokens: int = 600):
    import json

    from gwtest import api_flow
    from llm_gateway.pipeline import exchange

    rule_set = rules.parse(BASE + "quotas:\n" + section, "r.yaml")
    body = {"model": "claude-sonnet-4-5", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}
    f = api_flow(json.dumps(body).encode(), mode="reverse", path=path)
    ex = exchange.Exchange(rule_set, "anthropic", "reverse", "POST", "api.anthropic.com", path, body=body,
                           client="claude-code", session=session, model_requested="claude-sonnet-4-5")
    exchange.start(f, ex)
    return f, ex


async def _request(addon, f):
    pending = addon.request(f)
    if pending is not None:
        await pending


async def test_a_budget_reached_is_refused_before_upstream_in_claude_codes_words():
    from llm_gateway.addons.quotas import Quotas
    from llm_gateway.addons.metrics import Metrics

    addon = Quotas(Metrics())
    section = "  budgets:\n    - {name: cap, per: session, usd: {daily: 0.01}}\n"
    first, ex1 = _flow(section)
    await _request(addon, first)
    assert first.response is None and ex1.quota_limits == ("cap",)  # admitted: $0.009 reserved
    second, ex2 = _flow(section)
    await _request(addon, second)
    assert second.response is None  # $0.009 held is below $0.01: admitted, overspend at most this estimate
    third, ex3 = _flow(section)
    await _request(addon, third)
    r = third.response
    assert r.status_code == 429 and ex3.quota_refused == "cap" and ex3.reason == "spend_limit_reached"
    body = r.json()
    assert body["error"]["type"] == "billing_error" and body["error"]["details"] == {"error_code": "spend_limit_reached"}
    assert r.headers["x-should-retry"] == "false" and r.headers["anthropic-ratelimit-unified-status"] == "rejected"
    assert addon.refusals.labels("cap", "spend_limit_reached")._value.get() == 1


async def test_count_tokens_and_sessionless_requests_are_not_counted():
    from llm_gateway.addons.quotas import Quotas

    addon = Quotas()
    section = "  budgets:\n    - {name: cap, per: session, usd: {total: 0.000001}}\n"
    for f, ex in (_flow(section, path="/v1/messages/count_tokens"), _flow(section, session=None)):
        await _request(addon, f)
        assert f.response is None and ex.quota_limits == ()


@pytest.mark.parametrize("on_error", ["open", "closed"])
async def test_a_store_that_cannot_be_reached(on_error):
    import socket

    from llm_gateway.addons.quotas import Quotas

    with socket.socket() as s:  # a port nobody listens on: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addon = Quotas()
    section = (f"  store: redis://127.0.0.1:{port}/0\n  on_store_error: {on_error}\n"
               "  budgets:\n    - {name: cap, per: session, usd: {daily: 1}}\n")
    f, ex = _flow(section)
    await _request(addon, f)
    if on_error == "open":
        assert f.response is None  # admitted, held in this process's memory
        assert addon.local.budgets and next(iter(addon.local.budgets.values())).held > 0
    else:
        assert f.response.status_code == 429 and ex.quota_refused == "store" and ex.reason == "fetch_error"
        assert f.response.headers["anthropic-ratelimit-unified-overage-disabled-reason"] == "fetch_error"
        assert "details" not in f.response.json()["error"]
    addon.done()


async def test_the_standing_goes_only_on_a_success_and_an_upstream_error_keeps_its_own_words():
    """reference/claude-code-gateway-protocol.md: the caller's standing on each *successful* answer. An upstream
    429 or 529 that carried `…-unified-status: allowed` would tell Claude Code the block was not a limit at all."""
    from mitmproxy import http

    from llm_gateway.addons.quotas import Quotas

    addon = Quotas()
    section = "  budgets:\n    - {name: cap, per: session, usd: {daily: 1}}\n"
    ok, _ = _flow(section)
    await _request(addon, ok)
    ok.response = http.Response.make(200, b"{}", {"anthropic-ratelimit-requests-limit": "50"})
    addon.responseheaders(ok)
    assert ok.response.headers["anthropic-ratelimit-unified-status"] == "allowed"
    assert "anthropic-ratelimit-requests-limit" not in ok.response.headers  # the org's own: never the caller's
    failed, _ = _flow(section)
    await _request(addon, failed)
    failed.response = http.Response.make(529, b'{"type":"error"}', {"anthropic-ratelimit-requests-limit": "50"})
    addon.responseheaders(failed)
    assert not any(n.lower().startswith("anthropic-ratelimit-unified-") for n in failed.response.headers)
    assert "anthropic-ratelimit-requests-limit" not in failed.response.headers


async def test_prices_remembered_per_model_are_bounded():
    """The model comes from the request: a client naming a new model on every request must not grow memory."""
    from llm_gateway.addons.quotas import Quotas, RATES_KEPT

    addon = Quotas()
    section = "  budgets:\n    - {name: cap, per: session, usd: {daily: 1}}\n"
    f, ex = _flow(section)
    for n in range(RATES_KEPT + 50):
        addon.rates(ex, f"made-up-model-{n}")
    assert len(addon._rates) <= RATES_KEPT


def test_counter_keys_of_different_subjects_never_collide():
    """`who` comes from a request (a session id): two different ones must not share a counter, whether they
    differ only in characters the key cannot hold or only past its first 128 characters."""
    keys = {quotas.counter_key("p", "cap", "daily", who, "d20261209")
            for who in ("a/b", "a_b", "a b", "x" * 128, "x" * 128 + "1", "x" * 128 + "2")}
    assert len(keys) == 6
    assert quotas.counter_key("p", "cap", "daily", "team-a@corp:1", "d1") == "{p}:q:cap:daily:d1:team-a@corp:1"
    assert all(k.startswith("{p}:") and k.count("{") == 1 and k.count("}") == 1 for k in keys)


def test_the_memory_store_forgets_windows_that_are_over_without_reading_the_live_ones(monkeypatch):
    """Many sessions: every counter of a window that is over goes, a step per admission, and no admission reads
    the counters still live (a scan of all of them once a minute stalled the event loop)."""
    from llm_gateway.addons.quotas import store as store_module

    q = parse("  budgets:\n    - {name: s, per: session, usd: {daily: 5, total: 50}}\n"
              "  rates:\n    - {name: r, per: session, per_minute: {requests: 60}}\n")
    store = MemoryStore()
    for i in range(600):
        cs = quotas.counters(q, None, "cc", f"session-{i}", "m", NOW)
        store.admit_now(cs, f"r{i}", 1000, 900, NOW)
        store.settle_now(cs, f"r{i}", 900, 10, 10, NOW)
    assert len(store.budgets) == 1200 and len(store.counts) == 600

    def read_all(*args):
        raise AssertionError("a sweep read every counter")

    monkeypatch.setattr(store_module, "_expiry", read_all, raising=False)
    live = quotas.counters(q, None, "cc", "later", "m", NOW + 3600)
    store.admit_now(live, "x", 1, 900, NOW + 3600)  # an hour on: only the minute's rate counters are over
    store.admit_now(live, "y", 1, 900, NOW + 3600)
    store.admit_now(live, "z", 1, 900, NOW + 3600)
    assert len(store.counts) == 1 and len(store.budgets) == 1202
    later = NOW + 3 * 86400  # the day and a day more are over: the daily counters go, the totals stay
    for n in range(10):
        store.admit_now(quotas.counters(q, None, "cc", "later", "m", later), f"w{n}", 1, 900, later)
    today = quotas.window("daily", later)[0]
    assert [k for k in store.budgets if ":daily:" in k] == [f"{{llm-gateway}}:q:s:daily:{today}:later"]
    assert len(store.budgets) == 602  # the 601 totals (never reset) and today's one daily


@pytest.mark.parametrize("path, metered", [
    ("/v1/messages", True), ("/v1/messages?beta=true", True), ("/v1/messages/", True), ("/v1//messages", True),
    ("/v1/%6Dessages", True), ("/v1/messages/count_tokens", False), ("/v1/messages/count_tokens/", False),
    ("/v1/models", False),
])
async def test_every_spelling_of_the_messages_path_is_counted(path, metered):
    """The path as a server reads it (protocol/hosts.path_forms, as the egress policy judges it): a trailing slash,
    a doubled slash or a percent-encoded letter must not carry a request past its budget."""
    from llm_gateway.addons.quotas import Quotas, is_metered

    addon = Quotas()
    f, ex = _flow("  budgets:\n    - {name: cap, per: session, usd: {total: 0.000001}}\n", path=path)
    assert is_metered(ex) is metered
    await _request(addon, f)
    assert (ex.quota_limits == ("cap",)) is metered


async def test_a_model_nobody_prices_still_counts_against_the_budget():
    """A model released after the price list (neither the rules' pricing nor genai-prices knows it) reserved
    nothing and settled nothing: twenty parallel requests all passed and the cap never filled."""
    from mitmproxy import http

    from llm_gateway.addons.quotas import Quotas

    addon = Quotas()
    section = "  budgets:\n    - {name: cap, per: session, usd: {daily: 1}}\n"
    f, ex = _flow(section, max_tokens=1000)
    ex.model_requested = "claude-opus-9-unreleased"
    await _request(addon, f)
    assert f.response is None
    hold = addon._holds[f]
    assert hold.amount >= 75_000  # 1000 output tokens at the dearest Claude price ($75 per million) at least
    ex.usage = {"input_tokens": 1000, "output_tokens": 1000}
    f.response = http.Response.make(200, b"{}")
    addon.response(f)
    spent, held = await addon.local.level(hold.counters[0])
    assert held == 0 and spent == 90_000  # $15 + $75 per million tokens


@pytest.mark.parametrize("on_error", ["open", "closed"])
async def test_an_admission_whose_answer_was_lost_gives_its_reservation_back(on_error):
    """A slow store: the script ran (the reservation is held in the shared store) but its answer came after the
    timeout. The exchange was then counted locally (open) or refused (closed); the shared hold must not stay for
    reservation_ttl (15 minutes by default), filling the budget for every replica."""
    import asyncio
    import time

    from llm_gateway.addons.quotas import Quotas
    from llm_gateway.addons.quotas.store import StoreError

    class AnswerLost(RedisStore):
        async def admit(self, *args, **kwargs):
            await super().admit(*args, **kwargs)
            raise StoreError("TimeoutError: Timeout reading from 127.0.0.1:6379")

    addon = Quotas()
    section = (f"  store: redis://127.0.0.1:6379/0\n  on_store_error: {on_error}\n"
               "  budgets:\n    - {name: cap, per: session, usd: {daily: 1}}\n")
    f, ex = _flow(section)
    q = ex.rules.quotas
    shared = AnswerLost(q.store, client=fakeredis.FakeAsyncRedis())
    addon._shared = ((q.store, q.cluster, q.password_env, q.password_file, None), shared)
    await _request(addon, f)
    assert (f.response is None) is (on_error == "open")
    await asyncio.gather(*addon._tasks)
    counter = addon._counters_of(ex, time.time())[0]
    assert await shared.level(counter) == (0, 0)


async def test_a_refusal_names_the_limit_that_lifts_last():
    """Daily and monthly both reached: the answer must say the month's end, not midnight (the client would wait
    until midnight and be refused again); a rate reached beside a budget is not what lifts first either."""
    import time

    from llm_gateway.addons.quotas import Quotas

    addon = Quotas()
    section = ("  budgets:\n    - {name: cap, per: session, usd: {daily: 0.01, monthly: 0.02}}\n"
               "  rates:\n    - {name: burst, per: session, per_minute: {requests: 1}}\n")
    f, ex = _flow(section)
    await _request(addon, f)  # admitted; the minute's one request is used
    addon.local.settle_now(addon._holds[f].counters, addon._holds[f].rid, 30_000, 0, 0)  # $0.03 spent
    g, _ = _flow(section)
    await _request(addon, g)
    r = g.response
    assert r.status_code == 429 and r.json()["error"]["type"] == "billing_error"
    assert r.headers["anthropic-ratelimit-unified-overage-period"] == "monthly"
    month_end = quotas.window("monthly", time.time())[1]
    assert r.headers["anthropic-ratelimit-unified-reset"] == str(int(month_end))
    assert abs(int(r.headers["retry-after"]) - (month_end - time.time())) < 60
