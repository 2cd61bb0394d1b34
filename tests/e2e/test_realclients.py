"""Real clients (Claude Code, LiteLLM proxy) straight against the fake upstream: proves the helpers and the fake.

These need scripts/test-tools to have run; a missing client fails unless LLM_GATEWAY_ALLOW_SKIP=1.
"""

from __future__ import annotations

import json
import re
import uuid

import anthropic
import pytest

import realclients
from fakes.upstream import DEFAULT_TEXT, FakeUpstream, Scenario
from realclients import LITELLM_VERSIONS, LiteLLMProxy, run_claude

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def fake():
    with FakeUpstream() as f:
        yield f


# ------------------------------------------------------------------------------------------ helpers (fast)
def test_missing_client_fails_loudly_unless_skips_are_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_GATEWAY_CACHE", str(tmp_path))
    monkeypatch.delenv("LLM_GATEWAY_ALLOW_SKIP", raising=False)
    assert realclients.cache_dir() == tmp_path
    with pytest.raises(pytest.fail.Exception, match="scripts/test-tools"):
        realclients.claude_binary()
    with pytest.raises(pytest.fail.Exception, match="LiteLLM 1.91.5"):
        realclients.litellm_binary("1.91.5")
    monkeypatch.setenv("LLM_GATEWAY_ALLOW_SKIP", "1")
    with pytest.raises(pytest.skip.Exception):
        realclients.claude_binary()
    with pytest.raises(pytest.skip.Exception):
        realclients.litellm_binary("1.106.2")


def test_litellm_config_is_generated(tmp_path):
    p = LiteLLMProxy("1.91.5", anthropic_base_url="http://127.0.0.1:1", models=["claude-a", {"model_name": "x", "litellm_params": {"model": "anthropic/y"}}])
    cfg = p.config()
    assert cfg["general_settings"]["master_key"] == "os.environ/LITELLM_MASTER_KEY"
    assert cfg["router_settings"] == {"num_retries": 0, "disable_cooldowns": True}
    assert cfg["model_list"][0] == {"model_name": "claude-a", "litellm_params": {
        "model": "anthropic/claude-a", "api_key": "os.environ/ANTHROPIC_API_KEY", "api_base": "http://127.0.0.1:1"}}
    assert cfg["model_list"][1]["model_name"] == "x"
    env = p.env()
    assert env["ANTHROPIC_API_BASE"] == "http://127.0.0.1:1" and env["LITELLM_MASTER_KEY"] == p.master_key
    assert env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True" and env["LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS"] == "True"


# ------------------------------------------------------------------------------------------ Claude Code
@pytest.mark.e2e
def test_claude_code_against_the_fake(fake):
    done = run_claude("hello", base_url=fake.url, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == DEFAULT_TEXT

    [req] = fake.requests
    assert req.method == "POST" and req.path == "/v1/messages?beta=true"
    h = req.headers
    assert re.fullmatch(r"claude-cli/\d+\.\d+\.\d+ \(external, [\w-]+\)", h["user-agent"]), h["user-agent"]
    assert h["x-app"] == "cli"
    session = h["x-claude-code-session-id"]
    uuid.UUID(session)
    assert "claude-code-20250219" in h["anthropic-beta"].split(",")
    assert h["anthropic-version"] == "2023-06-01"
    assert h["x-api-key"] == done.env["ANTHROPIC_API_KEY"] and "authorization" not in h
    assert h["x-stainless-lang"] == "js"
    assert "gzip" in h["accept-encoding"]

    body = req.json
    assert body["stream"] is True
    assert {"model", "messages", "system", "max_tokens", "metadata", "stream"} <= set(body)
    user_id = json.loads(body["metadata"]["user_id"])  # from 2.1.78: a JSON string
    assert user_id["session_id"] == session
    # 2.1.330 also puts a {"role": "system"} turn (environment) into messages
    assert {m["role"] for m in body["messages"]} <= {"user", "assistant", "system"}
    assert any(m["role"] == "user" and "hello" in json.dumps(m) for m in body["messages"])
    assert body["system"][0]["text"].startswith("x-anthropic-billing-header: cc_version=")
    assert fake.last_message["model"] == body["model"]


@pytest.mark.e2e
def test_claude_code_shows_a_native_error(fake):
    fake.script(Scenario.error(429, message="zzz custom rate limit text 123"))
    done = run_claude("hello", base_url=fake.url, timeout=120)  # CLAUDE_CODE_MAX_RETRIES=0: no retry
    assert done.returncode != 0
    assert "zzz custom rate limit text 123" in done.stdout + done.stderr
    assert [r.status for r in fake.requests] == [429]


@pytest.mark.e2e
@pytest.mark.parametrize("broken", [Scenario(stream=False), Scenario(error_after=3)], ids=["json-answer", "midstream-error"])
def test_claude_code_resends_without_streaming_when_the_stream_fails(fake, broken):
    """Why the gateway must never answer a streaming request with JSON: Claude Code pays twice."""
    fake.script(broken)
    done = run_claude("hello", base_url=fake.url, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == DEFAULT_TEXT
    assert [r.json["stream"] for r in fake.requests] == [True, False]


# ------------------------------------------------------------------------------------------ LiteLLM
@pytest.fixture(scope="module", params=LITELLM_VERSIONS)
def litellm(request):
    """(proxy, fake): a LiteLLM proxy of each version, passing through to (and routing to) one fake upstream."""
    with FakeUpstream() as f, LiteLLMProxy(request.param, anthropic_base_url=f.url, models=["claude-routed"]) as p:
        yield p, f


@pytest.fixture
def proxy(litellm):
    p, f = litellm
    f.clear()
    return p


@pytest.fixture
def upstream(litellm):
    return litellm[1]


@pytest.mark.e2e
def test_litellm_pass_through_json(proxy, upstream):
    c = anthropic.Anthropic(base_url=proxy.url + "/anthropic", api_key=proxy.master_key, max_retries=0, timeout=60)
    msg = c.messages.create(model="claude-x", max_tokens=5, messages=HELLO)
    assert msg.content[0].text == DEFAULT_TEXT
    assert msg.model_dump(exclude_none=True) == anthropic.types.Message.model_validate(upstream.last_message).model_dump(exclude_none=True)
    [req] = upstream.requests
    assert req.path_only == "/v1/messages" and req.json["model"] == "claude-x"
    assert req.headers["x-api-key"] == proxy.api_key  # LiteLLM put its own upstream key in


@pytest.mark.e2e
def test_litellm_pass_through_stream(proxy, upstream):
    c = anthropic.Anthropic(base_url=proxy.url + "/anthropic", api_key=proxy.master_key, max_retries=0, timeout=60)
    with c.messages.stream(model="claude-x", max_tokens=5, messages=HELLO) as s:
        final = s.get_final_message()
    assert final.model_dump(exclude_none=True) == anthropic.types.Message.model_validate(upstream.last_message).model_dump(exclude_none=True)
    [req] = upstream.requests
    assert req.json["stream"] is True


@pytest.mark.e2e
def test_litellm_routed_messages(proxy, upstream):
    c = anthropic.Anthropic(base_url=proxy.url, api_key=proxy.master_key, max_retries=0, timeout=60)
    msg = c.messages.create(model="claude-routed", max_tokens=5, messages=HELLO)
    assert msg.content[0].text == DEFAULT_TEXT
    [req] = upstream.requests
    assert req.headers["user-agent"] == f"litellm/{proxy.version}"
    assert req.json["model"] == "claude-routed"


@pytest.mark.e2e
def test_claude_code_through_litellm_pass_through(proxy, upstream):
    done = run_claude("hello", base_url=proxy.url + "/anthropic", env_extra={"ANTHROPIC_API_KEY": proxy.master_key})
    assert done.returncode == 0, done.stderr + proxy.log_text()[-3000:]
    assert done.stdout.strip() == DEFAULT_TEXT
    [req] = upstream.requests
    assert req.path == "/v1/messages?beta=true"
    # the pass-through forwards Claude Code's own headers: the upstream still sees Claude Code, not LiteLLM
    assert req.headers["user-agent"].startswith("claude-cli/") and req.headers["x-app"] == "cli"
    assert req.headers["x-api-key"] == proxy.api_key
