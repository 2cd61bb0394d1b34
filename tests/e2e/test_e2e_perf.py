"""End to end, what the performance work (issue 18) must not cost: every usage record on a clean stop
although records are written off the request path, a listen queue deeper than mitmproxy's 100, and
no mitmweb body copy held in mitmdump unless asked for."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess

import pytest
from mitmproxy import io

from conftest import routed_rules
from fakes.upstream import Scenario
from harness import Gateway

pytestmark = pytest.mark.e2e

MESSAGES = {"model": "claude-test-1", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def ask(port: int, stream: bool, session: str, scenario: Scenario | None = None) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"content-type": "application/json", "x-session-id": session, "x-api-key": "sk-ant-test"}
        if scenario:
            headers["x-fake-scenario"] = scenario.to_header()
        conn.request("POST", "/v1/messages", json.dumps({**MESSAGES, "stream": stream}), headers)
        answer = conn.getresponse()
        body = answer.read()
        assert answer.status == 200, body[:300]
        return body
    finally:
        conn.close()


def test_every_record_is_written_when_the_gateway_stops_right_after_the_last_answer(fake):
    gw = Gateway(routed_rules(fake.url), regular=False).start()
    try:
        for i in range(24):
            ask(gw.reverse_port, stream=bool(i % 2), session=f"stop-{i}")
    finally:
        assert gw.stop() is not None  # SIGTERM at once: a clean stop, before the next flush would come
    records = gw.records(timeout=0, count=0)
    assert sorted(r["session"] for r in records) == sorted(f"stop-{i}" for i in range(24))
    assert all(r["complete"] and r["output_tokens"] for r in records)


def backlog(port: int) -> int:
    """The listen queue length of a listening TCP socket, as `ss` shows it (Send-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[2])


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read a listen queue")
def test_listeners_get_a_deep_listen_queue_unless_told_otherwise(fake, gateway_factory):
    gw = gateway_factory(routed_rules(fake.url))
    assert backlog(gw.reverse_port) == backlog(gw.regular_port) == 4096
    ask(gw.reverse_port, stream=False, session="backlog")  # and the listener still works
    plain = gateway_factory(routed_rules(fake.url), regular=False, extra_args=("--set", "gateway_listen_backlog=0"))
    assert backlog(plain.reverse_port) == 100  # mitmproxy's own (asyncio.start_server's default)


def test_mitmdump_keeps_no_stream_body_copy_by_default(fake, tmp_path):
    flows = tmp_path / "flows.mitm"
    for option, kept in (((), False), (("--set", "gateway_keep_stream_body=4m"), True)):
        with Gateway(routed_rules(fake.url), regular=False, extra_args=("-w", str(flows), *option)) as gw:
            body = ask(gw.reverse_port, stream=True, session="copy")
            assert b"event: message_stop" in body
            gw.records()
        with open(flows, "rb") as f:
            [flow] = [f for f in io.FlowReader(f).stream() if f.request.path == "/v1/messages"]
        assert (flow.response.raw_content == body) if kept else not flow.response.raw_content, option
