"""End to end, the inputs of issue 15: a real mitmdump in both modes, the real Anthropic SDK as the client,
the fake upstream (or a bad one) answering with the exact bytes. The SDK must raise the exception class the
status means, with `e.type` and the request id; the record must say what the client got, and the log line
must show the error type and request id, never Python's None.
"""

from __future__ import annotations

import http.client
import json
import socket

import pytest
import yaml

import sdk_client
from conftest import DEFAULT_RULES, routed_rules
from fakes.upstream import Scenario
from harness import Gateway, free_port
from e2e.test_e2e_faults import BadUpstream
from unit.pipeline.test_answer import (BEDROCK_FRAME, FIRST_CHUNK_ERROR, GROWING, OVERLOAD, SSE, VERTEX, frame,
                                       litellm_frame, message_start)

pytestmark = pytest.mark.e2e

MODES = ("base-url", "egress")


class ResettingUpstream(BadUpstream):
    """Reads a request, then resets the connection (RST, no answer)."""

    def answer(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        finally:
            conn.close()


@pytest.fixture(scope="module")
def gw(module_fake):
    reset = ResettingUpstream()
    refused = free_port()  # nothing listens there
    clients = [{"name": "forced-on", "headers": ["x-force-on"], "stream": "on"},
               *yaml.safe_load(DEFAULT_RULES.read_text())["clients"]]
    rules = routed_rules(module_fake.url, clients=clients).replace(
        'paths: ["/v1/messages"', 'paths: ["/reset/v1/messages", "/refused/v1/messages", "/v1/messages"'
    ).replace(
        "routes:\n",
        "routes:\n"
        f'  - {{match: {{path: "/reset/*"}}, upstream: "http://127.0.0.1:{reset.port}"}}\n'
        f'  - {{match: {{path: "/refused/*"}}, upstream: "http://127.0.0.1:{refused}"}}\n',
        1,
    )
    try:
        with Gateway(rules) as gateway:
            yield gateway
    finally:
        reset.close()


def sdk(gw: Gateway, mode: str, call: str, scenario: Scenario | None = None, prefix: str = "", **headers) -> dict:
    if scenario is not None:
        headers["x-fake-scenario"] = scenario.to_header()
    if mode == "base-url":
        return sdk_client.run(call, base_url=gw.base_url + prefix, headers=headers)
    env = {"HTTPS_PROXY": gw.proxy_url, "SSL_CERT_FILE": str(gw.ca_bundle())}
    return sdk_client.run(call, base_url=f"https://api.anthropic.com{prefix}" if prefix else None, env=env,
                          headers=headers)


def record_for(gw: Gateway, count: int) -> dict:
    return gw.records(count=count)[count - 1]


def check_line(gw: Gateway, record: dict) -> None:
    line = next(li for li in gw.output().splitlines()[::-1] if f"error={record['error_type']}" in li)
    assert f"request_id={record['request_id'] or '-'}" in line and "None" not in line, line


ERROR_AS_STREAM = Scenario(status=429, body=frame(None, FIRST_CHUNK_ERROR).decode() + "data: [DONE]\n\n",
                           content_type=SSE, headers={"llm_provider-retry-after": "17"}, request_id="")
CASES = {
    # name: (scenario, SDK call, headers, (class, status, type, request id or None), record fields)
    "1-error-as-stream-create": (ERROR_AS_STREAM, "create", {},
                                 ("RateLimitError", 429, "rate_limit_error", "req_x1"), {"status": 429}),
    "1-error-as-stream-stream": (ERROR_AS_STREAM, "stream", {},
                                 ("RateLimitError", 429, "rate_limit_error", "req_x1"), {"status": 429}),
    "2-forced-on-unnamed-error": (
        Scenario(status=200, content_type=SSE, body=(message_start(
            {"input_tokens": 40, "output_tokens": 1, "cache_read_input_tokens": 12000}) + frame(None, BEDROCK_FRAME)
        ).decode()), "create", {"x-force-on": "1"}, ("RateLimitError", 429, "rate_limit_error", None),
        {"status": 429, "input_tokens": 40, "cache_read_input_tokens": 12000, "converted": "sse->json"}),
    "3-vertex-429-in-500": (Scenario(status=500, body=VERTEX), "create", {},
                            ("RateLimitError", 429, "rate_limit_error", None), {"status": 429}),
    "3-litellm-overload-500": (Scenario(status=500, body=litellm_frame(OVERLOAD, "500", None)), "stream", {},
                               ("OverloadedError", 529, "overloaded_error", None), {"status": 529}),
    "3-overload-mid-stream": (
        Scenario(status=200, content_type=SSE, body=(message_start({"input_tokens": 7, "output_tokens": 1})
                                                     + frame(None, litellm_frame(OVERLOAD, "500", None))).decode()),
        "stream", {}, ("APIStatusError", 200, "overloaded_error", None), {"status": 200, "input_tokens": 7}),
    "3-overload-mid-stream-forced-on": (
        Scenario(status=200, content_type=SSE, body=(message_start({"input_tokens": 7, "output_tokens": 1})
                                                     + frame(None, litellm_frame(OVERLOAD, "500", None))).decode()),
        "create", {"x-force-on": "1"}, ("OverloadedError", 529, "overloaded_error", None),
        {"status": 529, "converted": "sse->json"}),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_native_errors_on_every_path(gw, module_fake, mode, name):
    scenario, call, headers, (cls, status, etype, request_id), fields = CASES[name]
    before = len(gw.records(timeout=0, count=0))
    result = sdk(gw, mode, call, scenario, **headers)
    assert not result["ok"], result
    assert (result["error"], result["status"], result["type"]) == (cls, status, etype), result
    record = record_for(gw, before + 1)
    assert result["request_id"] == (request_id or record["request_id"]) and result["request_id"], (result, record)
    assert record["error_type"] == etype and record["request_id"] == result["request_id"]
    # a stream that ended in an error says so; an HTTP error answer is whole (its error_type says it all)
    assert record["reason"] == ("stream error event" if record["status"] == 200 or "converted" in fields else None)
    for key, value in fields.items():
        assert record[key] == value, (key, record)
    check_line(gw, record)


def test_retry_after_is_restored_on_an_error_sent_as_a_stream(gw):
    """The headers the SDK's retries read (it does not show them): `retry-after` restored from LiteLLM's
    `llm_provider-retry-after`, `request-id` from the inner error; read off a plain HTTP request."""

    before = len(gw.records(timeout=0, count=0))
    conn = http.client.HTTPConnection("127.0.0.1", gw.reverse_port, timeout=10)
    conn.request("POST", "/v1/messages", json.dumps({"model": "m", "max_tokens": 5, "stream": True, "messages": []}),
                 {"content-type": "application/json", "x-fake-scenario": ERROR_AS_STREAM.to_header()})
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 429 and response.getheader("content-type") == "application/json"
    assert response.getheader("retry-after") == "17" and response.getheader("request-id") == "req_x1"
    assert body["error"]["type"] == "rate_limit_error" and body["request_id"] == "req_x1"
    # its record (written off the request path): waited for, so the next test counts records from after it
    record = record_for(gw, before + 1)
    assert (record["status"], record["error_type"], record["request_id"]) == (429, "rate_limit_error", "req_x1")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", ["closed-before-content-length", "reset", "refused"])
def test_upstream_failures_are_recorded_as_the_client_got_them(gw, mode, fault):
    """mitmproxy answers these itself (a native 502 in place of its text/html page before any response; see
    answer.settle_failure); the SDK raises InternalServerError, and the record says 502, api_error, why."""
    before = len(gw.records(timeout=0, count=0))
    if fault == "closed-before-content-length":
        result = sdk(gw, mode, "create", Scenario(abort_after=40))
        reason = "upstream closed before the end of its body"
    else:
        result = sdk(gw, mode, "create", prefix=f"/{fault}")
        # mitmproxy reports a reset before any answer as "server closed connection", like a clean close
        reason = {"reset": "upstream closed the connection before answering",
                  "refused": "upstream refused the connection"}[fault]
    assert (result["error"], result["status"]) == ("InternalServerError", 502), result
    record = record_for(gw, before + 1)
    assert (record["status"], record["error_type"], record["reason"], record["complete"]) == (
        502, "api_error", reason, False), record
    check_line(gw, record)


@pytest.mark.parametrize("mode", MODES)
def test_cache_writes_growing_during_a_stream_are_all_priced(gw, mode):
    body = GROWING + frame(
        "message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                          "usage": {"output_tokens": 30, "cache_creation_input_tokens": 7345}}
    ) + frame("message_stop", {"type": "message_stop"})
    before = len(gw.records(timeout=0, count=0))
    result = sdk(gw, mode, "stream", Scenario(status=200, content_type=SSE, body=body.decode()))
    assert result["ok"], result
    record = record_for(gw, before + 1)
    assert (record["cache_creation_input_tokens"], record["cache_creation_5m_input_tokens"],
            record["cache_creation_1h_input_tokens"]) == (7345, 7245, 100)
    # Sonnet 4.5 list prices, dollars per million: 10*3 + 30*15 + 7245*3.75 + 100*6
    assert record["cost_usd"] == round((10 * 3 + 30 * 15 + 7245 * 3.75 + 100 * 6) / 1e6, 8)
    assert record["model"] == "claude-sonnet-4-5-20250929" and record["price_source"].startswith("genai-prices")
