"""Claude Code's gateway protocol as a test suite: one test per rule of its "Messages" and "Errors" sections
(/work/shared/reference/claude-code-gateway-protocol.md; `claude gateway` serves the full text at `GET /protocol`),
each named after the rule, in both modes (base URL and egress), through one real mitmdump for the module.

A real Claude Code drives the rules about what it sends (the `?beta=true` path, its beta values and unknown
headers, its session header); the real Anthropic SDK, or a plain HTTP client where the wire bytes are the point,
drives the rest. The usage-limit headers section (`anthropic-ratelimit-unified-*`, `billing_error` caps) belongs
to the quotas work (issue 25) and is left out here.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl

import pytest

import realclients
import sdk_client
from conftest import routed_rules
from fakes.upstream import Scenario
from harness import Gateway

pytestmark = pytest.mark.e2e

MODES = ("base-url", "egress")
CAP = 1024 * 1024  # limits.request_body of this gateway, bytes
HOST = "api.anthropic.com"


@pytest.fixture(scope="module")
def gw(module_fake):
    with Gateway(routed_rules(module_fake.url, extra=f"limits: {{request_body: {CAP}}}\n")) as gateway:
        yield gateway


def post(gw: Gateway, mode: str, path: str, body: bytes | dict, headers: dict[str, str] | None = None,
         timeout: float = 20) -> tuple[int, dict[str, str], bytes]:
    """One request as plain HTTP: to the base-URL listener, or through the proxy (CONNECT, the gateway's CA)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"content-type": "application/json", "x-api-key": "sk-ant-test-conformance", **(headers or {})}
    if mode == "base-url":
        conn = http.client.HTTPConnection("127.0.0.1", gw.reverse_port, timeout=timeout)
    else:
        context = ssl.create_default_context(cafile=str(gw.ca_bundle()))
        conn = http.client.HTTPSConnection("127.0.0.1", gw.regular_port, timeout=timeout, context=context)
        conn.set_tunnel(HOST, 443)
    try:
        conn.request("POST", path, data, sent)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def sdk(gw: Gateway, mode: str, scenario: Scenario, call: str = "create") -> dict:
    headers = {"x-fake-scenario": scenario.to_header()}
    if mode == "base-url":
        return sdk_client.run(call, base_url=gw.base_url, headers=headers)
    return sdk_client.run(call, env={"HTTPS_PROXY": gw.proxy_url, "SSL_CERT_FILE": str(gw.ca_bundle())},
                          headers=headers)


@pytest.fixture(scope="module")
def claude_turns(gw, module_fake):
    """One real Claude Code turn per mode: what it printed and what the upstream received from it."""
    turns = {}
    for mode in MODES:
        start = len(module_fake.requests)
        answer = {"ANTHROPIC_CUSTOM_HEADERS": f"x-fake-scenario: {Scenario(text='Hi from the gateway').to_header()}"}
        if mode == "base-url":
            done = realclients.run_claude("hello", base_url=gw.base_url, env_extra=answer)
        else:
            done = realclients.run_claude("hello", env_extra={
                **answer, "HTTPS_PROXY": gw.proxy_url, "NODE_EXTRA_CA_CERTS": str(gw.ca_bundle())})
        turns[mode] = (done, [r for r in module_fake.requests[start:] if r.path_only.endswith("/v1/messages")])
    return turns


def main_turn(claude_turns, mode: str):
    done, requests = claude_turns[mode]
    assert done.returncode == 0 and "Hi from the gateway" in done.stdout, (done.stdout, done.stderr[-2000:])
    assert requests, "Claude Code's request never reached the upstream"
    return max(requests, key=lambda r: len(r.body))  # the turn itself (side requests are small)


# ------------------------------------------------------------------------------------------------- Messages


@pytest.mark.parametrize("mode", MODES)
def test_messages_path_may_carry_beta_true(claude_turns, mode):
    """`POST /v1/messages?beta=true` is the Messages API unchanged (Claude Code sends it so)."""
    turn = main_turn(claude_turns, mode)
    assert turn.path == "/v1/messages?beta=true", turn.path


@pytest.mark.parametrize("mode", MODES)
def test_count_tokens_is_the_messages_api_unchanged(gw, module_fake, mode):
    status, _, body = post(gw, mode, "/v1/messages/count_tokens?beta=true",
                           {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and isinstance(json.loads(body).get("input_tokens"), int), body
    assert module_fake.requests[-1].path == "/v1/messages/count_tokens?beta=true"


@pytest.mark.parametrize("mode", MODES)
def test_stream_true_is_streamed_back_without_buffering(gw, mode):
    """The first events reach the client while the upstream still holds the rest back (it stalls after two)."""
    body = {"model": "claude-test-1", "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    sent = json.dumps(body).encode()
    head = (f"POST /v1/messages HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\n"
            f"x-api-key: sk-ant-test\r\nx-fake-scenario: {Scenario(stall_after=2).to_header()}\r\n"
            f"content-length: {len(sent)}\r\n\r\n").encode()
    raw = socket.create_connection(("127.0.0.1", gw.reverse_port if mode == "base-url" else gw.regular_port), 20)
    try:
        conn: socket.socket = raw
        if mode == "egress":
            raw.sendall(f"CONNECT {HOST}:443 HTTP/1.1\r\nhost: {HOST}:443\r\n\r\n".encode())
            assert b" 200 " in raw.recv(4096)
            conn = ssl.create_default_context(cafile=str(gw.ca_bundle())).wrap_socket(raw, server_hostname=HOST)
        conn.sendall(head + sent)
        received = b""
        while b"event: ping" not in received:  # bounded by the socket timeout: buffering would never get here
            chunk = conn.recv(65536)
            assert chunk, received
            received += chunk
        assert b"event: message_start" in received and b"message_stop" not in received
    finally:
        raw.close()


@pytest.mark.parametrize("mode", MODES)
def test_never_reject_unknown_headers(claude_turns, mode):
    """Claude Code's `x-app` and `x-stainless-*` headers never fail a request (here they are forwarded)."""
    turn = main_turn(claude_turns, mode)
    assert turn.headers.get("x-app") == "cli" and any(k.lower().startswith("x-stainless-") for k in turn.headers)


@pytest.mark.parametrize("mode", MODES)
def test_never_reject_unknown_body_fields_or_beta_values(gw, module_fake, mode):
    """Pass body fields and `anthropic-beta` values to the upstream unchanged."""
    body = {"model": "claude-test-1", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
            "a_field_from_2099": {"nested": [1, "two"]}}
    beta = "a-beta-from-2099-01-01,interleaved-thinking-2025-05-14"
    status, _, _ = post(gw, mode, "/v1/messages?beta=true", body, {"anthropic-beta": beta, "x-header-from-2099": "1"})
    assert status == 200
    seen = module_fake.requests[-1]
    assert seen.json == body and seen.headers.get("anthropic-beta") == beta
    assert seen.headers.get("x-header-from-2099") == "1"


@pytest.mark.parametrize("mode", MODES)
def test_claude_codes_own_beta_values_pass_unchanged(claude_turns, mode):
    turn = main_turn(claude_turns, mode)
    assert "claude-code-20250219" in turn.headers.get("anthropic-beta", ""), turn.headers.get("anthropic-beta")


@pytest.mark.parametrize("mode", MODES)
def test_auto_mode_safeguards_and_their_results_pass_through(gw, module_fake, mode):
    """Auto mode's top-level `safeguards` field and beta reach the upstream; `safeguard_results` comes back."""
    body = {"model": "claude-test-1", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
            "safeguards": {"mode": "auto", "checks": ["destructive_commands"]}}
    results = {"checks": [{"name": "destructive_commands", "flagged": False}]}
    scenario = Scenario(message={"safeguard_results": results})
    status, _, answer = post(gw, mode, "/v1/messages?beta=true", body, {
        "anthropic-beta": "auto-mode-2026-01-01", "x-fake-scenario": scenario.to_header()})
    assert status == 200 and json.loads(answer)["safeguard_results"] == results
    seen = module_fake.requests[-1]
    assert seen.json["safeguards"] == body["safeguards"] and seen.headers["anthropic-beta"] == "auto-mode-2026-01-01"


@pytest.mark.parametrize("mode", MODES)
def test_attribution_headers_are_kept(gw, module_fake, claude_turns, mode):
    """`x-claude-code-session-id` (Claude Code sends it), `x-claude-code-agent-id` and `-parent-agent-id` (its
    subagents send them) reach the upstream and the record."""
    turn = main_turn(claude_turns, mode)
    assert turn.headers.get("x-claude-code-session-id")
    ids = {"x-claude-code-session-id": "conf-session", "x-claude-code-agent-id": "conf-agent",
           "x-claude-code-parent-agent-id": "conf-parent"}
    status, _, _ = post(gw, mode, "/v1/messages", {"model": "claude-test-1", "max_tokens": 8, "messages": []}, ids)
    assert status == 200
    seen = module_fake.requests[-1]
    assert {k: seen.headers.get(k) for k in ids} == ids
    record = gw.wait_record(lambda r: r.get("agent_id") == "conf-agent" and r["mode"] == (
        "reverse" if mode == "base-url" else "regular"))
    assert (record["session"], record["parent_agent_id"]) == ("conf-session", "conf-parent")


@pytest.mark.parametrize("mode", MODES)
def test_a_body_over_the_cap_is_a_413(gw, mode):
    """The client always sends Content-Length; a gateway may cap the size: 413 `request_too_large`."""
    status, headers, body = post(gw, mode, "/v1/messages", b"{" + b" " * (CAP + 10) + b"}")
    assert status == 413 and json.loads(body)["error"]["type"] == "request_too_large"
    assert headers.get("x-should-retry") == "false"


# --------------------------------------------------------------------------------------------------- Errors

ERRORS = {
    # rule name: (status, error type, the SDK's exception class, x-should-retry the client gets)
    "invalid_request_error_400": (400, "invalid_request_error", "BadRequestError", "false"),
    "permission_error_403": (403, "permission_error", "PermissionDeniedError", "false"),
    "rate_limit_error_429": (429, "rate_limit_error", "RateLimitError", "true"),
    "not_supported_501_not_retried": (501, "not_supported", "HTTPNotImplementedError", "false"),
    "overloaded_error_529": (529, "overloaded_error", "OverloadedError", "true"),
    "api_error_5xx": (500, "api_error", "InternalServerError", "true"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", list(ERRORS))
def test_errors_reach_the_client_in_anthropics_shape(gw, mode, rule):
    """Upstream errors are relayed in Anthropic's envelope, with their status, type and exact message (Claude
    Code's recovery matches some messages), `retry-after` kept, and whether to retry said."""
    status, etype, cls, retry = ERRORS[rule]
    message = "prompt is too long: 250000 tokens > 200000 maximum" if status == 400 else f"conformance {etype}"
    scenario = Scenario(status=status, error_type=etype, error_message=message, retry_after=7 if status == 429 else None)
    result = sdk(gw, mode, scenario)
    assert (result["error"], result["status"], result["type"]) == (cls, status, etype), result
    assert message in result["message"]
    got, headers, body = post(gw, mode, "/v1/messages", {"model": "claude-test-1", "max_tokens": 8, "messages": []},
                              {"x-fake-scenario": scenario.to_header()})
    parsed = json.loads(body)
    assert got == status and parsed["type"] == "error" and parsed["error"] == {"type": etype, "message": message}
    assert headers.get("x-should-retry") == retry
    if status == 429:
        assert headers.get("retry-after") == "7"


@pytest.fixture(scope="module")
def custody_gw(tmp_path_factory, module_fake):
    from e2e.test_e2e_credentials import UPSTREAM_KEY, credentials_rules
    from secretvolume import write_secret

    key_file = write_secret(tmp_path_factory.mktemp("custody") / "secret", "api-key", UPSTREAM_KEY + "\n")
    with Gateway(credentials_rules(module_fake.url, key_file)) as gateway:
        yield gateway


@pytest.mark.parametrize("mode", MODES)
def test_authentication_error_401_for_an_unknown_credential_is_not_retried(custody_gw, mode):
    """A revoked or unknown gateway token: 401 `authentication_error` with `x-should-retry: false` (Claude Code
    would otherwise retry for about three minutes)."""
    status, headers, body = post(custody_gw, mode, "/v1/messages",
                                 {"model": "claude-test-1", "max_tokens": 8, "messages": []},
                                 {"x-api-key": "llmgw-revoked-or-unknown"})
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert headers.get("x-should-retry") == "false"
