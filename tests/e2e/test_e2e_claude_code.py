"""End to end with the real Claude Code (`claude -p`, offline against the fake upstream)."""

from __future__ import annotations

import pytest

import realclients
from conftest import routed_rules
from fakes.upstream import Scenario
from harness import Gateway

pytestmark = pytest.mark.e2e

USAGE = {"input_tokens": 5, "output_tokens": 9, "cache_creation_input_tokens": 1200, "cache_read_input_tokens": 48000}


@pytest.fixture(scope="module")
def gw(module_fake):
    with Gateway(routed_rules(module_fake.url)) as gateway:
        yield gateway


def claude(gw: Gateway, mode: str, **kw):
    if mode == "base-url":
        return realclients.run_claude("hello", base_url=gw.base_url, **kw)
    env = {"HTTPS_PROXY": gw.proxy_url, "NODE_EXTRA_CA_CERTS": str(gw.ca_cert), **kw.pop("env_extra", {})}
    return realclients.run_claude("hello", env_extra=env, **kw)


@pytest.mark.parametrize("mode", ["base-url", "egress"])
def test_claude_code_is_detected_with_its_session_and_usage(gw, module_fake, mode):
    module_fake.clear()
    module_fake.script(Scenario(text="Hi from upstream", usage=USAGE))
    done = claude(gw, mode)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Hi from upstream"
    [seen] = [q for q in module_fake.requests if q.path_only == "/v1/messages"]
    session = seen.headers.get("x-claude-code-session-id")
    assert session
    record = gw.wait_record(lambda r: r["request_id"] == seen.request_id)
    assert (record["client"], record["session"], record["mode"]) == (
        "claude-code", session, "reverse" if mode == "base-url" else "regular")
    for key, value in USAGE.items():
        assert record[key] == value
    assert record["stream_requested"] is True and record["complete"] is True
    # the model Claude Code asks for by default (the fake answers with it) is priced from the library
    assert record["model"] == seen.json["model"] and record["model"].startswith("claude-")
    assert record["cost_usd"] and record["price_source"].startswith("genai-prices "), record


def test_forced_off_upstream_costs_one_request_per_turn(gateway_factory, fake):
    clients = [{"name": "claude-code", "headers": ["x-claude-code-session-id"], "stream": "off"}]
    gw = gateway_factory(routed_rules(fake.url, clients=clients))
    fake.script(Scenario(text="Converted for you", usage=USAGE))
    done = realclients.run_claude("hello", base_url=gw.base_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Converted for you"
    messages = [q for q in fake.requests if q.path_only == "/v1/messages"]
    assert len(messages) == 1  # Claude Code did not resend the turn without streaming
    assert messages[0].json["stream"] is False
    [record] = gw.records(count=1)
    assert record["converted"] == "json->sse" and record["stream_requested"] is True
    assert record["cache_read_input_tokens"] == USAGE["cache_read_input_tokens"]


@pytest.fixture(scope="module")
def cc_via_litellm(module_fake):
    """Claude Code -> gateway -> LiteLLM 1.91.5 pass-through (wraps errors) -> fake upstream."""
    with realclients.LiteLLMProxy("1.91.5", anthropic_base_url=module_fake.url) as proxy:
        with Gateway(routed_rules(f"{proxy.url}/anthropic")) as gw:
            yield proxy, gw


NATIVE_MESSAGE = "Your org may not use this model (7f3a)"


@pytest.mark.parametrize("through_gateway", [False, True], ids=["litellm-alone", "through-gateway"])
def test_claude_code_shows_the_native_message_not_the_envelope(cc_via_litellm, module_fake, through_gateway):
    """LiteLLM alone makes Claude Code print its bytes-repr envelope; through the gateway it prints the message."""
    proxy, gw = cc_via_litellm
    module_fake.clear()
    module_fake.script(Scenario.error(403, "permission_error", NATIVE_MESSAGE))
    base_url = gw.base_url if through_gateway else f"{proxy.url}/anthropic"
    done = realclients.run_claude("hello", base_url=base_url, env_extra={"ANTHROPIC_API_KEY": proxy.master_key})
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert len(module_fake.requests) == 1
    if not through_gateway:
        assert "403 b'{" in out, out
        return
    assert f"403 {NATIVE_MESSAGE}" in out, out
    assert "b'{" not in out and '"type":"error"' not in out
    [record] = gw.wait_records(lambda r: r["status"] == 403, count=1)[-1:]
    assert record["unwrapped"] is True and record["error_type"] == "permission_error"
    assert record["unwrapped_from"].startswith("litellm-bytes-repr")


@pytest.fixture(scope="module")
def cc_via_routed_litellm(module_fake):
    """Claude Code -> gateway -> LiteLLM 1.106.2 routed /v1/messages (turns a 529 into a 500) -> fake."""
    with realclients.LiteLLMProxy("1.106.2", models=["claude-test-1"], routed_api_base=module_fake.url) as proxy:
        with Gateway(routed_rules(proxy.url)) as gw:
            yield proxy, gw


@pytest.mark.parametrize("through_gateway", [False, True], ids=["litellm-alone", "through-gateway"])
def test_claude_code_treats_a_wrapped_529_as_overload(cc_via_routed_litellm, module_fake, through_gateway):
    proxy, gw = cc_via_routed_litellm
    module_fake.clear()
    module_fake.script(*[Scenario.error(529, "overloaded_error", "Overloaded")] * 12)
    done = realclients.run_claude(
        "hello", base_url=gw.base_url if through_gateway else proxy.url, args=["--model", "claude-test-1"],
        env_extra={"ANTHROPIC_API_KEY": proxy.master_key},
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0
    if not through_gateway:
        assert "API Error: 500 litellm.InternalServerError" in out, out
        return
    assert "API Error: 529 Overloaded" in out, out
    assert "litellm" not in out.lower()
    records = gw.wait_records(lambda r: r["status"] == 529, count=1)
    assert records and all(r["error_type"] == "overloaded_error" and r["unwrapped"] for r in records)
