"""At the open-file limit a real mitmdump logs one line a second with a count, never a traceback per refused
accept, and serves again once connections are released."""

from __future__ import annotations

import re
import shlex
import socket
import time

import pytest

import sdk_client
from conftest import routed_rules
from harness import Gateway

pytestmark = pytest.mark.e2e

LIMIT = 64


class LimitedGateway(Gateway):
    def args(self) -> list[str]:
        return ["bash", "-c", f"ulimit -n {LIMIT} && exec {shlex.join(super().args())}"]


def test_open_file_limit_is_reported_once_a_second(fake):
    gw = LimitedGateway(routed_rules(fake.url), regular=False).start()
    held = []
    try:
        for _ in range(3 * LIMIT):
            try:
                held.append(socket.create_connection(("127.0.0.1", gw.reverse_port), timeout=2))
            except OSError:
                break
        time.sleep(2.5)
        for s in held:
            s.close()
        held = []
        gw.wait_for_output("open-file limit (64) reached")
        time.sleep(1.5)
        result = sdk_client.run("create", base_url=gw.base_url)
        assert result["ok"] is True, result
        output = gw.output()
    finally:
        for s in held:
            s.close()
        gw.stop()
    reports = re.findall(r"\[\d\d:(\d\d):(\d\d\.\d+)\] open-file limit .*? accept\(\) failed (\d+) times", output)
    assert reports and sum(int(n) for _, _, n in reports) > 0, output[-3000:]
    seconds = [int(m) * 60 + float(s) for m, s, _ in reports]
    assert all(later - earlier >= 0.9 for earlier, later in zip(seconds, seconds[1:])), "one line a second at most"
    assert "Traceback" not in output and "Unhandled error" not in output
