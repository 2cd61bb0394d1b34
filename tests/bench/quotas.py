"""The cost of the quota check: `scripts/bench --quotas N`.

Beside the gateway without quotas, for the bench's agent-sized request, in-process (tests/bench/hooks.py: every
concern's hooks under mitmproxy's taddons, CPU µs per exchange, the idle loop taken out):

- the gateway with a `quotas` section on the memory store (a budget and a rate: admission, reservation and
  settlement all in this process);
- the gateway with the same section on a local redis-server (Debian's, scripts/test-tools --only redis), started
  here on 127.0.0.1, a free port and a temp dir, and stopped by its pid; its wall-clock time per admission and per
  settlement (one round trip each) is measured on the store alone too.

The limits are set far above what the run spends: every exchange is admitted. No figure is asserted anywhere.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time

from llm_gateway.addons.quotas.store import RedisStore
from llm_gateway.policy import quotas, rules

from . import hooks

SECTION = """
quotas:
  store: {store}
  budgets:
    - {{name: bench-pool, usd: {{daily: 1000000}}}}
    - {{name: bench-client, per: client, usd: {{monthly: 1000000}}}}
  rates:
    - {{name: bench-rate, per: client, per_minute: {{requests: 1000000000}}}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Redis:
    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "_Redis":
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server (scripts/test-tools --only redis)")
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def store_round_trips(url: str, n: int) -> tuple[float, float]:
    """(ms per admission, ms per settlement), wall clock, on the Redis store alone."""
    q = rules.parse(hooks_rules_stub() + SECTION.format(store=url), "bench-quotas.yaml").quotas

    async def run() -> tuple[float, float]:
        store = RedisStore(url)
        counters = quotas.counters(q, None, "bench", None, "claude-sonnet-4-5", time.time())
        admit = settle = 0.0
        for i in range(n):
            t0 = time.perf_counter()
            await store.admit(counters, f"b{i}", 1000, 60)
            t1 = time.perf_counter()
            await store.settle(counters, f"b{i}", 900, 100, 50)
            settle += time.perf_counter() - t1
            admit += t1 - t0
        await store.close()
        return admit / n * 1e3, settle / n * 1e3

    return asyncio.run(run())


def hooks_rules_stub() -> str:
    return "apis:\n  - {name: anthropic, hosts: [api.anthropic.com], paths: [/v1/messages]}\n"


def main(rules_text: str, body: bytes, n: int) -> int:
    base = hooks.measure(rules_text, body, n)
    memory = hooks.measure(rules_text + SECTION.format(store="memory"), body, n)
    print(f"gateway hooks without quotas:        {base['us_per_exchange']:7.1f} µs of CPU per exchange ({n} exchanges)")
    print(f"with quotas, memory store:           {memory['us_per_exchange']:7.1f} µs "
          f"(+{memory['us_per_exchange'] - base['us_per_exchange']:.1f} µs: admission, reservation, settlement)")
    try:
        with _Redis() as server:
            url = f"redis://127.0.0.1:{server.port}/0"
            shared = hooks.measure(rules_text + SECTION.format(store=url), body, n)
            admit_ms, settle_ms = store_round_trips(url, n)
    except (FileNotFoundError, TimeoutError) as e:
        print(f"with quotas, Redis store:            skipped ({e})")
        return 0
    print(f"with quotas, local Redis store:      {shared['us_per_exchange']:7.1f} µs of CPU in the gateway "
          f"(+{shared['us_per_exchange'] - base['us_per_exchange']:.1f} µs)")
    print(f"  Redis round trips (wall clock):    admission {admit_ms:.3f} ms, settlement {settle_ms:.3f} ms "
          "(one each; the settlement runs off the answer's path)")
    return 0
