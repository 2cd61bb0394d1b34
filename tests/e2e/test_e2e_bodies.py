"""Request body limits and memory end to end: a real mitmdump, the real Anthropic SDK, the fake upstream.

A 40 MB request gets a native 413 `request_too_large` without reaching the upstream and without the gateway
holding it; a 30 MB one passes, with the gateway's peak RSS growing less than three times its size.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import sdk_client
from conftest import routed_rules

pytestmark = pytest.mark.e2e

MB = 1024 * 1024


def memory(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak since start) of a process, in bytes (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


def test_large_bodies(fake, gateway_factory):
    gw = gateway_factory(routed_rules(fake.url), regular=False)
    assert sdk_client.run("create", base_url=gw.base_url)["ok"] is True  # warm: every code path imported
    # Reset the peak (Linux clear_refs "5"): the one-time peak of start-up and of loading the price list
    # (genai-prices, at the first record) must not hide a body held in memory.
    Path(f"/proc/{gw.proc.pid}/clear_refs").write_text("5")
    before = memory(gw.proc.pid)

    refused = sdk_client.run("create", base_url=gw.base_url, pad=40 * MB, headers={"x-session-id": "big"}, timeout=120)
    assert refused["ok"] is False and refused["status"] == 413 and refused["type"] == "request_too_large", refused
    assert len(fake.messages_requests()) == 1, "the refused request never reached the upstream"
    record = gw.wait_record(lambda r: r["status"] == 413)  # refused before the client was detected
    assert record["status"] == 413 and record["complete"] is False and record["reason"] == "request_too_large"
    after_refused = memory(gw.proc.pid)
    assert after_refused["VmHWM"] - before["VmRSS"] < 8 * MB, (before, after_refused)

    accepted = sdk_client.run("create", base_url=gw.base_url, pad=30 * MB, headers={"x-session-id": "large"},
                              timeout=120)
    assert accepted["ok"] is True, accepted
    size = len(fake.messages_requests()[-1].body)
    assert 29 * MB < size < 31 * MB
    peak = memory(gw.proc.pid)["VmHWM"] - before["VmRSS"]
    print(f"30 MB request: peak RSS growth {peak / MB:.1f} MB ({peak / size:.2f} x the body)")
    assert peak < 3 * size
    assert gw.wait_record(lambda r: r["session"] == "large")["complete"] is True


def test_limit_is_a_rule_key(fake, gateway_factory):
    gw = gateway_factory(routed_rules(fake.url, "limits: {request_body: 64k}\n"), regular=False)
    small = sdk_client.run("create", base_url=gw.base_url, pad=32 * 1024)
    assert small["ok"] is True, small
    refused = sdk_client.run("create", base_url=gw.base_url, pad=128 * 1024)
    assert refused["status"] == 413 and refused["type"] == "request_too_large", refused
    assert "limits.request_body" in refused["message"]
    assert len(fake.messages_requests()) == 1
