"""End to end through a real mitmdump: a fast stream of small SSE events passes in batches (mitm/chunks.py),
with the same bytes as the upstream sent, every event seen by the gateway's reader, and one write per event
again when gateway_batch_chunks is off."""

from __future__ import annotations

import json
import socket

import pytest

from conftest import routed_rules
from fakes.upstream import Scenario

pytestmark = pytest.mark.e2e

EVENTS = 3000  # text deltas: the fake writes each event as a chunk of its own, as fast as it can


def chunks_of(port: int, scenario: Scenario, session: str) -> list[bytes]:
    """The chunks of a streamed answer as they came on the wire (HTTP/1.1, chunked), on a raw socket."""
    body = json.dumps({"model": "claude-test-1", "max_tokens": 16, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"x-api-key: sk-ant-test\r\nx-session-id: {session}\r\nx-fake-scenario: {scenario.to_header()}\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head + body)
        data = bytearray()
        while block := s.recv(1 << 16):
            data += block
    status, _, rest = bytes(data).partition(b"\r\n\r\n")
    assert b" 200 " in status.split(b"\r\n")[0] and b"chunked" in status.lower(), status
    out, pos = [], 0
    while True:
        end = rest.index(b"\r\n", pos)
        n = int(rest[pos:end], 16)
        if n == 0:
            return out
        out.append(rest[end + 2 : end + 2 + n])
        pos = end + 4 + n


@pytest.mark.parametrize("batching", [True, False])
def test_a_burst_passes_with_its_bytes_and_every_event_read(fake, gateway_factory, batching):
    scenario = Scenario(burst=EVENTS, message_id="msg_batching", request_id="req_batching")
    direct = b"".join(chunks_of(fake.port, scenario, "direct"))
    gw = gateway_factory(routed_rules(fake.url), regular=False,
                         extra_args=("--set", f"gateway_batch_chunks={'true' if batching else 'false'}"))
    pieces = chunks_of(gw.reverse_port, scenario, f"batch-{batching}")
    assert b"".join(pieces) == direct  # the same bytes, however they were cut
    events = direct.count(b"\n\n")
    assert events >= EVENTS
    if batching:
        assert len(pieces) < events  # several events a write: the reads found them waiting
    else:
        assert len(pieces) == events  # one chunk per event, as the upstream wrote them
    (record,) = gw.wait_records(lambda r: r["session"] == f"batch-{batching}", 1)
    assert record["complete"] and record["output_tokens"] == EVENTS  # the reader saw the last event's usage
