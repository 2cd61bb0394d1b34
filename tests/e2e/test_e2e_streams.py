"""End to end: a forced stream mode upstream, and the client still gets exactly the form it asked for."""

from __future__ import annotations

import pytest

import sdk_client
from conftest import routed_rules
from fakes.upstream import Scenario
from harness import Gateway

pytestmark = pytest.mark.e2e

BLOCKS = (
    {"type": "thinking", "thinking": "Let me think about it.", "signature": "sig-abc"},
    {"type": "redacted_thinking", "data": "EncryptedBlob=="},
    {"type": "text", "text": "I will look it up."},
    {"type": "tool_use", "id": "toolu_01", "name": "lookup", "input": {"q": "weather", "days": [1, 2], "deep": {"x": None}}},
)


def rules_forcing(fake_url: str, stream: str) -> str:
    sdk = {"name": "sdk-forced", "user_agent": ["anthropic/python *", "asyncanthropic/python *"], "stream": stream}
    return routed_rules(fake_url, clients=[sdk])


@pytest.fixture(scope="module", params=["on", "off"])
def forced(request, module_fake):
    with Gateway(rules_forcing(module_fake.url, request.param)) as gw:
        yield request.param, gw


@pytest.mark.parametrize("mode", ["base-url", "egress"])
@pytest.mark.parametrize("call", ["create", "stream"])
@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_client_gets_the_form_it_asked_for(forced, module_fake, mode, call, use_async):
    flag, gw = forced
    module_fake.clear()
    module_fake.script(Scenario.reply(*BLOCKS, usage={"input_tokens": 11, "output_tokens": 22,
                                                         "cache_read_input_tokens": 3000,
                                                         "cache_creation_input_tokens": 40}))
    env = {"HTTPS_PROXY": gw.proxy_url, "SSL_CERT_FILE": str(gw.ca_bundle())} if mode == "egress" else None
    result = sdk_client.run(call, base_url=gw.base_url if mode == "base-url" else None, env=env, use_async=use_async)
    assert result["ok"], result
    [seen] = module_fake.requests  # one upstream request per turn: never paid twice
    assert seen.stream is (flag == "on")
    assert {k: v for k, v in seen.json.items() if k != "stream"} == {
        "model": "claude-test-1", "max_tokens": 64, "messages": [{"role": "user", "content": "hello"}]
    }
    assert sdk_client.without_nulls(result["message"]) == sdk_client.without_nulls(seen.message)
    asked = call == "stream"
    record = gw.wait_record(lambda r: r["request_id"] == seen.request_id)
    assert record["stream_requested"] is asked and record["stream_upstream"] is (flag == "on")
    assert record["converted"] == (None if asked == (flag == "on") else ("sse->json" if flag == "on" else "json->sse"))
    assert (record["cache_read_input_tokens"], record["cache_creation_input_tokens"]) == (3000, 40)
    assert record["complete"] is True


def test_raw_events_of_a_converted_stream_are_well_formed(forced, module_fake):
    """create(stream=True) gives the raw events: a complete sequence, every one with its type."""
    flag, gw = forced
    module_fake.clear()
    module_fake.script(Scenario.reply(*BLOCKS))
    result = sdk_client.run("create-stream", base_url=gw.base_url)
    assert result["ok"], result
    types = [e["type"] for e in result["events"]]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    assert types.count("content_block_start") == types.count("content_block_stop") == len(BLOCKS)


@pytest.mark.parametrize("call", ["create", "stream"])
def test_upstream_errors_stay_http_errors(forced, module_fake, call):
    flag, gw = forced
    module_fake.clear()
    module_fake.script(Scenario.error(429, "rate_limit_error", "slow down", request_id="req_limit1", retry_after=7))
    result = sdk_client.run(call, base_url=gw.base_url)
    assert not result["ok"]
    assert (result["error"], result["status"], result["type"], result["request_id"]) == (
        "RateLimitError", 429, "rate_limit_error", "req_limit1")


def test_stream_error_event_becomes_native_http_error_when_client_wanted_json(gateway_factory, fake):
    gw = gateway_factory(rules_forcing(fake.url, "on"))
    fake.script(Scenario(error_after=3, stream_error={"type": "overloaded_error", "message": "Overloaded"}))
    result = sdk_client.run("create", base_url=gw.base_url)
    assert (result["error"], result["status"], result["type"]) == ("OverloadedError", 529, "overloaded_error")


def test_truncated_stream_becomes_native_5xx_when_client_wanted_json(gateway_factory, fake):
    gw = gateway_factory(rules_forcing(fake.url, "on"))
    fake.script(Scenario(truncate_after=4))
    result = sdk_client.run("create", base_url=gw.base_url)
    assert (result["error"], result["status"], result["type"]) == ("InternalServerError", 500, "api_error")
    [record] = gw.records(count=1)
    assert record["complete"] is False


def test_gzip_stream_converted_to_json(gateway_factory, fake):
    gw = gateway_factory(rules_forcing(fake.url, "on"))
    fake.script(Scenario(gzip=True))
    result = sdk_client.run("create", base_url=gw.base_url)
    assert result["ok"], result
    assert sdk_client.without_nulls(result["message"]) == sdk_client.without_nulls(fake.requests[0].message)


def test_gzip_json_converted_to_stream(gateway_factory, fake):
    gw = gateway_factory(rules_forcing(fake.url, "off"))
    fake.script(Scenario(gzip=True))
    result = sdk_client.run("stream", base_url=gw.base_url)
    assert result["ok"], result
    assert sdk_client.without_nulls(result["message"]) == sdk_client.without_nulls(fake.requests[0].message)
