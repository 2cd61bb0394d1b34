"""Timeouts end to end: a real mitmdump, the real Anthropic SDK (tests/sdk_client.py), the fake upstream.

An upstream that sends its headers and then stalls gives the client a native `event: error` (timeout_error)
after the events already relayed, within `timeouts.stream_idle` + 1 s; one that never answers gives a native
504 `timeout_error` with `x-should-retry: true` within `timeouts.first_byte` + 1 s. The records say
`complete: false` and which timeout fired; the metric counts them. Short timeouts keep the tests fast.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.request

import pytest

import sdk_client
from conftest import routed_rules
from fakes.upstream import Scenario

pytestmark = pytest.mark.e2e

FIRST_BYTE, STREAM_IDLE = 1.5, 1.0
TIMEOUTS = f"timeouts: {{first_byte: {FIRST_BYTE}, non_streaming: {FIRST_BYTE}, stream_idle: {STREAM_IDLE}}}\n"


def raw_post(port: int, scenario: Scenario, *, stream: bool, session: str) -> tuple[int, dict, bytes, float]:
    """(status, headers, body, seconds) of one Messages request made with a plain HTTP client."""
    body = {"model": "claude-test-1", "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    started = time.monotonic()
    conn.request("POST", "/v1/messages", json.dumps(body), {
        "content-type": "application/json", "x-api-key": "sk-ant-test", "x-session-id": session,
        "x-fake-scenario": scenario.to_header(),
    })
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data, time.monotonic() - started


def test_stall_after_headers_gives_an_error_event(fake, gateway_factory):
    gw = gateway_factory(routed_rules(fake.url, TIMEOUTS), regular=False)
    stall = Scenario(stall_after=2)  # message_start and ping, then silence with the connection open

    status, headers, body, seconds = raw_post(gw.reverse_port, stall, stream=True, session="stall-raw")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert seconds < STREAM_IDLE + 1
    events = [block.split("\n", 1)[0] for block in body.decode().strip().split("\n\n")]
    assert events == ["event: message_start", "event: ping", "event: error"], body
    error = json.loads(body.decode().strip().split("\n\n")[-1].split("data: ", 1)[1])
    assert error["type"] == "error" and error["error"]["type"] == "timeout_error"
    assert "timeouts.stream_idle" in error["error"]["message"]

    result = sdk_client.run("create-stream", base_url=gw.base_url, headers={
        "x-fake-scenario": stall.to_header(), "x-session-id": "stall-sdk"})
    assert result["ok"] is False and result["type"] == "timeout_error", result

    for session in ("stall-raw", "stall-sdk"):
        record = gw.wait_record(lambda r: r["session"] == session)
        assert record["complete"] is False and record["reason"] == "stream_idle_timeout", record
        assert record["error_type"] == "timeout_error" and record["status"] == 200
        assert record["duration_ms"] < (STREAM_IDLE + 1) * 1000
    assert "mitmproxy has crashed" not in gw.output() and "Traceback" not in gw.output()


def test_upstream_that_never_answers_gets_a_native_504(fake, gateway_factory):
    gw = gateway_factory(routed_rules(fake.url, TIMEOUTS), regular=False)
    hang = Scenario(hang=True)

    status, headers, body, seconds = raw_post(gw.reverse_port, hang, stream=True, session="hang-raw")
    assert status == 504 and headers["x-should-retry"] == "true"
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["type"] == "timeout_error"
    assert FIRST_BYTE <= seconds < FIRST_BYTE + 1

    result = sdk_client.run("create", base_url=gw.base_url, headers={
        "x-fake-scenario": hang.to_header(), "x-session-id": "hang-sdk"})
    assert result == {**result, "ok": False, "status": 504, "type": "timeout_error"}, result
    assert "timeouts.non_streaming" in result["message"]  # the SDK's create sends no `stream: true`

    for session in ("hang-raw", "hang-sdk"):
        record = gw.wait_record(lambda r: r["session"] == session)
        assert record["complete"] is False and record["reason"] == "first_byte_timeout", record
        assert record["status"] == 504 and record["error_type"] == "timeout_error"
        assert record["duration_ms"] < (FIRST_BYTE + 1) * 1000

    # A stalled stream that the client asked as JSON (buffered for conversion) also becomes the 504.
    status, _, body, seconds = raw_post(gw.reverse_port, Scenario(stall_after=2, stream=True), stream=False,
                                        session="stall-buffered")
    assert status == 504 and json.loads(body)["error"]["type"] == "timeout_error"
    assert seconds < STREAM_IDLE + 1.5

    # The same connection pool keeps working after the timeouts, and the metric counts them.
    assert sdk_client.run("create", base_url=gw.base_url)["ok"] is True
    with urllib.request.urlopen(f"{gw.base_url}/-/metrics") as response:
        metrics = response.read().decode()
    assert 'llm_gateway_ended_early_total{reason="first_byte_timeout"} 2.0' in metrics
    assert 'llm_gateway_ended_early_total{reason="stream_idle_timeout"} 1.0' in metrics
    assert "mitmproxy has crashed" not in gw.output() and "Traceback" not in gw.output()


def test_timeouts_are_hot_reloaded(fake, gateway_factory):
    gw = gateway_factory(routed_rules(fake.url, "timeouts: {first_byte: 30}\n"), regular=False)
    gw.write_rules(routed_rules(fake.url, "timeouts: {first_byte: 0.5, non_streaming: 0.5}\n"))
    gw.wait_for_output("rules reloaded", timeout=10)
    status, _, _, seconds = raw_post(gw.reverse_port, Scenario(hang=True), stream=False, session="reloaded")
    assert status == 504 and seconds < 1.5


def test_first_byte_does_not_cut_a_long_non_streaming_answer(fake, gateway_factory):
    """A non-streaming answer's headers come when all of it is written: `timeouts.first_byte` bounds streams
    only, `timeouts.non_streaming` (600 s by default, the SDKs' own wait) the rest."""
    gw = gateway_factory(routed_rules(fake.url, "timeouts: {first_byte: 1}\n"), regular=False)
    slow = Scenario(delay=2.5, text="a long answer")
    result = sdk_client.run("create", base_url=gw.base_url, headers={"x-fake-scenario": slow.to_header()})
    assert result["ok"] and result["message"]["content"][0]["text"] == "a long answer", result
    result = sdk_client.run("stream", base_url=gw.base_url, headers={"x-fake-scenario": slow.to_header()})
    assert (result["ok"], result["status"], result["type"]) == (False, 504, "timeout_error"), result
    assert "timeouts.first_byte" in result["message"]


def test_upstream_stuck_in_its_tls_handshake_is_given_up(fake, gateway_factory):
    """An upstream that accepts TCP and never answers the TLS handshake: mitmproxy's layer waits for the
    connection, so the gateway can only close it; the client gets mitmproxy's 502 in time, never a hang."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    try:
        upstream = f"https://127.0.0.1:{server.getsockname()[1]}"
        gw = gateway_factory(routed_rules(upstream, TIMEOUTS), regular=False)
        status, _, _, seconds = raw_post(gw.reverse_port, Scenario(), stream=True, session="tls-stuck")
        assert status == 502 and seconds < FIRST_BYTE + 1
        record = gw.wait_record(lambda r: r["session"] == "tls-stuck")
        assert record["complete"] is False and record["reason"] == "first_byte_timeout", record
        assert "mitmproxy has crashed" not in gw.output() and "Traceback" not in gw.output()
    finally:
        stop.set()
        for s in held:
            s.close()
        server.close()
