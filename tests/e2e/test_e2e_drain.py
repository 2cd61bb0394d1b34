"""Graceful drain end to end: SIGTERM to a real mitmdump with streams in flight (the real Anthropic SDK).

A stream in flight when SIGTERM arrives (events 0.3 s apart for about 3 s) reaches message_stop; the readiness
probe turns 503 at once; a connection opened after SIGTERM is refused, a new request on a connection opened
before gets a native 529 with retry-after; the process exits 0 when the stream ends. A stream longer than the
grace period ends with a native error frame and a record with `complete: false`, `reason: "shutdown"`.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import sdk_client
from conftest import routed_rules
from fakes.upstream import Scenario
from harness import free_port

pytestmark = pytest.mark.e2e

BODY = json.dumps({"model": "claude-test-1", "max_tokens": 64, "stream": True,
                   "messages": [{"role": "user", "content": "hi"}]})


def start(gateway_factory, fake, grace: int):
    metrics_port = free_port()
    gw = gateway_factory(routed_rules(fake.url), regular=False, extra_args=(
        "--set", f"gateway_drain_grace={grace}", "--set", f"gateway_metrics_port={metrics_port}"))
    return gw, metrics_port


def ready(metrics_port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/-/ready", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_stream_started(fake, count: int = 1) -> None:
    fake.wait_for_requests(count, timeout=30)
    time.sleep(0.5)  # a few events relayed


def test_sigterm_lets_the_stream_in_flight_finish(fake, gateway_factory):
    gw, metrics_port = start(gateway_factory, fake, grace=20)
    assert ready(metrics_port) == 200
    slow = Scenario(burst=10, event_delay=0.3)  # 14 events 0.3 s apart: about 4 s
    idle = http.client.HTTPConnection("127.0.0.1", gw.reverse_port, timeout=10)
    idle.connect()  # a connection opened before the signal, used after it
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(sdk_client.run, "stream", base_url=gw.base_url, headers={
            "x-fake-scenario": slow.to_header(), "x-session-id": "in-flight"})
        wait_stream_started(fake)
        signalled = time.monotonic()
        os.kill(gw.proc.pid, signal.SIGTERM)
        gw.wait_for_output("draining")
        assert ready(metrics_port) == 503

        with pytest.raises(OSError):  # a new connection: the listener is closed
            socket.create_connection(("127.0.0.1", gw.reverse_port), timeout=2).close()
        idle.request("POST", "/v1/messages", BODY, {"content-type": "application/json", "x-api-key": "sk-ant-t"})
        refused = idle.getresponse()
        assert refused.status == 529 and refused.getheader("retry-after")
        assert json.loads(refused.read())["error"]["type"] == "overloaded_error"
        assert gw.proc.poll() is None, "still running while the stream is in flight"

        result = streaming.result(timeout=30)
    assert result["ok"] is True, result
    assert result["message"]["content"][0]["text"].endswith("w9")
    assert gw.proc.wait(15) == 0
    assert time.monotonic() - signalled < 10
    record = gw.wait_record(lambda r: r["session"] == "in-flight")
    assert record["complete"] is True and record["reason"] is None
    assert len(fake.messages_requests()) == 1, "the refused request never reached the upstream"
    assert "Traceback" not in gw.output()


def test_stream_longer_than_the_grace_period_ends_with_a_native_error(fake, gateway_factory):
    gw, _ = start(gateway_factory, fake, grace=2)
    endless = Scenario(burst=40, event_delay=0.3)  # about 13 s
    with ThreadPoolExecutor(2) as pool:
        sdk = pool.submit(sdk_client.run, "create-stream", base_url=gw.base_url, headers={
            "x-fake-scenario": endless.to_header(), "x-session-id": "too-long-sdk"})
        raw = pool.submit(raw_stream, gw.reverse_port, endless, "too-long-raw")
        wait_stream_started(fake, 2)
        signalled = time.monotonic()
        os.kill(gw.proc.pid, signal.SIGTERM)
        assert gw.proc.wait(15) == 0
        assert time.monotonic() - signalled < 2 + 4
        body = raw.result(timeout=10)
        result = sdk.result(timeout=30)
    assert result["ok"] is False and result["type"] == "overloaded_error", result
    blocks = body.decode().strip().split("\n\n")
    assert blocks[0].startswith("event: message_start") and "event: content_block_delta" in body.decode()
    assert blocks[-1].startswith("event: error") and "message_stop" not in body.decode()
    assert json.loads(blocks[-1].split("data: ", 1)[1])["error"]["type"] == "overloaded_error"
    for session in ("too-long-sdk", "too-long-raw"):
        record = gw.wait_record(lambda r: r["session"] == session)
        assert record["complete"] is False and record["reason"] == "shutdown", record
        assert record["error_type"] == "overloaded_error"
    assert "Traceback" not in gw.output() and "mitmproxy has crashed" not in gw.output()


def test_a_second_signal_exits_at_once_and_records_the_cut_exchanges_as_shutdown(fake, gateway_factory):
    gw, _ = start(gateway_factory, fake, grace=20)
    endless = Scenario(burst=40, event_delay=0.3)  # about 13 s
    with ThreadPoolExecutor(2) as pool:
        raws = [pool.submit(raw_stream, gw.reverse_port, endless, f"cut-{i}") for i in range(2)]
        wait_stream_started(fake, 2)
        os.kill(gw.proc.pid, signal.SIGTERM)
        gw.wait_for_output("draining")
        os.kill(gw.proc.pid, signal.SIGTERM)
        assert gw.proc.wait(15) == 0
        for r in raws:
            try:
                r.result(timeout=10)
            except (OSError, http.client.HTTPException):
                pass  # the stream was cut
    assert "second signal during the drain" in gw.output()
    for session in ("cut-0", "cut-1"):
        record = gw.wait_record(lambda r: r["session"] == session)
        assert record["complete"] is False and record["reason"] == "shutdown", record


def raw_stream(port: int, scenario: Scenario, session: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/messages", BODY, {
        "content-type": "application/json", "x-api-key": "sk-ant-t", "x-session-id": session,
        "x-fake-scenario": scenario.to_header()})
    response = conn.getresponse()
    assert response.status == 200
    return response.read()  # a clean end of the chunked body, or this raises IncompleteRead
