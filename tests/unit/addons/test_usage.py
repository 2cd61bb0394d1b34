"""Usage records: the Usage addon with real exchanges (JSON, SSE, errors, cache breaks, cost, stats, no
secrets), and the parts it stands on: policy/pricing.py, the record log (policy/cachewatch.py: unit/policy/test_cachewatch.py)."""

from __future__ import annotations

import gzip
import json
import logging
import os
import threading
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from gwtest import BASE_RULES, api_flow, forward, read_body, rule_file
from llm_gateway.pipeline import exchange
from llm_gateway.policy import pricing
from llm_gateway.pipeline import relay
from llm_gateway.policy import rules
from llm_gateway.policy import spec
from llm_gateway.protocol import sse
from llm_gateway.addons.clients import ClientDetector
from llm_gateway.addons.recordlog import RecordLog
from llm_gateway.addons.routing import ApiRouter
from llm_gateway.addons.answer import AnswerPipeline
from llm_gateway.pipeline.streamreader import StreamReader
from llm_gateway.addons.usage import Usage
from llm_gateway.pipeline.record import build_record
from llm_gateway.records.schema import human_line

SONNET, HAIKU = "claude-sonnet-4-5-20250929", "claude-haiku-4-5"
PRICES = """\
pricing:
  - {model: "claude-sonnet-*", input: 3, output: 15, cache_write_5m: 3.75, cache_write_1h: 6, cache_read: 0.3}
  - {model: "claude-haiku-*", input: 1, output: 5, cache_write_5m: 1.25, cache_write_1h: 2, cache_read: 0.1}
"""
RULES = BASE_RULES + """\
clients:
  - name: tester
    headers: [x-tester]
""" + PRICES
SECRETS = {
    "x-api-key": "sk-ant-api03-KEYVALUE0123456789",
    "authorization": "Bearer BEARERVALUE0123456789",
    "cookie": "sid=COOKIEVALUE0123456789",
}
SECRET_MARKS = ("KEYVALUE0123456789", "BEARERVALUE0123456789", "COOKIEVALUE0123456789")


def usage_of(inp=10, out=5, read=0, write=0, write_5m=None, write_1h=None) -> dict:
    u = {"input_tokens": inp, "cache_creation_input_tokens": write, "cache_read_input_tokens": read,
         "output_tokens": out, "service_tier": "standard"}
    if write_5m is not None or write_1h is not None:
        u["cache_creation"] = {"ephemeral_5m_input_tokens": write_5m or 0, "ephemeral_1h_input_tokens": write_1h or 0}
    return u


def message(usage: dict, model: str = SONNET) -> dict:
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "Hello"}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": usage}


def stream_events(start_usage: dict, *delta_usages: dict, stop: bool = True, model: str = SONNET) -> list:
    start = message(start_usage, model) | {"content": [], "stop_reason": None}
    events = [("message_start", {"type": "message_start", "message": start}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
              ("ping", {"type": "ping"}),
              ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": "Hello"}}),
              ("content_block_stop", {"type": "content_block_stop", "index": 0})]
    for du in delta_usages:
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": du}))
    if stop:
        events.append(("message_stop", {"type": "message_stop"}))
    return events


def encode(events: list) -> bytes:
    return b"".join(sse.encode(name, data) for name, data in events)


class Gateway:
    """The addons an API exchange passes in a unit test: router, detector, record log and usage."""

    def __init__(self, tctx, log: Path, rule_text: str) -> None:
        self.tctx = tctx
        self.log = log
        self.rule_file = rule_file(rule_text)
        self.router = ApiRouter(self.rule_file)
        self.detector = ClientDetector()
        self.answer = AnswerPipeline()
        self.n = 0

    def hook(self, name: str, f: http.HTTPFlow) -> None:
        """A response-side hook as mitmproxy calls it: the answer pipeline, then usage (gateway.py's order)."""
        getattr(self.answer, name)(f)
        if hasattr(self.usage, name):
            getattr(self.usage, name)(f)

    @property
    def records(self) -> RecordLog:
        return self.tctx.master.addons.get("recordlog")

    @property
    def usage(self) -> Usage:
        return self.tctx.master.addons.get("usage")

    def request(self, *, model: str = SONNET, session: str | None = "sess-1", stream: bool = False,
                headers: dict | None = None, system: str | None = None) -> tuple[http.HTTPFlow, exchange.Exchange]:
        body = json.dumps({"model": model, "max_tokens": 100, "stream": stream, **({"system": system} if system else {}),
                           "messages": [{"role": "user", "content": "Hi"}]}).encode()
        h = {"x-tester": "1", **SECRETS, **({"x-session-id": session} if session else {}), **(headers or {})}
        f = api_flow(body, headers={k: v for k, v in h.items() if v is not None})  # None drops a header
        self.router.requestheaders(f)
        self.router.request(f)
        read_body(f)
        self.detector.request(f)
        ex = exchange.of(f)
        ex.stream_requested = ex.stream_upstream = stream  # what StreamPreference sets
        return f, ex

    def respond(self, f: http.HTTPFlow, status: int, body: bytes, content_type: str, headers: dict | None = None):
        self.n += 1
        h = {"content-type": content_type, "request-id": f"req_{self.n:03d}", "set-cookie": "sid=COOKIEVALUE0123456789",
             **(headers or {})}
        f.response = http.Response.make(status, body, h)
        self.hook("responseheaders", f)

    def json_exchange(self, body: dict, status: int = 200, **kw) -> tuple[http.HTTPFlow, exchange.Exchange]:
        f, ex = self.request(**kw)
        self.respond(f, status, json.dumps(body).encode(), "application/json")
        self.hook("response", f)
        return f, ex

    def sse_exchange(self, events: list, chunk: int = 13, **kw) -> tuple[http.HTTPFlow, exchange.Exchange]:
        """A stream as the relay hands it to the taps: parsed by SSEParser from chunks cut anywhere."""
        f, ex = self.request(stream=True, **kw)
        self.respond(f, 200, b"", "text/event-stream")
        taps = [t for t in ex.sse_taps if isinstance(t, StreamReader)]
        assert len(taps) == 1
        parser, raw = sse.SSEParser(), encode(events)
        for i in range(0, len(raw), chunk):
            for event in parser.feed(raw[i: i + chunk]):
                taps[0].on_event(event)
        for event in parser.flush():
            taps[0].on_event(event)
        assert taps[0].on_end() == b""
        f.response.stream = True  # it went by as a stream
        self.hook("response", f)
        return f, ex

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines(keepends=True) if self.log.exists() else []

    def written(self) -> list[dict]:
        lines = self.lines()
        assert all(line.endswith("\n") for line in lines)
        return [json.loads(line) for line in lines]


@pytest.fixture
def gw(tmp_path):
    log = tmp_path / "logs" / "usage.jsonl"
    records = RecordLog()
    with taddons.context(records, Usage(records)) as tctx:
        tctx.configure(records, gateway_log=str(log))
        yield Gateway(tctx, log, RULES)
        records.done()


# ------------------------------------------------------------------------------------------------ JSON


def test_json_response_record_equals_body_usage(gw):
    u = usage_of(inp=1000, out=200, read=4000, write=2000, write_5m=1500, write_1h=500)
    f, ex = gw.json_exchange(message(u))
    [r] = gw.written()
    assert (r["input_tokens"], r["output_tokens"], r["cache_read_input_tokens"], r["cache_creation_input_tokens"]) == (
        1000, 200, 4000, 2000)
    assert (r["cache_creation_5m_input_tokens"], r["cache_creation_1h_input_tokens"]) == (1500, 500)
    assert r["kind"] == "usage" and r["client"] == "tester" and r["session"] == "sess-1" and r["model"] == SONNET
    assert r["status"] == 200 and r["complete"] is True and r["error_type"] is None and r["cache_break"] is False
    assert r["stream_requested"] is False and r["request_id"] == "req_001"
    assert r["mode"] == "regular" and r["host"] == "api.anthropic.com" and r["path"] == "/v1/messages"
    assert r["cache_hit_share"] == round(4000 / 7000, 4)
    # 1000*3 + 200*15 + 1500*3.75 + 500*6 + 4000*0.3 = 15825 millionths; saved 4000*(3-0.3)
    assert r["cost_usd"] == pytest.approx(0.015825, abs=1e-12) and r["saved_usd"] == pytest.approx(0.0108, abs=1e-12)
    assert isinstance(r["duration_ms"], float) and r["ttfb_ms"] is not None
    assert set(r) >= {"ts", "api", "method", "upstream", "stream_upstream", "unwrapped", "unwrapped_from",
                      "converted", "user_agent"}
    assert f.metadata["gateway"]["usage"]["cache_read_input_tokens"] == 4000 and ex.recorded


def test_json_without_breakdown_and_unknown_model(gw):
    gw.json_exchange(message(usage_of(inp=7, out=3, write=9), model="gpt-x"), model="gpt-x")
    [r] = gw.written()
    assert (r["input_tokens"], r["output_tokens"], r["cache_creation_input_tokens"]) == (7, 3, 9)
    # no split: every write is a 5-minute one (the API's default TTL), so the parts add up to the total
    assert r["cache_creation_5m_input_tokens"] == 9 and r["cache_creation_1h_input_tokens"] == 0
    assert r["cost_usd"] is None and r["saved_usd"] is None and r["price_source"] is None  # unknown: no guess


def test_count_tokens_and_non_message_bodies_have_null_tokens(gw):
    f, _ = gw.request()
    f.request.path = "/v1/messages/count_tokens"
    gw.respond(f, 200, b'{"input_tokens": 42}', "application/json")
    gw.hook("response", f)
    [r] = gw.written()
    assert r["input_tokens"] is None and r["output_tokens"] is None and r["cost_usd"] is None
    assert r["complete"] is True and r["cache_hit_share"] is None


# ------------------------------------------------------------------------------------------------ SSE


def test_sse_usage_with_cumulative_message_delta(gw):
    start = usage_of(inp=21, out=1, read=13, write=7, write_5m=7, write_1h=0)
    # a present value overwrites (output 9, then 30 - not 39), an absent or null one keeps message_start's
    events = stream_events(start, {"output_tokens": 9}, {"output_tokens": 30, "cache_read_input_tokens": None})
    gw.sse_exchange(events)
    [r] = gw.written()
    assert (r["input_tokens"], r["output_tokens"], r["cache_read_input_tokens"], r["cache_creation_input_tokens"]) == (
        21, 30, 13, 7)
    assert r["cache_creation_5m_input_tokens"] == 7 and r["cache_creation_1h_input_tokens"] == 0
    assert r["complete"] is True and r["stream_requested"] is True and r["status"] == 200


def test_sse_message_delta_totals_overwrite_message_start(gw):
    start = usage_of(inp=5, out=1, read=0, write=0)
    gw.sse_exchange(stream_events(start, {"output_tokens": 44, "input_tokens": 5000, "cache_read_input_tokens": 300,
                                          "cache_creation_input_tokens": 20}), chunk=1)
    [r] = gw.written()
    assert (r["input_tokens"], r["output_tokens"], r["cache_read_input_tokens"], r["cache_creation_input_tokens"]) == (
        5000, 44, 300, 20)


def test_sse_through_the_relay_with_gzip(gw):
    """The live path: a gzip-encoded stream through SSERelay, decoded while it passes, usage read by the tap."""
    f, ex = gw.request(stream=True)
    raw = encode(stream_events(usage_of(inp=100, out=1, read=50), {"output_tokens": 12}))
    body = gzip.compress(raw)
    f.response = http.Response.make(200, b"", {"content-type": "text/event-stream", "content-encoding": "gzip"})
    gw.hook("responseheaders", f)  # the answer pipeline installs the relay
    assert relay.of(f) is not None
    out = forward(f.response.stream, [body[i: i + 17] for i in range(0, len(body), 17)])
    assert out == raw
    gw.hook("response", f)
    [r] = gw.written()
    assert (r["input_tokens"], r["output_tokens"], r["cache_read_input_tokens"]) == (100, 12, 50)
    assert r["complete"] is True


def test_sse_error_event_and_missing_message_stop(gw):
    events = stream_events(usage_of(inp=8, out=1), stop=False) + [
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})]
    gw.sse_exchange(events)
    [r] = gw.written()
    assert r["error_type"] == "overloaded_error" and r["complete"] is False and r["input_tokens"] == 8


# ------------------------------------------------------------------------------------------------ errors


def test_error_response_record(gw):
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}, "request_id": "req_x"}
    gw.json_exchange(body, status=529)
    [r] = gw.written()
    assert r["status"] == 529 and r["error_type"] == "overloaded_error" and r["complete"] is True
    assert r["input_tokens"] is None and r["cost_usd"] is None and r["cache_break"] is False


def test_error_hook_without_response_writes_exactly_one_incomplete_record(gw):
    f, _ = gw.request()
    f.error = tflow.terr("Connection killed.")
    gw.hook("error", f)
    gw.hook("error", f)
    [r] = gw.written()
    assert r["complete"] is False and r["status"] is None and r["input_tokens"] is None and r["request_id"] is None


def test_stream_abandoned_halfway(gw):
    """The client went away after message_start: the error hook records what passed, once."""
    f, ex = gw.request(stream=True)
    gw.respond(f, 200, b"", "text/event-stream")
    tap = next(t for t in ex.sse_taps if isinstance(t, StreamReader))
    parser = sse.SSEParser()
    for event in parser.feed(encode(stream_events(usage_of(inp=300, out=1, read=900), {"output_tokens": 5}))[:600]):
        tap.on_event(event)
    f.response.stream = True
    f.error = tflow.terr("Client disconnected.")
    gw.hook("error", f)
    gw.hook("response", f)  # a late response hook must not write a second record
    [r] = gw.written()
    assert r["complete"] is False and r["status"] == 200
    assert (r["input_tokens"], r["cache_read_input_tokens"]) == (300, 900)


def test_unrelated_flows_are_ignored(gw):
    f = tflow.tflow(resp=True)
    gw.hook("responseheaders", f)
    gw.hook("response", f)
    f.error = tflow.terr()
    gw.hook("error", f)
    assert gw.written() == [] and "gateway" not in f.metadata


# ------------------------------------------------------------------------------------------------ cache breaks


def test_cache_break_alarm(gw, caplog):
    caplog.set_level(logging.INFO)
    gw.json_exchange(message(usage_of(inp=10, write=5000)))  # writes the cache
    gw.json_exchange(message(usage_of(inp=20, read=5000)))  # reads it
    gw.json_exchange(message(usage_of(inp=4000, read=0, write=1030)))  # reads nothing: a break (req_003)
    breaks = [r for r in caplog.records if r.levelno == logging.WARNING and "cache break" in r.getMessage()]
    assert len(breaks) == 1
    text = breaks[0].getMessage()
    assert "sess-1" in text and "req_003" in text and "5030 prompt tokens paid at full price" in text
    assert "#1" in text
    assert [r["cache_break"] for r in gw.written()] == [False, False, True]
    gw.json_exchange(message(usage_of(inp=20, read=5000)))
    gw.json_exchange(message(usage_of(inp=4000)))  # the second break
    assert [r["cache_break"] for r in gw.written()][3:] == [False, True]
    assert gw.usage.cache.sessions["sess-1"].breaks == 2 and gw.usage.cache.breaks == 2
    assert "#2" in [r for r in caplog.records if "cache break" in r.getMessage()][-1].getMessage()
    assert "cache breaks 2" in gw.usage.stats()


def test_no_cache_break_without_earlier_cache_other_model_session_or_error(gw, caplog):
    caplog.set_level(logging.WARNING)
    gw.json_exchange(message(usage_of(inp=100)))  # never cached: not a break
    gw.json_exchange(message(usage_of(inp=100)))
    gw.json_exchange(message(usage_of(inp=10, write=5000)))  # now it has a cache
    # a side request to another model with a prompt of its own (Claude Code's Haiku calls): another cache
    gw.json_exchange(message(usage_of(inp=300), model=HAIKU), model=HAIKU, system="Write a title")
    gw.json_exchange(message(usage_of(inp=300)), session="sess-2")  # another session
    gw.json_exchange(message(usage_of(inp=300)), session=None)  # no session at all
    gw.json_exchange({"type": "error", "error": {"type": "api_error", "message": "x"}}, status=500)
    assert not any("cache break" in r.getMessage() for r in caplog.records)
    assert not any(r["cache_break"] for r in gw.written()) and gw.usage.cache.breaks == 0


def test_stream_cache_break(gw, caplog):
    caplog.set_level(logging.WARNING)
    gw.sse_exchange(stream_events(usage_of(inp=10, write=3000), {"output_tokens": 3}))
    gw.sse_exchange(stream_events(usage_of(inp=3010), {"output_tokens": 3}))
    assert [r["cache_break"] for r in gw.written()] == [False, True]
    assert any("3010 prompt tokens paid at full price" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------ output


def test_records_are_whole_lines_in_the_gateway_log(gw):
    for i in range(5):
        gw.json_exchange(message(usage_of(inp=i + 1)))
    f, _ = gw.request()
    f.error = tflow.terr()
    gw.hook("error", f)
    lines = gw.lines()
    assert len(lines) == 6 and all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    assert [json.loads(line)["input_tokens"] for line in lines] == [1, 2, 3, 4, 5, None]
    assert gw.records.written == 6


def test_human_line_per_exchange(gw, caplog):
    caplog.set_level(logging.INFO, logger="llm_gateway.usage")
    gw.json_exchange(message(usage_of(inp=1000, out=200, read=4000, write=2000)))
    [line] = [r.getMessage() for r in caplog.records if r.name == "llm_gateway.usage"]
    assert line == (f"tester session=sess-1 {SONNET} 200 in=1000 out=200 cache_read=4000 cache_write=2000 hit=57%"
                    f" ${gw.written()[0]['cost_usd']:.4f} mode=egress path=/v1/messages")
    gw.json_exchange({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}, status=429)
    assert caplog.records[-1].getMessage() == (
        f"tester session=sess-1 {SONNET} 429 in=- out=- cache_read=- cache_write=- hit=- unpriced"
        ' mode=egress path=/v1/messages error=rate_limit_error request_id=req_002')
    f, _ = gw.request(model="gpt-x")
    f.error = tflow.terr()
    gw.hook("error", f)
    assert caplog.records[-1].getMessage() == (
        "tester session=sess-1 gpt-x - in=- out=- cache_read=- cache_write=- hit=- unpriced"
        ' mode=egress path=/v1/messages error=- request_id=- reason="client disconnected" INCOMPLETE')


def test_gateway_stats_command(gw):
    assert gw.tctx.master.commands.execute("gateway.stats") == "no API exchanges yet"
    gw.json_exchange(message(usage_of(inp=1000, out=100, read=3000)))  # sonnet: 3000+1500+900 = 0.0054
    gw.json_exchange(message(usage_of(inp=2, out=1), model="gpt-x"), model="gpt-x", system="x")  # unknown price
    gw.json_exchange({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}, status=429)
    f, _ = gw.request(headers={"x-gateway-client": "other"}, model="gpt-x")
    gw.respond(f, 200, json.dumps(message(usage_of(inp=5, out=5), model="gpt-x")).encode(), "application/json")
    gw.hook("response", f)
    out = gw.tctx.master.commands.execute("gateway.stats")
    other, tester = out.split("\n")  # sorted by client
    assert tester == (
        "tester: 3 requests, in 1002, out 101, cache read 3000, cache write 0, hit 75%, cost $0.0054, saved $0.0081 "
        "(1 requests of unknown price not included), cache breaks 0, errors 1")
    assert other == ("other: 1 requests, in 5, out 5, cache read 0, cache write 0, hit 0%, cost -, saved - "
                     "(1 requests of unknown price not included), cache breaks 0, errors 0")


def test_no_secret_in_records_logs_or_metadata(gw, caplog):
    caplog.set_level(logging.DEBUG)
    gw.json_exchange(message(usage_of(inp=1, write=10)))
    gw.json_exchange(message(usage_of(inp=1)))  # a cache break: a warning line too
    gw.json_exchange({"type": "error", "error": {"type": "authentication_error", "message": "bad key"}}, status=401)
    gw.sse_exchange(stream_events(usage_of(), {"output_tokens": 2}), session=None,
                    headers={"user-agent": "curl/8", "x-tester": None})  # an unknown client: its user agent is kept
    f, _ = gw.request()
    f.error = tflow.terr()
    gw.hook("error", f)
    gw.usage.stats()
    seen = gw.log.read_text() + caplog.text + json.dumps([r for r in gw.written()])
    assert len(gw.written()) == 5 and any(r["user_agent"] == "curl/8" for r in gw.written())
    for mark in SECRET_MARKS:
        assert mark not in seen
    assert not any(k in r for r in gw.written() for k in ("x-api-key", "authorization", "cookie", "headers"))


# ------------------------------------------------------------------------------------------------ pricing.py

TABLE = rules.parse(PRICES).pricing


def test_price_for_first_match_and_unknown():
    assert pricing.price_for(TABLE, SONNET).input == 3
    assert pricing.price_for(TABLE, "CLAUDE-HAIKU-4-5").input == 1
    assert pricing.price_for(TABLE, "gpt-4o") is None and pricing.price_for(TABLE, None) is None
    first = rules.parse("pricing:\n"
                        "  - {model: 'claude-*', input: 9, output: 9, cache_write_5m: 9, cache_write_1h: 9, cache_read: 9}\n"
                        + PRICES.split("\n", 1)[1]).pricing
    assert pricing.price_for(first, SONNET).input == 9


def test_cost_with_cache_breakdown():
    u = usage_of(inp=1_000_000, out=1_000_000, read=1_000_000, write=3_000_000, write_5m=1_000_000, write_1h=2_000_000)
    cost, saved, source = pricing.cost(TABLE, SONNET, u)
    assert cost == 3 + 15 + 0.3 + 3.75 + 2 * 6 and saved == pytest.approx(2.7) and source == "rules"


def test_cost_without_breakdown_counts_writes_as_5m():
    cost, saved, _ = pricing.cost(TABLE, HAIKU, usage_of(inp=0, out=0, read=0, write=2_000_000))
    assert cost == 2.5 and saved == 0


def test_cost_unknown_model_or_no_usage_is_null():
    assert pricing.cost(TABLE, "gpt-4o", usage_of()) == pricing.UNPRICED == (None, None, None)
    assert pricing.cost(TABLE, None, usage_of()) == pricing.UNPRICED
    assert pricing.cost(TABLE, SONNET, None) == pricing.UNPRICED
    assert pricing.cost(TABLE, SONNET, {}) == pricing.UNPRICED
    assert pricing.cost((), "claude-test-1", usage_of()) == pricing.UNPRICED  # neither the rules nor the library


def test_cost_never_raises_on_junk_usage():
    junk = {"input_tokens": "1000", "output_tokens": None, "cache_read_input_tokens": True,
            "cache_creation_input_tokens": [1], "cache_creation": {"ephemeral_5m_input_tokens": "x",
                                                                   "ephemeral_1h_input_tokens": -5}}
    assert pricing.cost(TABLE, SONNET, junk) == (0.0, 0.0, "rules")
    assert pricing.cost(TABLE, SONNET, {"input_tokens": 1_000_000, "cache_creation": "nope"}) == (3.0, 0.0, "rules")
    assert pricing.cost((), SONNET, junk) == (0.0, 0.0, pricing.LIBRARY)


# ------------------------------------------------------------------------------------------- the record log


@pytest.fixture
def record_ctx():
    records = RecordLog()
    with taddons.context(records) as tctx:
        yield tctx, records
        records.done()


def test_records_append_across_reopen(record_ctx, tmp_path):
    tctx, records = record_ctx
    path = tmp_path / "a" / "b" / "usage.jsonl"  # folders are made
    tctx.configure(records, gateway_log=str(path))
    r = spec.Rules()
    records.write({"kind": "usage", "n": 1}, r)
    records.done()  # the gateway stops
    records.write({"kind": "usage", "n": 2}, r)  # reopened for append
    other = RecordLog()  # a second writer (another addon, another process) on the same file
    other.write({"kind": "egress", "n": 3}, r)
    other.done()
    records.write({"kind": "usage", "n": 4}, r)
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert records.written == 3 and oct(os.stat(path).st_mode & 0o777) == "0o640"


def test_records_path_from_rules_option_wins_and_switches(record_ctx, tmp_path):
    tctx, records = record_ctx
    from_rules = rules.parse("usage:\n  log: from-rules.jsonl\n", str(tmp_path / "rules.yaml"))
    records.write({"n": 1}, from_rules)
    assert (tmp_path / "from-rules.jsonl").read_text() == '{"n":1}\n'
    tctx.configure(records, gateway_log=str(tmp_path / "option.jsonl"))
    records.write({"n": 2}, from_rules)
    assert (tmp_path / "option.jsonl").read_text() == '{"n":2}\n'
    tctx.configure(records, gateway_log="")
    records.write({"n": 3}, spec.Rules())  # no log anywhere: nothing written, nothing raised
    assert records.written == 2


def test_records_dash_is_stdout(record_ctx, capsysbinary):
    tctx, records = record_ctx
    tctx.configure(records, gateway_log="-")
    records.write({"kind": "usage", "model": "claude-é"}, spec.Rules())
    records.write({"kind": "usage", "n": 2}, spec.Rules())
    out = capsysbinary.readouterr().out
    assert out == '{"kind":"usage","model":"claude-é"}\n{"kind":"usage","n":2}\n'.encode()


def test_records_never_raise(record_ctx, tmp_path, caplog):
    tctx, records = record_ctx
    tctx.configure(records, gateway_log=str(tmp_path))  # a folder: cannot be opened as a file
    records.write({"n": 1}, spec.Rules())
    assert records.written == 0 and "cannot write record" in caplog.text
    tctx.configure(records, gateway_log=str(tmp_path / "ok.jsonl"))
    records.write({"bad": "\ud800", "obj": object(), 1: 2}, spec.Rules())  # a lone surrogate, an object
    records.write({"n": 2}, spec.Rules())
    lines = (tmp_path / "ok.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["bad"] == "?" and json.loads(lines[1]) == {"n": 2}


def test_records_from_concurrent_writers_stay_whole_lines(record_ctx, tmp_path):
    tctx, records = record_ctx
    path = tmp_path / "shared.jsonl"
    tctx.configure(records, gateway_log=str(path))
    big = "x" * 20_000

    def writer(n: int) -> None:
        log = RecordLog()  # one writer each, like separate processes
        for i in range(50):
            log.write({"w": n, "i": i, "pad": big}, spec.Rules())
        log.done()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted((r["w"], r["i"]) for r in rows) == [(n, i) for n in range(4) for i in range(50)]


def test_build_record_and_human_line_on_a_bare_exchange():
    """build_record reads only the exchange and the flow: usable without the addon."""
    f = api_flow()
    ex = exchange.start(f, exchange.Exchange(rules=spec.Rules(), api="anthropic", mode="regular", method="POST",
                                             host="api.anthropic.com", path="/v1/messages?beta=true"))
    ex.usage = {"input_tokens": 3, "output_tokens": True, "cache_creation": {"ephemeral_5m_input_tokens": "9"}}
    r = build_record(f, ex, ex.started + 1.5)
    assert r["path"] == "/v1/messages" and r["input_tokens"] == 3 and r["output_tokens"] is None
    assert r["cache_creation_5m_input_tokens"] is None and r["duration_ms"] == 1500.0 and r["cost_usd"] is None
    assert human_line(r).startswith("unknown session=- - - in=3 out=- ")
