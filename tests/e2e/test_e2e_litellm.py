"""End to end with real LiteLLM proxies between the gateway and the fake upstream.

LiteLLM wraps Anthropic's errors (escaped JSON, bytes reprs, prefixes, a 529 turned into a 500, headers
dropped). Through the gateway the real Anthropic SDK and the real Claude Code must see native errors
again, and LiteLLM's own requests must be recognised as LiteLLM.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

import realclients
import sdk_client
from conftest import routed_rules
from fakes.upstream import Scenario
from harness import Gateway

pytestmark = pytest.mark.e2e

MODEL = "claude-test-1"


@pytest.fixture(scope="module", params=realclients.LITELLM_VERSIONS)
def litellm(request, module_fake):
    with realclients.LiteLLMProxy(request.param, anthropic_base_url=module_fake.url, models=[MODEL]) as proxy:
        yield proxy


@pytest.fixture(scope="module", params=["passthrough", "routed"])
def chain(request, litellm, module_fake):
    """The gateway in front of LiteLLM: its /anthropic pass-through, or its routed /v1/messages."""
    upstream = f"{litellm.url}/anthropic" if request.param == "passthrough" else litellm.url
    with Gateway(routed_rules(upstream)) as gw:
        yield request.param, litellm, gw


ERRORS = [
    (429, "rate_limit_error", "RateLimitError"),
    (529, "overloaded_error", "OverloadedError"),
    (401, "authentication_error", "AuthenticationError"),
]


@pytest.mark.parametrize("status, error_type, exception", ERRORS, ids=[e[1] for e in ERRORS])
@pytest.mark.parametrize("call", ["create", "stream"])
def test_sdk_sees_native_errors_through_litellm(chain, module_fake, status, error_type, exception, call):
    route, litellm, gw = chain
    module_fake.clear()
    request_id = f"req_011{error_type[:6]}{status}{call}"
    module_fake.script(Scenario.error(status, error_type, f"upstream says {error_type}", request_id=request_id))
    result = sdk_client.run(call, base_url=gw.base_url, env={"ANTHROPIC_API_KEY": litellm.master_key})
    assert module_fake.requests, "LiteLLM never reached the fake upstream"
    assert (result["error"], result["status"], result["type"]) == (exception, status, error_type), result
    assert result["request_id"] == request_id
    assert f"upstream says {error_type}" in result["message"]
    [record] = gw.wait_records(lambda r: r["error_type"] == error_type, count=1)[-1:]
    assert record["status"] == status


def test_success_passes_unchanged_and_litellm_is_detected(chain, module_fake):
    route, litellm, gw = chain
    module_fake.clear()
    result = sdk_client.run("create", base_url=gw.base_url, env={"ANTHROPIC_API_KEY": litellm.master_key})
    assert result["ok"], result
    assert result["message"]["content"] == module_fake.requests[0].message["content"]


def test_litellm_forwarding_to_the_gateway_is_detected(litellm_behind_gateway):
    """LiteLLM as the gateway's client: its proxied requests and its health check are both `litellm`."""
    proxy, gw, fake = litellm_behind_gateway
    body = json.dumps({"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = urllib.request.Request(
        f"{proxy.url}/v1/messages", data=body, method="POST",
        headers={"Authorization": f"Bearer {proxy.master_key}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert json.loads(resp.read())["content"][0]["text"] == fake.requests[-1].message["content"][0]["text"]
    health = urllib.request.Request(
        f"{proxy.url}/health", headers={"Authorization": f"Bearer {proxy.master_key}"},
    )
    with urllib.request.urlopen(health, timeout=60) as resp:
        resp.read()
    records = gw.records(count=2)
    assert len(records) >= 2, gw.output()
    assert {r["client"] for r in records} == {"litellm"}, records
    health_ua = [q.headers.get("user-agent") for q in fake.requests]
    assert any(ua and ua.lower().startswith("litellm/") for ua in health_ua)


@pytest.fixture(scope="module")
def litellm_behind_gateway(module_fake):
    """LiteLLM (routed model) whose Anthropic api_base is the gateway's base-URL listener."""
    with Gateway(routed_rules(module_fake.url)) as gw:
        with realclients.LiteLLMProxy(realclients.LITELLM_VERSIONS[-1], models=[MODEL], routed_api_base=gw.base_url) as proxy:
            yield proxy, gw, module_fake


@pytest.fixture(scope="module")
def litellm_through_forcing_gateway(module_fake):
    """LiteLLM (routed model) -> a gateway that forces LiteLLM's upstream requests to non-streaming -> fake."""
    clients = [{"name": "litellm", "user_agent": ["litellm/*"], "headers": ["x-litellm-*"], "stream": "off"}]
    with Gateway(routed_rules(module_fake.url, clients=clients)) as gw:
        with realclients.LiteLLMProxy(realclients.LITELLM_VERSIONS[-1], models=[MODEL], routed_api_base=gw.base_url) as proxy:
            yield proxy, gw


@pytest.mark.parametrize("call", ["stream", "create-stream"])
def test_litellm_streaming_through_a_forced_off_gateway_gives_its_caller_a_full_stream(
    litellm_through_forcing_gateway, module_fake, call
):
    proxy, gw = litellm_through_forcing_gateway
    module_fake.clear()
    text = "A complete answer in several words, converted back into a stream for LiteLLM"
    module_fake.script(Scenario(text=text))
    result = sdk_client.run(call, base_url=proxy.url, env={"ANTHROPIC_API_KEY": proxy.master_key}, model=MODEL)
    assert result["ok"], result
    [seen] = module_fake.requests
    assert seen.json["stream"] is False  # forced off upstream
    if call == "stream":
        assert result["message"]["content"][0]["text"] == text  # LiteLLM's caller got the whole text
    else:
        deltas = [e["delta"].get("text", "") for e in result["events"] if e["type"] == "content_block_delta"]
        assert "".join(deltas) == text and all(d for d in deltas[:1])  # no empty chunks
    record = gw.wait_record(lambda r: r["request_id"] == seen.request_id)
    assert (record["client"], record["stream_requested"], record["stream_upstream"], record["converted"]) == (
        "litellm", True, False, "json->sse")
