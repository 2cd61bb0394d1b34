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
