"""End to end, the kinds of issue 29: what real upstreams and relays send that the gateway misread. A real
mitmdump in both modes, the real Anthropic SDK as the client, the fake upstream (or a raw socket) answering
with the exact bytes. Each case failed on the code before the fix: the SDK raised the wrong class (or none),
or the record said something else than what was billed and received.
"""

from __future__ import annotations

import http.client
import json
import socket

import pytest
import yaml

from conftest import DEFAULT_RULES, routed_rules
from e2e.test_e2e_answer import ResettingUpstream, sdk
from e2e.test_e2e_faults import BadUpstream
from fakes.upstream import Scenario
from harness import Gateway, free_port
from unit.pipeline.test_answer import SSE, frame, message_start

pytestmark = pytest.mark.e2e

MODES = ("base-url", "egress")
USAGE = {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 12000,
         "cache_creation_input_tokens": 0}


def message_events(text: str = "hello there", named: bool = True, delta_usage: dict | None = None) -> bytes:
    """A whole Messages stream; `named` False sends every frame data-only, as relays do."""
    def f(name: str, data: dict) -> bytes:
        return frame(name if named else None, data)

    start = message_start(USAGE)
    if not named:
        start = start.split(b"\n", 1)[1]
    return b"".join([
        start,
        f("content_block_start", {"type": "content_block_start", "index": 0,
                                  "content_block": {"type": "text", "text": ""}}),
        f("content_block_delta", {"type": "content_block_delta", "index": 0,
                                  "delta": {"type": "text_delta", "text": text}}),
        f("content_block_stop", {"type": "content_block_stop", "index": 0}),
        f("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                            "usage": delta_usage or {"output_tokens": 30}}),
        f("message_stop", {"type": "message_stop"}),
    ])


# An operator's correction: a model the price list lacks, with a long-context tier and a fast-mode factor.
PRICING = """\
pricing:
  - model: "claude-test-tiered*"
    input: 1
    output: 10
    cache_write_5m: 1.25
    cache_write_1h: 2
    cache_read: 0.1
    tiers: [{above: 5000, input: 2, output: 15, cache_write_5m: 2.5, cache_write_1h: 4, cache_read: 0.2}]
    multipliers: {speed: {fast: 2}}
"""


class UntidyUpstream(BadUpstream):
    """Answers a whole stream, message_stop included, then closes without the last chunk of its chunked body."""

    def answer(self, conn: socket.socket) -> None:
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:
                body += conn.recv(65536)
            events = message_events()
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                         b"request-id: req_untidy\r\n\r\n" + b"%x\r\n" % len(events) + events + b"\r\n")
        except OSError:
            pass
        finally:
            conn.close()


@pytest.fixture(scope="module")
def gw(module_fake):
    untidy, reset, refused = UntidyUpstream(), ResettingUpstream(), free_port()
    clients = [{"name": "forced-on", "headers": ["x-force-on"], "stream": "on"},
               *yaml.safe_load(DEFAULT_RULES.read_text())["clients"]]
    rules = routed_rules(module_fake.url, clients=clients, extra=PRICING).replace(
        'paths: ["/v1/messages"', 'paths: ["/untidy/v1/messages", "/reset/v1/messages", "/refused/v1/messages", '
                                  '"/v1/messages"'
    ).replace(
        "routes:\n",
        f'routes:\n  - {{match: {{path: "/untidy/*"}}, upstream: "http://127.0.0.1:{untidy.port}"}}\n'
        f'  - {{match: {{path: "/reset/*"}}, upstream: "http://127.0.0.1:{reset.port}"}}\n'
        f'  - {{match: {{path: "/refused/*"}}, upstream: "http://127.0.0.1:{refused}"}}\n', 1,
    )
    try:
        with Gateway(rules) as gateway:
            yield gateway
    finally:
        untidy.close()
        reset.close()


def last_record(gw: Gateway, before: int) -> dict:
    return gw.records(count=before + 1)[before]


def count(gw: Gateway) -> int:
    return len(gw.records(timeout=0, count=0))


# ------------------------------------------------------------------ streams read as the SSE specification says


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", ["stream", "create"])
def test_data_only_frames_take_their_meaning_from_their_type(gw, mode, call):
    """Every frame without `event:`: the client gets the Message (a stream, or converted to JSON for `create`),
    the record its usage."""
    before = count(gw)
    result = sdk(gw, mode, call, Scenario(status=200, content_type=SSE, body=message_events(named=False).decode()))
    assert result["ok"], result
    assert result["message"]["content"][0]["text"] == "hello there"
    assert result["message"]["usage"]["output_tokens"] == 30
    record = last_record(gw, before)
    assert (record["input_tokens"], record["output_tokens"], record["cache_read_input_tokens"]) == (10, 30, 12000)
    assert (record["complete"], record["error_type"]) == (True, None), record


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", ["stream", "create"])
def test_a_data_only_error_frame_keeps_its_type(gw, mode, call):
    """A native rate_limit_error without an `event: error` line: mid-stream the SDK raises it as sent; converted,
    it is a 429 RateLimitError (was: api_error for a truncated stream, or a retryable 500)."""
    error = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}, "request_id": "req_dl"}
    body = message_start(USAGE) + frame(None, error)
    before = count(gw)
    result = sdk(gw, mode, call, Scenario(status=200, content_type=SSE, body=body.decode()))
    expected = ("APIStatusError", 200) if call == "stream" else ("RateLimitError", 429)
    assert (result["error"], result["status"], result["type"]) == (*expected, "rate_limit_error"), result
    record = last_record(gw, before)
    assert (record["error_type"], record["input_tokens"]) == ("rate_limit_error", 10), record


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", ["stream", "create"])
def test_runs_of_empty_lines_and_comments_between_events_change_nothing(gw, mode, call):
    """Keep-alive comments and runs of blank lines (each run one event to the gateway's readers, issue 30) before
    and between the frames: the client gets the Message, the record its usage, as without them."""
    fillers = [b"\n" * 300, b": keep-alive\n\n" * 50, b"\r\n" * 200 + b":\r\n\r\n", b"\n:\n\n\n" * 100]
    frames = message_events().split(b"\n\n")[:-1]
    body = b"".join(fillers[i % len(fillers)] + f + b"\n\n" for i, f in enumerate(frames)) + fillers[0]
    before = count(gw)
    result = sdk(gw, mode, call, Scenario(status=200, content_type=SSE, body=body.decode()))
    assert result["ok"], result
    assert result["message"]["content"][0]["text"] == "hello there"
    record = last_record(gw, before)
    assert (record["input_tokens"], record["output_tokens"], record["cache_read_input_tokens"]) == (10, 30, 12000)
    assert (record["complete"], record["error_type"]) == (True, None), record


# ------------------------------------------------------------------------- the client gets the form it asked for


@pytest.mark.parametrize("mode", MODES)
def test_a_json_answer_to_a_streaming_request_reaches_the_client_as_a_stream(gw, mode):
    before = count(gw)
    result = sdk(gw, mode, "stream", Scenario(stream=False, text="as json", usage={"input_tokens": 21}))
    assert result["ok"], result
    assert result["message"]["content"][0]["text"] == "as json"
    record = last_record(gw, before)
    assert (record["converted"], record["input_tokens"], record["complete"]) == ("json->sse", 21, True), record


# ------------------------------------------------------------------------------ an error is an error at any status


OPENROUTER_200 = {"error": {"code": 429, "message": "Rate limit exceeded: free-models-per-day",
                            "metadata": {"headers": {"X-RateLimit-Limit": "50"}}}}
NATIVE_200 = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}, "request_id": "req_n2"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("body,expected", [
    (OPENROUTER_200, ("RateLimitError", 429, "rate_limit_error")),
    (NATIVE_200, ("OverloadedError", 529, "overloaded_error")),
], ids=["openrouter-shape", "native"])
def test_an_error_object_in_a_200_body_is_an_error(gw, mode, body, expected):
    before = count(gw)
    result = sdk(gw, mode, "create", Scenario(status=200, body=body))
    assert (result["error"], result["status"], result["type"]) == expected, result
    record = last_record(gw, before)
    assert (record["status"], record["error_type"]) == expected[1:], record


@pytest.mark.parametrize("mode", MODES)
def test_an_error_type_not_anthropics_is_not_a_retryable_500(gw, mode):
    """A proxy's own error type in a stream converted to JSON: a 400 the SDK does not retry."""
    refusal = {"type": "error", "error": {"type": "policy_violation", "message": "blocked by policy"}}
    body = message_start(USAGE) + frame("error", refusal)
    before = count(gw)
    result = sdk(gw, mode, "create", Scenario(status=200, content_type=SSE, body=body.decode()), **{"x-force-on": "1"})
    assert (result["error"], result["status"], result["type"]) == ("BadRequestError", 400, "policy_violation"), result
    record = last_record(gw, before)
    assert (record["status"], record["error_type"], record["converted"]) == (400, "policy_violation", "sse->json")


def test_a_converted_foreign_error_says_not_to_retry(gw):
    refusal = {"type": "error", "error": {"type": "policy_violation", "message": "blocked by policy"}}
    scenario = Scenario(status=200, content_type=SSE, body=(message_start(USAGE) + frame("error", refusal)).decode())
    before = count(gw)
    conn = http.client.HTTPConnection("127.0.0.1", gw.reverse_port, timeout=10)
    conn.request("POST", "/v1/messages", json.dumps({"model": "m", "max_tokens": 5, "messages": []}),
                 {"content-type": "application/json", "x-fake-scenario": scenario.to_header(), "x-force-on": "1"})
    response = conn.getresponse()
    assert json.loads(response.read())["error"]["type"] == "policy_violation"
    assert (response.status, response.getheader("x-should-retry")) == (400, "false")
    last_record(gw, before)


# ---------------------------------------------------------------------------------------------- usage and ends


@pytest.mark.parametrize("mode", MODES)
def test_a_later_zero_in_a_streams_usage_keeps_the_earlier_counts(gw, mode):
    zeros = {"output_tokens": 30, "input_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    before = count(gw)
    result = sdk(gw, mode, "stream", Scenario(status=200, content_type=SSE,
                                              body=message_events(delta_usage=zeros).decode()))
    assert result["ok"], result
    record = last_record(gw, before)
    assert (record["input_tokens"], record["cache_read_input_tokens"], record["output_tokens"]) == (10, 12000, 30)


def test_a_stream_whose_message_stop_came_is_complete_however_its_transfer_ended(gw):
    """The upstream leaves out its chunked body's last chunk after message_stop. mitmproxy passes the untidy end
    on (the SDK's HTTP client then raises on the transport, so a plain client reads it here); the client has the
    whole Message, and the record says so."""
    before = count(gw)
    conn = http.client.HTTPConnection("127.0.0.1", gw.reverse_port, timeout=10)
    conn.request("POST", "/untidy/v1/messages",
                 json.dumps({"model": "m", "max_tokens": 5, "stream": True, "messages": []}),
                 {"content-type": "application/json"})
    response = conn.getresponse()
    received = b""
    try:
        while chunk := response.read1(65536):
            received += chunk
    except http.client.IncompleteRead as e:
        received += e.partial
    assert response.status == 200 and b"event: message_stop" in received, received
    record = last_record(gw, before)
    assert (record["status"], record["complete"], record["reason"], record["error_type"]) == (200, True, None, None)
    assert record["output_tokens"] == 30


# ----------------------------------------------------------------------------------------- the gateway's own 401


@pytest.mark.parametrize("mode", MODES)
def test_an_unknown_gateway_token_is_a_401_not_to_retry(custody_gw, mode):
    """Claude Code retries a 401 for minutes unless it says `x-should-retry: false` (its gateway protocol,
    "Errors"); the SDK raises AuthenticationError."""
    from e2e.test_e2e_credentials import OTHER_TOKEN
    from e2e.test_e2e_credentials import sdk as custody_sdk

    result = custody_sdk(custody_gw, mode, token=OTHER_TOKEN)
    assert (result["error"], result["status"], result["type"]) == ("AuthenticationError", 401, "authentication_error")
    conn = http.client.HTTPConnection("127.0.0.1", custody_gw.reverse_port, timeout=10)
    conn.request("POST", "/v1/messages", json.dumps({"model": "m", "max_tokens": 5, "messages": []}),
                 {"content-type": "application/json", "x-api-key": OTHER_TOKEN})
    response = conn.getresponse()
    assert json.loads(response.read())["error"]["type"] == "authentication_error"
    assert (response.status, response.getheader("x-should-retry")) == (401, "false")


# ------------------------------------------------------------------------------------------------ agent ids


@pytest.mark.parametrize("mode", MODES)
def test_records_carry_claude_codes_agent_and_parent_agent_ids(gw, mode):
    """Claude Code's subagents share the session id; their own headers tell them apart (the gateway protocol
    says to keep them): they reach the upstream unchanged and land in the record."""
    before = count(gw)
    headers = {"x-claude-code-session-id": "sess-agents-e2e", "x-claude-code-agent-id": "agent-7f3",
               "x-claude-code-parent-agent-id": "agent-main"}
    result = sdk(gw, mode, "create", Scenario(text="sub"), **headers)
    assert result["ok"], result
    record = last_record(gw, before)
    assert (record["session"], record["agent_id"], record["parent_agent_id"]) == (
        "sess-agents-e2e", "agent-7f3", "agent-main"), record


# ------------------------------------------------------------------------------ prices follow what was billed

NO_CACHE = {"cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", ["stream", "create"])
def test_fast_mode_and_us_only_inference_are_priced_as_billed(gw, mode, call):
    """Opus 4.6 list prices (5 / 25 US dollars per million), times 6 for fast mode, times 1.1 for US-only."""
    usage = {**NO_CACHE, "input_tokens": 1000, "output_tokens": 100, "speed": "fast", "inference_geo": "us"}
    before = count(gw)
    result = sdk(gw, mode, call, Scenario(model="claude-opus-4-6", usage=usage))
    assert result["ok"], result
    record = last_record(gw, before)
    assert record["cost_usd"] == round((1000 * 5 + 100 * 25) / 1e6 * 6 * 1.1, 8), record
    assert record["price_source"].endswith("; speed fast x6; inference_geo us x1.1"), record


@pytest.mark.parametrize("mode", MODES)
def test_compaction_iterations_and_long_context_are_priced(gw, mode):
    """Opus 4.6 past 200K prompt tokens: 2x on the prompt side, 1.5x on output (the list lacks the tier); a
    compaction step's tokens, outside the top-level counts, are billed too."""
    usage = {**NO_CACHE, "input_tokens": 250_000, "output_tokens": 1000,
             "iterations": [{"type": "compaction", "input_tokens": 180_000, "output_tokens": 3000},
                            {"type": "message", "input_tokens": 250_000, "output_tokens": 1000}]}
    before = count(gw)
    result = sdk(gw, mode, "create", Scenario(model="claude-opus-4-6", usage=usage))
    assert result["ok"], result
    record = last_record(gw, before)
    prompt, out = 250_000 + 180_000, 1000 + 3000
    assert record["cost_usd"] == round((prompt * 5 * 2 + out * 25 * 1.5) / 1e6, 8), record
    assert "long context above 200000" in record["price_source"] and "+1 compaction iteration" in record["price_source"]


@pytest.mark.parametrize("mode", MODES)
def test_pricing_rules_express_tiers_and_multipliers(gw, mode):
    usage = {**NO_CACHE, "input_tokens": 6000, "output_tokens": 100, "speed": "fast"}
    before = count(gw)
    result = sdk(gw, mode, "stream", Scenario(model="claude-test-tiered-1", usage=usage))
    assert result["ok"], result
    record = last_record(gw, before)
    assert record["cost_usd"] == round((6000 * 2 + 100 * 15) / 1e6 * 2, 8), record
    assert record["price_source"] == "rules; above 5000 prompt tokens; speed fast x2", record


# ------------------------------------------------------------------------------- an upstream that never answered


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", ["refused", "reset"])
def test_an_upstream_that_fails_before_answering_gets_a_native_error(gw, mode, fault):
    """Connection refused or reset before any answer: a native 502 `api_error` with `x-should-retry: true` in
    place of mitmproxy's text/html page; the SDK raises InternalServerError with the native type."""
    before = count(gw)
    result = sdk(gw, mode, "create", prefix=f"/{fault}")
    assert (result["error"], result["status"], result["type"]) == ("InternalServerError", 502, "api_error"), result
    record = last_record(gw, before)
    assert (record["status"], record["error_type"], record["complete"]) == (502, "api_error", False), record
    if mode == "base-url":
        conn = http.client.HTTPConnection("127.0.0.1", gw.reverse_port, timeout=10)
        conn.request("POST", f"/{fault}/v1/messages", json.dumps({"model": "m", "max_tokens": 5, "messages": []}),
                     {"content-type": "application/json"})
        response = conn.getresponse()
        body = json.loads(response.read())
        assert (response.status, response.getheader("content-type"), response.getheader("x-should-retry")) == (
            502, "application/json", "true")
        assert body["type"] == "error" and body["error"]["type"] == "api_error"
