"""`scripts/bench` must not rot: its smallest path runs end to end. No timing is asserted here; the
figures live in docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SETUPS = ("source", "mitmdump", "gateway", "gateway-on", "gateway-view")


def test_quick_bench_of_one_workload_measures_every_setup(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [str(ROOT / "scripts" / "bench"), "--quick", "--only", "messages-1", "--setups", ",".join(SETUPS),
         "--seconds", "0.3", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["errors"] == {}
    for setup in SETUPS:
        [run] = results["results"]["messages-1"][setup]
        assert run["rps"] > 0 and run["p99"] >= run["p50"] > 0, (setup, run)
    assert results["results"]["messages-1"]["gateway"][0]["cpu"] > 0  # the proxy's CPU time was read
    # the report: a row per set-up, and the target verdict against bare mitmdump
    assert "| gateway, stream forced on |" in done.stdout
    assert "of mitmdump's requests/s, 1 connection: " in done.stdout
    # and every process it started is gone
    assert results["info"]["pids"]
    alive = [pid for pid in results["info"]["pids"] if Path(f"/proc/{pid}").exists()]
    assert not alive, f"left running: {alive}"


def test_quick_agent_sessions_are_measured_beside_bare_mitmdump(tmp_path):
    """The agent-shaped workload (bench/agents.py): growing Claude Code-like sessions through each proxy, the
    paced stream beside them, the cache watch in-process; every answer checked, every process stopped."""
    out = tmp_path / "bench.json"
    setups = ("source", "mitmdump", "gateway", "in-process")
    done = subprocess.run(
        [str(ROOT / "scripts" / "bench"), "--quick", "--only", "agents", "--setups", ",".join(setups),
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["errors"] == {}
    for setup in ("source", "mitmdump", "gateway"):
        [run] = results["results"]["agents"][setup]
        assert run["rps"] > 0 and run["p99"] >= run["p50"] > 0 and run["late99"] >= 0, (setup, run)
    assert results["results"]["agents"]["gateway"][0]["cpu"] > 0
    [local] = results["results"]["agents"]["in-process"]
    assert local["fp_ms"] > 0 and 0 < local["watch_kb"] < 64  # a few KB per session: hashes, never the text
    assert "agent sessions: CPU per request ≤ 1.15× mitmdump's: " in done.stdout
    assert "other stream p99 late ms" in done.stdout
    alive = [pid for pid in results["info"]["pids"] if Path(f"/proc/{pid}").exists()]
    assert not alive, f"left running: {alive}"
