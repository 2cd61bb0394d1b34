"""Claude Code's gateway protocol as a test suite: one test per rule of its "Messages" and "Errors" sections
(/work/shared/reference/claude-code-gateway-protocol.md; `claude gateway` serves the full text at `GET /protocol`),
each named after the rule, in both modes (base URL and egress), through one real mitmdump for the module.

A real Claude Code drives the rules about what it sends (the `?beta=true` path, its beta values and unknown
headers, its session header); the real Anthropic SDK, or a plain HTTP client where the wire bytes are the point,
drives the rest. The "Usage-limit headers" section (`anthropic-ratelimit-unified-*`, `billing_error` caps) runs
against the same gateway's `quotas` (memory store), whose budgets match only models no other test asks for; its
fail-closed rule against a second gateway whose Redis store is unreachable.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time

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
# Usage limits: the caller's own cap (per session) and a group's pool, each on a model only its tests ask for.
CAPPED_MODEL = "claude-3-7-sonnet-20250219"  # $3 / $15 per million input / output tokens
POOLED_MODEL = "claude-3-opus-20240229"
OWN_CAP = 0.0112  # US dollars a day per session
QUOTAS = f"""quotas:
  budgets:
    - {{name: own-cap, per: session, match: {{model: "{CAPPED_MODEL}"}}, usd: {{daily: {OWN_CAP}}}}}
    - {{name: group-pool, match: {{model: "{POOLED_MODEL}"}}, usd: {{monthly: 0.000001}}}}
"""


@pytest.fixture(scope="module")
def gw(module_fake):
    # `/v1/models` among the API paths so that it reaches the fake too (with the default rules it goes, as any
    # non-API path, to the host the client named)
    rules = routed_rules(module_fake.url, extra=f"limits: {{request_body: {CAP}}}\n" + QUOTAS)
    rules = rules.replace('paths: ["/v1/messages", ', 'paths: ["/v1/models", "/v1/messages", ', 1)
    with Gateway(rules) as gateway:
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


@pytest.mark.parametrize("mode", MODES)
def test_authentication_error_401_for_an_unknown_credential_is_not_retried(custody_gw, mode):
    """A revoked or unknown gateway token: 401 `authentication_error` with `x-should-retry: false` (Claude Code
    would otherwise retry for about three minutes)."""
    status, headers, body = post(custody_gw, mode, "/v1/messages",
                                 {"model": "claude-test-1", "max_tokens": 8, "messages": []},
                                 {"x-api-key": "llmgw-revoked-or-unknown"})
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert headers.get("x-should-retry") == "false"


@pytest.mark.parametrize("mode", MODES)
def test_get_v1_models_passes_and_its_404_means_the_built_in_list(gw, module_fake, mode):
    """`GET /v1/models` reaches the upstream and its `{"data":[{"id","display_name"}]}` the client, unchanged; an
    upstream 404 stays a 404 (the client then uses its built-in list) in Anthropic's envelope."""
    models = {"data": [{"type": "model", "id": "claude-sonnet-4-5-20250929", "display_name": "Claude Sonnet 4.5"}],
              "has_more": False, "first_id": "claude-sonnet-4-5-20250929", "last_id": "claude-sonnet-4-5-20250929"}
    status, _, body = get(gw, mode, "/v1/models", {"x-fake-scenario": Scenario.raw(200, models).to_header()})
    assert status == 200 and json.loads(body) == models, body
    assert module_fake.requests[-1].method == "GET" and module_fake.requests[-1].path == "/v1/models"
    missing = Scenario(status=404, error_type="not_found_error", error_message="Not found")
    status, _, body = get(gw, mode, "/v1/models", {"x-fake-scenario": missing.to_header()})
    assert status == 404 and json.loads(body)["error"] == {"type": "not_found_error", "message": "Not found"}


@pytest.mark.parametrize("mode", MODES)
def test_an_upstream_that_cannot_take_safeguards_answers_400_naming_them(gw, module_fake, mode):
    """Auto mode's fallback: a backend without `safeguards` answers 400 `invalid_request_error` naming the field;
    that answer reaches the client as it is (status, type, message), so it retries without them."""
    message = "safeguards: Extra inputs are not permitted"
    refusal = Scenario(status=400, error_type="invalid_request_error", error_message=message)
    body = {"model": "claude-test-1", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
            "safeguards": {"mode": "auto"}}
    status, headers, answer = post(gw, mode, "/v1/messages?beta=true", body, {
        "anthropic-beta": "auto-mode-2026-01-01", "x-fake-scenario": refusal.to_header()})
    assert status == 400 and json.loads(answer)["error"] == {"type": "invalid_request_error", "message": message}
    assert module_fake.requests[-1].json["safeguards"] == {"mode": "auto"}  # it was passed, not dropped


# ------------------------------------------------------------------------------------------ Usage-limit headers

USAGE_600 = {"input_tokens": 10, "output_tokens": 600, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
UNIFIED = "anthropic-ratelimit-unified-"


def get(gw: Gateway, mode: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    if mode == "base-url":
        conn = http.client.HTTPConnection("127.0.0.1", gw.reverse_port, timeout=20)
    else:
        context = ssl.create_default_context(cafile=str(gw.ca_bundle()))
        conn = http.client.HTTPSConnection("127.0.0.1", gw.regular_port, timeout=20, context=context)
        conn.set_tunnel(HOST, 443)
    try:
        conn.request("GET", path, headers={"x-api-key": "sk-ant-test-conformance", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def spend(gw: Gateway, mode: str, session: str, model: str = CAPPED_MODEL, output_tokens: int = 600,
          ratelimit: dict | None = None) -> tuple[int, dict[str, str], dict]:
    """One Messages request of `session` whose answer bills `output_tokens` (and 10 input tokens); then a pause
    for the settlement that follows the answer."""
    scenario = Scenario(usage={**USAGE_600, "output_tokens": output_tokens}, ratelimit=ratelimit)
    status, headers, body = post(gw, mode, "/v1/messages", {
        "model": model, "max_tokens": 600, "messages": [{"role": "user", "content": "hi"}]},
        {"x-claude-code-session-id": f"{session}-{mode}", "x-fake-scenario": scenario.to_header()})
    time.sleep(0.3)
    return status, headers, json.loads(body)


def unified(headers: dict[str, str]) -> dict[str, str]:
    return {k[len(UNIFIED):]: v for k, v in headers.items() if k.startswith(UNIFIED)}


@pytest.mark.parametrize("mode", MODES)
def test_a_capped_callers_success_reports_their_own_standing(gw, mode):
    """status `allowed`, representative-claim `overage`, overage-status as status, utilization with two
    decimals below 1, both reset headers (Unix seconds, in the future); no threshold below 75 %."""
    status, headers, _ = spend(gw, mode, "standing")
    assert status == 200
    got = unified(headers)
    assert (got.pop("status"), got.pop("representative-claim"), got.pop("overage-status")) == ("allowed", "overage", "allowed")
    assert got.pop("overage-utilization") == "0.00"  # nothing spent before this one
    reset = got.pop("reset")
    assert got.pop("overage-reset") == reset and int(reset) > time.time()
    assert got == {}, got  # no surpassed-threshold below 75 %


@pytest.mark.parametrize("mode", MODES)
def test_the_upstreams_own_ratelimit_headers_are_removed_for_a_capped_caller(gw, mode):
    """An org-wide quota must not reach users as if it were theirs."""
    status, headers, _ = spend(gw, mode, "removed", ratelimit={"requests-remaining": 7, "tokens-limit": 1000})
    assert status == 200 and headers[UNIFIED + "status"] == "allowed"
    assert not [k for k in headers if k.startswith("anthropic-ratelimit-") and not k.startswith(UNIFIED)], headers


@pytest.mark.parametrize("mode", MODES)
def test_no_usage_headers_for_a_caller_without_a_cap(gw, mode):
    status, headers, _ = spend(gw, mode, "uncapped", model="claude-haiku-4-5")
    assert status == 200 and unified(headers) == {}


@pytest.mark.parametrize("mode", MODES)
def test_surpassed_threshold_is_075_then_095_with_allowed_warning(gw, mode):
    """Past 75 % `allowed_warning` and surpassed-threshold `0.75`; past 95 % `0.95` (Claude Code's notice)."""
    seen = []
    # $0.00903, then $0.00168: 0 %, 81 %, then 96 % of $0.0112 spent before each answer
    for output_tokens in (600, 110, 1):
        status, headers, _ = spend(gw, mode, "thresholds", output_tokens=output_tokens)
        assert status == 200
        got = unified(headers)
        seen.append((got["status"], got["overage-status"], got.get("overage-surpassed-threshold")))
        assert float(got["overage-utilization"]) < 1
    assert seen == [("allowed", "allowed", None), ("allowed_warning", "allowed_warning", "0.75"),
                    ("allowed_warning", "allowed_warning", "0.95")]


@pytest.mark.parametrize("mode", MODES)
def test_the_callers_own_cap_reached_is_a_429_billing_error_with_spend_limit_reached(gw, module_fake, mode):
    """Refused before proxying: 429, `retry-after` to the reset, `x-should-retry: false`, status `rejected`, both
    resets, utilization and threshold `1`, the period, `org_spend_cap_reached`; no representative-claim or
    overage-status; `billing_error` with one sentence and `details.error_code: spend_limit_reached`."""
    assert spend(gw, mode, "own-cap", output_tokens=2000)[0] == 200  # $0.03003: over the $0.0112 cap
    sent = len(module_fake.requests)
    status, headers, body = spend(gw, mode, "own-cap")
    assert status == 429 and len(module_fake.requests) == sent  # nothing went upstream
    assert headers["x-should-retry"] == "false"
    got = unified(headers)
    reset = int(got.pop("reset"))
    assert int(got.pop("overage-reset")) == reset and 0 < int(headers["retry-after"]) <= reset - time.time() + 2
    assert got == {"status": "rejected", "overage-utilization": "1", "overage-surpassed-threshold": "1",
                   "overage-period": "daily", "overage-disabled-reason": "org_spend_cap_reached"}
    error = body["error"]
    assert (body["type"], error["type"], error["details"]) == ("error", "billing_error", {"error_code": "spend_limit_reached"})
    assert "own-cap" in error["message"] and "resets at" in error["message"]


@pytest.mark.parametrize("mode", MODES)
def test_a_group_pool_reached_has_the_monthly_shape_with_group_pool_scope_and_no_details(gw, mode):
    for _ in range(2):  # the pool is shared by both modes: the first exchange of the module spends it
        status, headers, body = spend(gw, mode, "pool", model=POOLED_MODEL)
        if status == 429:
            break
    assert status == 429 and headers["x-should-retry"] == "false" and int(headers["retry-after"]) > 0
    got = unified(headers)
    assert (got["status"], got["overage-period"], got["overage-scope"]) == ("rejected", "monthly", "group_pool")
    assert got["overage-disabled-reason"] == "org_spend_cap_reached"
    assert "representative-claim" not in got and "overage-status" not in got
    assert body["error"]["type"] == "billing_error" and "details" not in body["error"]


@pytest.fixture(scope="module")
def unreadable_store_gw(module_fake):
    """Spend counters in a Redis nobody listens on, failing closed."""
    from harness import free_port

    quotas = (f"quotas:\n  store: redis://127.0.0.1:{free_port()}/0\n  on_store_error: closed\n"
              f"  budgets:\n    - {{name: own-cap, per: session, usd: {{daily: 5}}}}\n")
    with Gateway(routed_rules(module_fake.url, extra=quotas)) as gateway:
        yield gateway


@pytest.mark.parametrize("mode", MODES)
def test_a_counter_that_cannot_be_read_fails_closed_with_fetch_error(unreadable_store_gw, module_fake, mode):
    """429, `x-should-retry: false`, `…-overage-disabled-reason: fetch_error`, a message, nothing else."""
    sent = len(module_fake.requests)
    status, headers, body = spend(unreadable_store_gw, mode, "fetch-error")
    assert status == 429 and len(module_fake.requests) == sent
    assert headers["x-should-retry"] == "false" and unified(headers) == {"overage-disabled-reason": "fetch_error"}
    assert "retry-after" not in headers
    assert body["type"] == "error" and body["error"]["type"] == "billing_error" and body["error"]["message"]
    assert "details" not in body["error"]
