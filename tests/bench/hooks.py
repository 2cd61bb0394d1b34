"""The gateway's own work per API exchange, in-process: `scripts/bench --hooks`.

Every concern of `app.default_addons()` behind the `Dispatcher`, as mitmproxy drives them, under
mitmproxy's `taddons` (no proxy, no sockets), for the bench's agent-sized JSON request and the source's answer:
requestheaders, request, responseheaders and response of one flow after another. What it prints is the CPU
time (`time.process_time`) of the hooks per exchange, less the same loop with a dispatcher that does nothing
(building the flow and its answer), and, with `--per-hook`, each concern's share. It is the gateway's cost with
mitmproxy's own taken out: a running gateway adds about as much again for mitmproxy's dispatch to it and the
garbage collector's work on what it allocates (docs/benchmarks.md). Process-wide concerns (the open-file
limit, the listen queue, the log filter, the warm-up) are left out, as in the unit tests; flow notes are off, as
in mitmdump, unless `--notes`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import inspect
import time
from collections.abc import Callable

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

from fakes.upstream import Scenario
from llm_gateway.pipeline import exchange
from llm_gateway.policy import rules
from llm_gateway.app import default_addons
from llm_gateway.app import Dispatcher
from llm_gateway.addons.rulefile import RuleFile

from . import source

UPSTREAM = "http://127.0.0.1:9"  # never dialled: the hooks only route to it
HOOKS = ("requestheaders", "request", "responseheaders", "response")
PROCESS_WIDE = ("OpenFileLimit", "ListenBacklog", "ChunkBatching", "HeadLimit", "GatewayLog", "Warmup")


def _exchanges(body: bytes) -> tuple[Callable[[], http.HTTPFlow], Callable[[http.HTTPFlow], None]]:
    answer = source.Answers().json_body(("hooks",), Scenario(), json.loads(body))
    headers = ((b"content-type", b"application/json"), (b"user-agent", b"bench/1.0"),
               (b"x-api-key", b"sk-ant-bench-0000"))

    def new_flow() -> http.HTTPFlow:
        request = tutils.treq(scheme=b"http", host=b"127.0.0.1", port=9, path=b"/v1/messages", method=b"POST",
                              content=body, headers=headers)
        flow = tflow.tflow(req=request)
        flow.client_conn.proxy_mode = ProxyMode.parse(f"reverse:{UPSTREAM}")
        return flow

    def answered(flow: http.HTTPFlow) -> None:
        flow.response = http.Response.make(200, answer, {"content-type": "application/json", "request-id": "req_1"})

    return new_flow, answered


async def _loop(dispatcher, new_flow, answered, n: int) -> float:
    """CPU seconds of `n` exchanges through `dispatcher`'s four hooks."""
    started = time.process_time()
    for _ in range(n):
        flow = new_flow()
        dispatcher.requestheaders(flow)
        pending = dispatcher.request(flow)
        if pending is not None:  # an async concern (quotas) makes the chain async, as mitmproxy awaits it
            await pending
        answered(flow)
        dispatcher.responseheaders(flow)
        pending = dispatcher.response(flow)
        if pending is not None:  # BodyLimit.response (answers decoded off the loop) makes the chain async
            await pending
    return time.process_time() - started


class _Idle:
    """A dispatcher that does nothing: the loop's own cost."""

    def requestheaders(self, flow):
        pass

    request = responseheaders = response = requestheaders


def measure(rules_text: str, body: bytes, n: int = 3000, notes: bool = False, per_hook: bool = False) -> dict:
    """{"us_per_exchange": µs of the gateway's hooks per exchange, "loop_us": the idle loop's µs, "per_hook":
    {"Concern.hook": µs}} for `n` exchanges after a warm-up of 200 (first price lookups, compiled matchers)."""
    rule_file = RuleFile()
    rule_file.rules = rules.parse(rules_text, "bench-rules.yaml")
    rule_file.loaded = True
    concerns = [c for c in default_addons(rule_file) if type(c).__name__ not in PROCESS_WIDE]
    spent: collections.Counter[str] = collections.Counter()
    if per_hook:
        for concern in concerns:
            for hook in HOOKS:
                fn = getattr(concern, hook, None)
                if callable(fn):
                    setattr(concern, hook, _timed(fn, f"{type(concern).__name__}.{hook}", spent))
    dispatcher = Dispatcher(concerns)
    new_flow, answered = _exchanges(body)

    async def run() -> dict:
        with taddons.context(dispatcher) as tctx:
            tctx.options.update(gateway_log="/dev/null", gateway_flow_notes="on" if notes else "off")
            await _loop(dispatcher, new_flow, answered, 200)
            await _loop(_Idle(), new_flow, answered, 200)
            spent.clear()
            idle = await _loop(_Idle(), new_flow, answered, n)
            busy = await _loop(dispatcher, new_flow, answered, n)
            return {"us_per_exchange": (busy - idle) / n * 1e6, "loop_us": idle / n * 1e6,
                    "per_hook": {k: v / n * 1e6 for k, v in spent.most_common()}}

    try:
        return asyncio.run(run())
    finally:
        exchange.publishing = True  # WebView's switch for gateway_flow_notes is process-wide


def _timed(fn: Callable, name: str, spent: collections.Counter) -> Callable:
    if inspect.iscoroutinefunction(fn):  # an async hook (BodyLimit.request) stays async, or it would never run

        async def timed_async(*args):
            started = time.process_time()
            try:
                result = fn(*args)  # Quotas.request is marked a coroutine function but returns None without quotas
                if result is not None and inspect.isawaitable(result):
                    await result
            finally:
                spent[name] += time.process_time() - started

        return timed_async

    def timed(*args):
        started = time.process_time()
        try:
            return fn(*args)
        finally:
            spent[name] += time.process_time() - started

    return timed


def main(rules_text: str, body: bytes, n: int, notes: bool, per_hook: bool) -> int:
    found = measure(rules_text, body, n, notes, per_hook)
    print(f"gateway hooks: {found['us_per_exchange']:.1f} µs of CPU per exchange ({n} exchanges; the loop itself "
          f"{found['loop_us']:.1f} µs, taken out; flow notes {'on' if notes else 'off'})")
    if per_hook:
        print("per hook (timed one by one, so their sum is larger):")
        for name, us in found["per_hook"].items():
            print(f"  {us:7.1f} µs  {name}")
    return 0
