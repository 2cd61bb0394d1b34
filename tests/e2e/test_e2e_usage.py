"""End to end: usage records through a real mitmdump equal what the upstream sent, in every case."""

from __future__ import annotations

import http.client
import json
import socket

import pytest

import sdk_client
from conftest import routed_rules
from fakes.upstream import Scenario
from harness import Gateway

pytestmark = pytest.mark.e2e

USAGE = {
    "input_tokens": 321, "output_tokens": 54, "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 42000,
    "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600},
}
PRICING = """\
pricing:
  - {model: "claude-test-*", input: 3, output: 15, cache_write_5m: 3.75, cache_write_1h: 6, cache_read: 0.3}
"""


@pytest.fixture(scope="module")
def gw(module_fake):
    with Gateway(routed_rules(module_fake.url, PRICING)) as gateway:
        yield gateway


def record_for(gw, seen):
    record = gw.wait_record(lambda r: r["request_id"] == seen.request_id)
    assert [r["request_id"] for r in gw.records(timeout=0)].count(seen.request_id) == 1  # exactly one record
    return record


@pytest.mark.parametrize("mode", ["base-url", "egress"])
@pytest.mark.parametrize("call, gzip", [("create", False), ("stream", False), ("create", True), ("stream", True)])
def test_token_fields_equal_what_the_upstream_sent(gw, module_fake, mode, call, gzip):
    module_fake.clear()
    module_fake.script(Scenario(usage=USAGE, gzip=gzip))
    env = {"HTTPS_PROXY": gw.proxy_url, "SSL_CERT_FILE": str(gw.ca_bundle())} if mode == "egress" else None
    result = sdk_client.run(call, base_url=gw.base_url if mode == "base-url" else None, env=env)
    assert result["ok"], result
    [seen] = module_fake.requests
    sent = seen.message["usage"]
    record = record_for(gw, seen)
    for key in ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        assert record[key] == sent[key] == USAGE[key], key
    assert record["cache_creation_5m_input_tokens"] == 400 and record["cache_creation_1h_input_tokens"] == 600
    assert record["complete"] is True and record["status"] == 200
    assert record["mode"] == ("reverse" if mode == "base-url" else "regular")
    assert record["client"] == "anthropic-python"
    # 321*3 + 54*15 + 400*3.75 + 600*6 + 42000*0.3, per million
    assert record["cost_usd"] == pytest.approx((963 + 810 + 1500 + 3600 + 12600) / 1e6)
    assert record["saved_usd"] == pytest.approx(42000 * (3 - 0.3) / 1e6)
    assert record["cache_hit_share"] == pytest.approx(42000 / (321 + 1000 + 42000), abs=1e-4)
    assert "anthropic-python" in gw.output() and "hit=97%" in gw.output()


def test_upstream_error_gives_a_record(gw, module_fake):
    module_fake.clear()
    module_fake.script(Scenario.error(429, "rate_limit_error", "slow down", request_id="req_usage429"))
    result = sdk_client.run("stream", base_url=gw.base_url)
    assert result["status"] == 429
    record = gw.wait_record(lambda r: r["request_id"] == "req_usage429")
    assert (record["status"], record["error_type"], record["input_tokens"]) == (429, "rate_limit_error", None)


def test_client_abandoning_a_stream_halfway_gives_an_incomplete_record(gw, module_fake):
    module_fake.clear()
    module_fake.script(Scenario(burst=400, event_delay=0.01, usage=USAGE))
    body = json.dumps({"model": "claude-test-1", "max_tokens": 9, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]})
    conn = http.client.HTTPConnection("127.0.0.1", gw.reverse_port, timeout=10)
    conn.request("POST", "/v1/messages", body, {"content-type": "application/json", "x-api-key": "sk-secret-abandon"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.read1(4096)
    assert b"message_start" in first
    conn.sock.shutdown(socket.SHUT_RDWR)  # walk away mid-stream
    resp.close()
    conn.close()
    [seen] = module_fake.requests
    record = record_for(gw, seen)
    assert record["complete"] is False
    assert record["input_tokens"] == USAGE["input_tokens"]  # message_start had passed
    assert record["cache_read_input_tokens"] == USAGE["cache_read_input_tokens"]
    assert "sk-secret-abandon" not in gw.usage_log.read_text() + gw.output()


def test_a_session_that_misses_its_cache_raises_the_alarm(gw, module_fake):
    module_fake.clear()
    session = "sess-cachebreak-1"
    hit = {**USAGE, "cache_read_input_tokens": 5000}
    miss = {**USAGE, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 45000, "input_tokens": 12}
    module_fake.script(Scenario(usage=hit), Scenario(usage=miss))
    for _ in range(2):
        assert sdk_client.run("create", base_url=gw.base_url, headers={"x-session-id": session})["ok"]
    first, second = gw.wait_records(lambda r: r["session"] == session, count=2)
    assert first["cache_break"] is False and second["cache_break"] is True
    out = gw.output()
    assert "cache break" in out and session in out and module_fake.requests[1].request_id in out
    assert "45012 prompt tokens paid at full price" in out
