"""The gateway side by side with bare mitmdump and LiteLLM, on 127.0.0.1: `scripts/bench`.

Every set-up gets the same workloads from the same load generator (bench/load.py). The proxies forward
to one fast asyncio source (bench/source.py, FakeUpstream's bytes); FakeUpstream itself and the source
are measured directly as floors. Rounds alternate between set-ups (the order rotates every round),
and the table gives medians with their min–max over rounds, plus ratios to bare mitmdump taken per
round (neighbours in time), so a machine that gets busy for a while cannot fake a result. Processes
are started once and all stopped at the end, also on Ctrl-C or an error.

    scripts/bench                       # the full run (about 4 minutes once set up)
    scripts/bench --quick               # one short round, smaller sizes
    scripts/bench --only messages-1 --setups source,mitmdump,gateway
    scripts/bench --update-docs         # also write the table into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Awaitable, Callable

import yaml

from bench import agents, procs, scale
from bench.load import BenchError, Connection, Target, closed_loop, one
from bench.source import Answers
from fakes.upstream import Scenario

ROOT = procs.ROOT
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
LITELLM_VERSION = "1.106.2"
MB = 1_000_000

SCALE_WORKLOADS = ("scale", "soak")
# mitmweb's defaults for the gateway's viewing aids, which mitmdump (and so the "gateway" set-up) leaves off
VIEW_OPTIONS = ("--set", "gateway_flow_notes=on", "--set", "gateway_keep_stream_body=4m")  # bench/scale.py
# What each proxy set-up is, in the table.
SETUPS = {
    "fake": "FakeUpstream, direct",
    "source": "asyncio source, direct",
    "mitmdump": "bare mitmdump",
    "gateway": "gateway, all features",
    "gateway-on": "gateway, stream forced on",
    "gateway-off": "gateway, stream forced off",
    "gateway-view": "gateway, mitmweb's aids on too (flow notes, 4 MB body copy)",
    "litellm": f"LiteLLM {LITELLM_VERSION} pass-through",
    "in-process": "in-process (no proxy)",
    "gateway-otel": "gateway, OpenTelemetry export on to a local OTLP/HTTP receiver (--otel)",
    "gateway-otel-down": "gateway, OpenTelemetry export on, receiver down (--otel)",
}
# Run only with --otel (or when named in --setups): the cost of exporting spans and metrics (addons/otel.py).
OTEL_SETUPS = ("gateway-otel", "gateway-otel-down")
OTEL_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_METRIC_EXPORT_INTERVAL": "1000", "OTEL_EXPORTER_OTLP_TIMEOUT": "2"}
# Bare mitmdump buffers every body (its default), while the gateway streams SSE answers itself. So the
# streaming workloads compare with a second bare mitmdump that streams too: with stream_large_bodies=1
# a chunked body (every SSE answer) is streamed as soon as its first byte is there. The buffering one
# is the floor for JSON answers (which the gateway buffers too); streaming them would add a write.
BARE_STREAMING = ("--set", "stream_large_bodies=1")


@dataclass
class Config:
    rounds: int = 5
    seconds: float = 1.5  # timed window of the closed-loop workloads
    delayed_requests: int = 12
    delay: float = 0.05  # the delayed upstream: before the headers …
    event_delay: float = 0.005  # … and between events
    burst_events: int = 20_000
    burst_requests: int = 2
    big_bytes: int = 100 * MB
    convert_bytes: int = 8 * MB
    timeout: float = 90.0  # for one request or one closed-loop window
    budget: float = 270.0  # seconds for all rounds; a round that would end later is not started
    quick_sizes: bool = False  # the scale ladder and the soak too (bench/scale.py)
    agent_sessions: int = 4  # the agents workload (bench/agents.py): sessions at once …
    agent_turns: int = 30  # … of this many growing requests each

    @classmethod
    def quick(cls) -> "Config":
        return cls(rounds=1, seconds=1.0, delayed_requests=4, burst_requests=1, big_bytes=20 * MB,
                   convert_bytes=2 * MB, budget=180.0, quick_sizes=True,
                   agent_sessions=3, agent_turns=12)

    def agent_config(self) -> agents.AgentConfig:
        return agents.AgentConfig(sessions=self.agent_sessions, turns=self.agent_turns)


# ------------------------------------------------------------------------------------------- requests


def request_body(stream: bool) -> bytes:
    """An agent-sized request (6.7 kB): system prompt, two tools, three turns."""
    filler = "Keep answers short and precise; cite the file and line you rely on. " * 28
    body = {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 4096,
        "system": [{"type": "text", "text": "You are a coding agent working in a repository. " + filler,
                    "cache_control": {"type": "ephemeral"}}],
        "tools": [
            {"name": name, "description": f"{name} a file in the workspace. " + filler[:400],
             "input_schema": {"type": "object", "properties": {"path": {"type": "string"}, "text": {"type": "string"}},
                              "required": ["path"]}}
            for name in ("read", "write")
        ],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Please fix the failing test. " + filler[:900]}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Looking at it. " + filler[:700]},
                                              {"type": "tool_use", "id": "toolu_01", "name": "read",
                                               "input": {"path": "tests/test_x.py"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01",
                                          "content": "def test_x():\n    assert f(2) == 4\n" * 40}]},
        ],
        "stream": stream,
    }
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass
class Setup:
    name: str
    target: Target
    pids: Callable[[], list[int]] = lambda: []  # the proxy's processes; none for the direct set-ups

    def request(self, *, stream: bool, scenario: dict | None = None) -> bytes:
        headers = {"x-fake-scenario": json.dumps(scenario, separators=(",", ":"))} if scenario else {}
        return self.target.request(request_body(stream), headers)

    def cpu(self) -> float:
        return procs.cpu_seconds(self.pids())


class RssWatch:
    """Peak RSS growth of a set-up's processes during one request: the kernel's VmHWM (reset first)
    and, where that cannot be reset, samples every 10 ms."""

    def __init__(self, setup: Setup) -> None:
        self.pids = setup.pids()
        self.base = procs.rss_kb(self.pids)
        self.hwm = procs.reset_peak(self.pids)
        self.sampled = self.base
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "RssWatch":
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sampled = max(self.sampled, procs.rss_kb(self.pids))

    async def _sample(self) -> None:
        while True:
            self.sampled = max(self.sampled, procs.rss_kb(self.pids))
            await asyncio.sleep(0.01)

    @property
    def growth_mb(self) -> float:
        peak = max(self.sampled, procs.peak_kb(self.pids) if self.hwm else 0)
        return (peak - self.base) / 1024

    @property
    def base_mb(self) -> float:
        return self.base / 1024


# ------------------------------------------------------------------------------------------ workloads


@dataclass
class Metric:
    key: str
    label: str
    digits: int = 1


@dataclass
class Workload:
    name: str
    title: str
    setups: tuple[str, ...]
    metrics: tuple[Metric, ...]
    run: Callable[[Setup, Config], Awaitable[dict[str, float]]]
    # (metric, how it compares with bare mitmdump: "ratio" or "diff")
    versus: tuple[tuple[str, str], ...] = ()
    note: str = ""
    local: Callable[[Setup, Config], Awaitable[dict[str, float]]] | None = None  # the "in-process" row
    streams: bool = False  # the client asks for a stream: compare with the streaming bare mitmdump


def messages(connections: int) -> Callable[[Setup, Config], Awaitable[dict[str, float]]]:
    async def run(setup: Setup, cfg: Config) -> dict[str, float]:
        request = setup.request(stream=False)
        latencies, elapsed, cpu = await closed_loop(
            setup.target, request, connections=connections, seconds=cfg.seconds, warmup=max(3, 40 // connections),
            stream=False, timeout=cfg.timeout, meter=setup.cpu)
        latencies.sort()
        n = len(latencies)
        out = {"rps": n / elapsed, "p50": latencies[n // 2] * 1000, "p99": latencies[min(n - 1, int(n * 0.99))] * 1000}
        if setup.pids():
            out["cpu"] = cpu / n * 1000
        return out
    return run


async def delayed_stream(setup: Setup, cfg: Config) -> dict[str, float]:
    request = setup.request(stream=True, scenario={"delay": cfg.delay, "event_delay": cfg.event_delay})
    conn = Connection(setup.target.host, setup.target.port)
    ttfe, total = [], []
    try:
        for i in range(cfg.delayed_requests + 1):  # the first one opens the connections: not counted
            answer = await one(setup.target, request, stream=True, timeout=cfg.timeout, conn=conn)
            if i:
                ttfe.append(answer.ttfe * 1000)
                total.append(answer.latency * 1000)
    finally:
        conn.close()
    return {"ttfe": statistics.median(ttfe), "total": statistics.median(total)}


async def burst(setup: Setup, cfg: Config) -> dict[str, float]:
    request = setup.request(stream=True, scenario={"burst": cfg.burst_events})
    rates, cpus = [], []
    for _ in range(cfg.burst_requests):
        cpu = setup.cpu()
        answer = await one(setup.target, request, stream=True, timeout=cfg.timeout, keep=False)
        cpu = setup.cpu() - cpu
        if answer.events < cfg.burst_events:
            raise BenchError(f"{setup.name}: {answer.events} events of {cfg.burst_events}")
        rates.append(answer.events / answer.latency)
        cpus.append(cpu / answer.events * 1e6)
    out = {"eps": statistics.median(rates)}
    if setup.pids():
        out["cpu"] = statistics.median(cpus)
    return out


async def agent_sessions(setup: Setup, cfg: Config) -> dict[str, float]:
    """Claude Code-like sessions of growing requests, several at once, then again beside a paced stream
    (bench/agents.py)."""
    return await agents.run(setup.target, setup.cpu, cfg.agent_config(), cfg.timeout, bool(setup.pids()))


async def in_process_agents(setup: Setup, cfg: Config) -> dict[str, float]:
    return await agents.in_process(cfg.agent_config())


def sized(stream: bool, size: Callable[[Config], int]) -> Callable[[Setup, Config], Awaitable[dict[str, float]]]:
    """One answer of `size` bytes (SSE when `stream`), with the proxy's RSS watched."""

    async def run(setup: Setup, cfg: Config) -> dict[str, float]:
        n = size(cfg)
        request = setup.request(stream=stream, scenario={"stream_bytes": n})
        watch = RssWatch(setup)
        async with watch:
            answer = await one(setup.target, request, stream=stream, timeout=cfg.timeout, keep=False)
        if answer.size < n * 0.8:  # a Message converted from SSE is about 10% smaller than the stream
            raise BenchError(f"{setup.name}: {answer.size} bytes of about {n}")
        out = {"mbps": answer.size / MB / answer.latency, "ms_per_mb": answer.latency * 1000 / (n / MB)}
        if setup.pids():
            out["rss"] = watch.growth_mb
            out["rss_base"] = watch.base_mb
            out["rss_peak"] = watch.base_mb + watch.growth_mb
        return out
    return run


def in_process(to: str) -> Callable[[Setup, Config], Awaitable[dict[str, float]]]:
    """Conversion without a proxy: protocol_messages.message_from_sse / protocol_messages.message_to_sse on the same message."""

    async def run(setup: Setup, cfg: Config) -> dict[str, float]:
        from llm_gateway.protocol import jsoncodec
        from llm_gateway.protocol import messages as protocol_messages

        sse, message = conversion_inputs(cfg.convert_bytes)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            if to == "json":
                acc = protocol_messages.message_from_sse(sse)
                if not acc.complete or acc.message is None:
                    raise BenchError("in-process: message_from_sse did not complete")
                jsoncodec.dumps(acc.message)
            else:
                protocol_messages.message_to_sse(message)
            times.append(time.perf_counter() - start)
        t = statistics.median(times)
        return {"ms_per_mb": t * 1000 / (cfg.convert_bytes / MB), "mbps": cfg.convert_bytes / MB / t}
    return run


_inputs: dict[int, tuple[bytes, dict]] = {}


def conversion_inputs(size: int) -> tuple[bytes, dict]:
    """The SSE body and the Message the source sends for a `stream_bytes=size` answer."""
    if size not in _inputs:
        answers = Answers()
        spec = Scenario(stream_bytes=size)
        body = json.loads(request_body(False))
        parts = []
        for stream in (True, False):
            head, middle, count, tail = answers.sized(("x", stream), spec, body, stream)
            raw = head + b"".join(middle[i % len(middle)] for i in range(count)) + tail
            parts.append(dechunk(raw))
        _inputs[size] = (parts[0], json.loads(parts[1]))
    return _inputs[size]


def dechunk(raw: bytes) -> bytes:
    out, pos = [], 0
    while pos < len(raw):
        end = raw.index(b"\r\n", pos)
        n = int(raw[pos:end], 16)
        out.append(raw[end + 2 : end + 2 + n])
        pos = end + 4 + n
    return b"".join(out)


def workloads(cfg: Config) -> list[Workload]:
    plain = ("fake", "source", "mitmdump", "gateway")
    msg_metrics = (Metric("rps", "req/s", 0), Metric("p50", "p50 ms", 2), Metric("p99", "p99 ms", 2),
                   Metric("cpu", "proxy CPU ms/req", 2))
    size_metrics = (Metric("mbps", "MB/s", 1), Metric("ms_per_mb", "ms/MB", 1), Metric("rss", "RSS growth MB", 1),
                    Metric("rss_base", "RSS before MB", 0), Metric("rss_peak", "peak RSS MB", 0))
    big = cfg.big_bytes // MB
    conv = cfg.convert_bytes // MB
    small, large = agents.sizes(cfg.agent_config())
    return [
        Workload("agents", f"Agent sessions: {cfg.agent_sessions} at once, {cfg.agent_turns} growing Claude Code-like "
                 f"requests each ({small / 1000:.0f}–{large / 1000:.0f} kB), streamed answers",
                 ("source", "mitmdump", "gateway", "litellm", "in-process"),
                 (Metric("rps", "req/s", 0), Metric("p50", "p50 ms", 2), Metric("p99", "p99 ms", 2),
                  Metric("cpu", "proxy CPU ms/req", 2), Metric("late99", "other stream p99 late ms", 2),
                  Metric("fp_ms", "parse + fingerprint ms/req", 3), Metric("watch_kb", "cache watch KB/session", 1)),
                 agent_sessions, (("cpu", "ratio"), ("p50", "diff"), ("p99", "diff"), ("late99", "diff")),
                 "Added latency: p50 and p99 less bare mitmdump's in the same round. \"other stream p99 late\": a "
                 f"stream paced at one event every {agents.AgentConfig.interval * 1000:.0f} ms runs beside the sessions "
                 "(phase 2); the p99 of how late its events came, against its own schedule: what the sessions' "
                 "requests cost the other streams of the same proxy. in-process: the cache watch alone on the same "
                 "sessions (policy/cachewatch.py): parse and fingerprint per request, and what it keeps per session "
                 "after the last turn (it keeps at most 256 MB in all, least recent sessions forgotten first).",
                 in_process_agents, streams=True),
        Workload("messages-1", "Non-streaming Messages, 1 connection", (*plain, "gateway-view", "gateway-on", "litellm", *OTEL_SETUPS),
                 msg_metrics, messages(1), (("rps", "ratio"), ("p50", "ratio"), ("cpu", "ratio")),
                 "gateway-on: the client asks for JSON, the upstream is asked for a stream, the gateway converts it."),
        Workload("messages-16", "Non-streaming Messages, 16 connections", (*plain, "gateway-view", "gateway-on", "litellm", *OTEL_SETUPS),
                 msg_metrics, messages(16), (("rps", "ratio"), ("p99", "ratio"), ("cpu", "ratio")),
                 "gateway-on: as above."),
        Workload("stream-delayed", f"Streamed answer, upstream waits {cfg.delay * 1000:.0f} ms, then "
                 f"{cfg.event_delay * 1000:.0f} ms between events", (*plain, "gateway-off", "litellm", *OTEL_SETUPS),
                 (Metric("ttfe", "first event ms", 2), Metric("total", "total ms", 2)), delayed_stream,
                 (("ttfe", "diff"), ("total", "diff")),
                 "gateway-off: the upstream is asked for JSON and the gateway replays it as events, so the first "
                 "event can only come when the whole answer is there.", streams=True),
        Workload("burst", f"Burst stream of {cfg.burst_events:,} events", (*plain, "gateway-view", "litellm"),
                 (Metric("eps", "events/s", 0), Metric("cpu", "proxy CPU µs/event", 1)), burst,
                 (("eps", "ratio"), ("cpu", "ratio")),
                 "No forced-off row: the gateway replays a JSON answer as one text delta, not 20,000 events.",
                 streams=True),
        Workload("stream-big", f"A stream of {big} MB", ("source", "mitmdump", "gateway", "gateway-view", "litellm"),
                 size_metrics, sized(True, lambda c: c.big_bytes), (("mbps", "ratio"), ("rss", "diff")),
                 "FakeUpstream is left out here (it makes the events one by one, much slower than any proxy); "
                 "forced off is left out (converting buffers the whole answer by design; see the conversions).",
                 streams=True),
        Workload("convert-to-json", f"A Message of {conv} MB, client asks for JSON (forced on: SSE converted to JSON)",
                 ("source", "mitmdump", "gateway", "gateway-on", "litellm", "in-process"),
                 size_metrics, sized(False, lambda c: c.convert_bytes), (("ms_per_mb", "ratio"),),
                 "in-process: protocol_messages.message_from_sse on the SSE body, plus jsoncodec.dumps of the Message.",
                 in_process("json")),
        Workload("convert-to-sse", f"A Message of {conv} MB, client asks for a stream (forced off: JSON converted to SSE)",
                 ("source", "mitmdump", "gateway", "gateway-off", "litellm", "in-process"),
                 size_metrics, sized(True, lambda c: c.convert_bytes), (("ms_per_mb", "ratio"),),
                 "in-process: protocol_messages.message_to_sse on the Message.", in_process("sse"), streams=True),
    ]


# --------------------------------------------------------------------------------------------- set-ups


def gateway_rules(upstream: str) -> str:
    """The default rule file with its API, clients, egress and pricing, routed to the source, plus two
    client rules that force the stream flag for the bench's own user agents.

    The gateway's base-URL listener is a reverse proxy to the source itself, as bare mitmdump is (so both
    run the same mitmproxy layers; a `reverse:https://…` listener routed elsewhere would add mitmproxy's
    TLS layers to the gateway's side only): the source's host is an API host, and the route to the source
    still matches every API flow and rewrites it."""
    rules = yaml.safe_load((ROOT / "rules.yaml").read_text())
    host = upstream.split("://", 1)[1].rsplit(":", 1)[0]
    rules["apis"][0]["hosts"] = [*rules["apis"][0]["hosts"], host]
    rules["clients"] = [
        {"name": "bench-stream-on", "user_agent": ["bench-stream-on/*"], "stream": "on"},
        {"name": "bench-stream-off", "user_agent": ["bench-stream-off/*"], "stream": "off"},
        *rules["clients"],
    ]
    rules["routes"] = [{"match": {"api": rules["apis"][0]["name"]}, "upstream": upstream}]
    return yaml.safe_dump(rules, sort_keys=False)


class Bench:
    def __init__(self, cfg: Config, names: set[str], only: set[str] | None, log: Callable[[str], None]) -> None:
        self.cfg, self.names, self.log = cfg, names, log
        self.workloads = [w for w in workloads(cfg) if only is None or w.name in only]
        # the scale ladder and the soak (bench/scale.py): after the rounds, in their own time budget
        self.scaling = [name for name in SCALE_WORKLOADS if only is None or name in only]
        self.scale_cfg = scale.ScaleConfig.quick() if cfg.quick_sizes else scale.ScaleConfig()
        self.scale_results: dict[str, list[dict]] = {}
        self.soak_results: dict[str, dict] = {}
        self.stack = contextlib.ExitStack()
        self.setups: dict[str, Setup] = {}
        self.results: dict[str, dict[str, list[dict[str, float] | None]]] = {}
        self.errors: dict[str, dict[str, list[str]]] = {}
        self.rounds_done = 0
        self.info: dict[str, Any] = {}
        self.pids: list[int] = []  # every process started, for the record

    def _start(self, process):
        """Start a process for the rest of the run; it is stopped by `stop`."""
        started = self.stack.enter_context(_started(process))
        self.pids.extend(procs.tree(process.proc.pid))
        return started

    def needed(self) -> set[str]:
        scaled = {"source", "mitmdump", "gateway", "litellm"} if self.scaling else set()
        return ({s for w in self.workloads for s in w.setups} | scaled) & self.names

    def start(self) -> None:
        needed = self.needed()
        headers = {"User-Agent": "bench/1.0", "anthropic-version": "2023-06-01", "x-api-key": "sk-ant-bench-0000"}
        source = self._start(procs.source())
        source_url = f"http://127.0.0.1:{source.port}"
        self.setups["source"] = Setup("source", Target("source", "127.0.0.1", source.port, headers=headers))
        self.setups["in-process"] = Setup("in-process", Target("in-process", "", 0))
        if "fake" in needed:
            fake = self._start(procs.fake_upstream())
            self.setups["fake"] = Setup("fake", Target("fake", "127.0.0.1", fake.port, headers=headers))
        if "mitmdump" in needed:
            for name, options in (("mitmdump", ()), ("mitmdump-streaming", BARE_STREAMING)):
                bare = self._start(procs.BareMitmdump(source_url, options))
                self.setups[name] = Setup(name, Target("mitmdump", "127.0.0.1", bare.reverse_port, headers=headers),
                                          lambda p=bare.proc.pid: [p])
        if needed & {"gateway", "gateway-on", "gateway-off"}:
            gw = self._start(procs.Gateway(gateway_rules(source_url), reverse_to=source_url))
            for name, agent in (("gateway", "bench/1.0"), ("gateway-on", "bench-stream-on/1.0"),
                                ("gateway-off", "bench-stream-off/1.0")):
                self.setups[name] = Setup(name, Target(name, "127.0.0.1", gw.reverse_port,
                                                       headers={**headers, "User-Agent": agent}),
                                          lambda p=gw.proc.pid: [p])
            self.gateway = gw
        for name in set(OTEL_SETUPS) & needed:  # --otel: the gateway exporting spans and metrics
            if name == "gateway-otel":
                from otlp import Receiver

                endpoint = self.stack.enter_context(Receiver()).url
            else:
                endpoint = f"http://127.0.0.1:{procs.free_port()}"  # nobody listens there
            otel = self._start(procs.Gateway(gateway_rules(source_url), reverse_to=source_url,
                                             env={**OTEL_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}))
            self.setups[name] = Setup(name, Target(name, "127.0.0.1", otel.reverse_port, headers=headers),
                                      lambda p=otel.proc.pid: [p])
        if "gateway-view" in needed:  # what mitmweb adds (gateway_flow_notes and the body copy are on there)
            view = self._start(procs.Gateway(gateway_rules(source_url), reverse_to=source_url, extra_args=VIEW_OPTIONS))
            self.setups["gateway-view"] = Setup("gateway-view", Target("gateway-view", "127.0.0.1", view.reverse_port,
                                                                      headers=headers), lambda p=view.proc.pid: [p])
        if "litellm" in needed:
            from realclients import LiteLLMProxy, cache_dir

            if not (cache_dir() / f"litellm-{LITELLM_VERSION}" / "bin" / "litellm").exists():
                raise SystemExit(f"LiteLLM {LITELLM_VERSION} is not installed in {cache_dir()}: run "
                                 "scripts/test-tools --only litellm (scripts/bench does), or leave it out with --no-litellm")
            started = time.monotonic()
            proxy = LiteLLMProxy(LITELLM_VERSION, anthropic_base_url=source_url)
            self.stack.enter_context(proxy)
            self.pids.extend(procs.tree(proxy.proc.pid))
            self.log(f"LiteLLM {LITELLM_VERSION} ready in {time.monotonic() - started:.0f}s")
            self.setups["litellm"] = Setup(
                "litellm",
                Target("litellm", "127.0.0.1", proxy.port, path="/anthropic/v1/messages",
                       headers={**headers, "Authorization": f"Bearer {proxy.master_key}"}),
                lambda p=proxy.proc.pid: procs.tree(p))

    def stop(self) -> None:
        """Stop everything started; a second Ctrl-C or SIGTERM must not cut the clean-up short."""
        held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.stack.close()
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)

    async def run(self) -> None:
        # SIGTERM inside the loop: end the run the way Ctrl-C does (cancel, then the clean-up in `main`).
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
        deadline = time.monotonic() + self.cfg.budget
        await self.warm_up()
        round_time = 0.0
        for r in range(self.cfg.rounds):
            if r and time.monotonic() + round_time > deadline:
                self.log(f"time budget reached: {r} of {self.cfg.rounds} rounds")
                break
            began = time.monotonic()
            for workload in self.workloads:
                names = [s for s in workload.setups if s in self.setups]
                names = names[r % len(names):] + names[: r % len(names)]  # rotate the order every round
                for name in names:
                    await self.measure(workload, self.setups[name], r)
            self.rounds_done = r + 1
            round_time = time.monotonic() - began
            self.log(f"round {r + 1}/{self.cfg.rounds} done in {round_time:.0f}s")
        await self.run_scale()

    async def run_scale(self) -> None:
        if not self.scaling:
            return
        deadline = time.monotonic() + self.scale_cfg.budget
        # the streaming bare mitmdump: the gateway streams SSE itself
        setups = {name: self.setups["mitmdump-streaming" if name == "mitmdump" else name]
                  for name in ("source", "mitmdump", "gateway", "litellm") if name in self.setups}
        if "scale" in self.scaling:
            self.scale_results = await scale.ladder(setups, self.scale_cfg, self.log, deadline)
        if "soak" in self.scaling:
            for name in ("mitmdump", "gateway"):
                if name in setups:
                    self.soak_results[name] = await scale.soak(setups[name], self.scale_cfg, self.log)

    async def measure(self, workload: Workload, setup: Setup, r: int) -> None:
        name = setup.name
        slot = self.results.setdefault(workload.name, {}).setdefault(name, [])
        slot.extend([None] * (r + 1 - len(slot)))
        try:
            run = workload.local if name == "in-process" else workload.run
            if name == "mitmdump" and workload.streams:
                setup = self.setups["mitmdump-streaming"]
            slot[r] = await asyncio.wait_for(run(setup, self.cfg), self.cfg.timeout * 3)
            shown = ", ".join(f"{k} {v:.2f}" for k, v in slot[r].items())
            self.log(f"  {workload.name:16} {name:12} {shown}")
        except (BenchError, asyncio.TimeoutError, TimeoutError) as e:
            message = str(e) or f"no result within {self.cfg.timeout * 3:.0f}s"
            self.errors.setdefault(workload.name, {}).setdefault(name, []).append(message)
            self.log(f"  {workload.name:16} {name:12} FAILED: {message}")

    async def warm_up(self) -> None:
        """A few requests of each kind through every set-up first: connections, caches, lazy imports."""
        for name, setup in self.setups.items():
            if name in ("in-process", "fake"):
                continue
            try:
                for stream in (False, True):
                    request = setup.request(stream=stream, scenario={"burst": 200})
                    conn = Connection(setup.target.host, setup.target.port)
                    try:
                        for _ in range(10):
                            await one(setup.target, request, stream=stream, timeout=self.cfg.timeout, conn=conn)
                    finally:
                        conn.close()
            except BenchError as e:
                self.log(f"  warm-up {name}: {e}")


@contextlib.contextmanager
def _started(process):
    """A started process, stopped at the end, its folder (confdir, logs, usage records) removed."""
    try:
        yield process.start()
    finally:
        process.stop()
        shutil.rmtree(process.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------- report


def spread(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:,.{digits}f}"
    return f"{med:,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def versus(bench: Bench, workload: Workload, setup: str, key: str, how: str) -> list[float]:
    """Per round: this set-up's metric over (or minus) bare mitmdump's in the same round."""
    mine = bench.results.get(workload.name, {}).get(setup, [])
    bare = bench.results.get(workload.name, {}).get("mitmdump", [])
    out = []
    for a, b in zip(mine, bare):
        if a and b and key in a and key in b:
            if how == "ratio" and b[key]:
                out.append(a[key] / b[key])
            elif how == "diff":
                out.append(a[key] - b[key])
    return out


def values(bench: Bench, workload: str, setup: str, key: str) -> list[float]:
    return [r[key] for r in bench.results.get(workload, {}).get(setup, []) if r and key in r]


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(total / 1024 / 1024, 1),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mitmproxy": metadata.version("mitmproxy"),
        "litellm": LITELLM_VERSION,
        "load_average": os.getloadavg(),
    }


def report(bench: Bench) -> str:
    info = bench.info
    out = [
        f"Run of {info['date']}: `{info['command']}`, {bench.rounds_done} round(s), {info['seconds']:.0f} s.",
        "",
        f"Machine: {info['machine']['nproc']} CPUs ({info['machine']['cpu']}), {info['machine']['memory_gib']} GiB, "
        f"Linux {info['machine']['kernel']}; Python {info['machine']['python']}, mitmproxy {info['machine']['mitmproxy']}, "
        f"LiteLLM {LITELLM_VERSION}. Load average before / after: "
        f"{' '.join(f'{x:.1f}' for x in info['load_before'])} / {' '.join(f'{x:.1f}' for x in info['load_after'])}.",
        "",
        "Cells: median over rounds (min–max). \"vs mitmdump\": the set-up's figure over bare mitmdump's in the same "
        "round (for times in ms: the difference), median (min–max) over rounds.",
    ]
    for w in bench.workloads:
        names = [s for s in w.setups if s in bench.setups]
        metrics = [m for m in w.metrics if any(values(bench, w.name, s, m.key) for s in names)]
        out += ["", f"### {w.title}", ""]
        head = ["set-up"] + [m.label for m in metrics]
        labels = {m.key: m.label for m in w.metrics}
        head += [f"{labels[k]} {'vs' if how == 'ratio' else '−'} mitmdump" for k, how in w.versus]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for s in names:
            row = [SETUPS[s]]
            if s == "mitmdump":
                row[0] += " (streaming: stream_large_bodies=1)" if w.streams else " (defaults: buffers bodies)"
            for m in metrics:
                row.append(spread(values(bench, w.name, s, m.key), m.digits))
            for k, how in w.versus:
                row.append("–" if s == "mitmdump" else spread(versus(bench, w, s, k, how), 2))
            failed = bench.errors.get(w.name, {}).get(s)
            if failed:
                row[0] += f" (failed {len(failed)}×: {failed[0][:120]})"
            out.append("| " + " | ".join(row) + " |")
        if w.note:
            out += ["", w.note]
    if bench.scale_results or bench.soak_results:
        out += scale.report(bench.scale_results, bench.soak_results, bench.scale_cfg, SETUPS)
    out += ["", "### Targets", ""] + [f"- {line}" for line in targets(bench)]
    return "\n".join(out) + "\n"


def targets(bench: Bench) -> list[str]:
    lines = []

    def check(workload: str, setup: str, key: str, how: str, ok: Callable[[float], bool], text: str) -> None:
        w = next((w for w in bench.workloads if w.name == workload), None)
        if w is None or setup not in bench.setups:
            return
        got = versus(bench, w, setup, key, how) if how != "abs" else values(bench, workload, setup, key)
        if not got:
            lines.append(f"{text}: no result")
            return
        med = statistics.median(got)
        lines.append(f"{text}: {'met' if ok(med) else 'MISSED'} ({spread(got, 3 if how == 'ratio' else 2)})")

    check("agents", "gateway", "cpu", "ratio", lambda x: x <= 1.15, "agent sessions: CPU per request ≤ 1.15× mitmdump's")
    check("agents", "gateway", "p50", "diff", lambda x: x <= 2.0, "agent sessions: median added latency ≤ 2 ms (ms)")
    check("agents", "gateway", "late99", "diff", lambda x: x <= 2.0,
          "agent sessions: another stream's p99 lateness within 2 ms of mitmdump's (ms)")
    check("messages-1", "gateway", "rps", "ratio", lambda x: x >= 0.90, "≥ 0.90 (aim 0.95) of mitmdump's requests/s, 1 connection")
    check("messages-16", "gateway", "rps", "ratio", lambda x: x >= 0.90, "≥ 0.90 (aim 0.95) of mitmdump's requests/s, 16 connections")
    check("messages-1", "gateway-view", "rps", "ratio", lambda x: x >= 0.90,
          "the same with mitmweb's aids on too (flow notes, body copy), 1 connection")
    check("messages-16", "gateway-view", "rps", "ratio", lambda x: x >= 0.90,
          "the same with mitmweb's aids on too, 16 connections")
    check("stream-delayed", "gateway", "ttfe", "diff", lambda x: x <= 2.0, "first streamed event within 2 ms of mitmdump (ms)")
    check("burst", "gateway", "eps", "ratio", lambda x: x >= 0.90, "≥ 0.90 of mitmdump's streamed events/s, usage tap on")
    check("burst", "gateway", "eps", "ratio", lambda x: x >= 3.0,
          "burst: ≥ 3× mitmdump's streamed events/s (chunks handed on in batches, gateway_batch_chunks)")
    check("burst", "gateway", "eps", "abs", lambda x: bench.cfg.burst_events / x < 0.6,
          f"burst: {bench.cfg.burst_events:,} events in under 0.6 s (events/s)")
    check("burst", "gateway-view", "eps", "ratio", lambda x: x >= 0.90,
          "the same with mitmweb's aids on too (the body copy takes every event)")
    check("stream-big", "gateway", "rss", "abs", lambda x: x < 30, f"RSS growth under 30 MB while a {bench.cfg.big_bytes // MB} MB stream passes (MB)")
    if bench.scale_results:
        limit = bench.scale_cfg.limit_ms
        carried = {name: scale.capacity(rungs, limit) for name, rungs in bench.scale_results.items()}
        gw, bare, lite = carried.get("gateway"), carried.get("mitmdump"), carried.get("litellm")
        if gw and bare:
            ratio = gw["n"] / bare["n"]
            lines.append(f"scale: ≥ 0.90 of mitmdump's concurrent paced streams within {limit:.0f} ms added p99: "
                         f"{'met' if ratio >= 0.9 else 'MISSED'} ({gw['n']} vs {bare['n']}, {ratio:.2f})")
        elif "gateway" in carried:
            lines.append("scale: ≥ 0.90 of mitmdump's concurrent paced streams: no result (a set-up carried none)")
        if gw and "litellm" in carried:
            lines.append(f"scale: more streams than LiteLLM: {'met' if not lite or gw['n'] > lite['n'] else 'MISSED'} "
                         f"({gw['n']} vs {lite['n'] if lite else 'none'})")
    if "gateway" in bench.soak_results and "mitmdump" in bench.soak_results:
        gw_rss, bare_rss = bench.soak_results["gateway"]["rss"], bench.soak_results["mitmdump"]["rss"]
        lines.append(f"soak: RSS plateau within 30 MB of mitmdump's: "
                     f"{'met' if gw_rss[-1] - bare_rss[-1] <= 30 else 'MISSED'} ({gw_rss[-1]:.0f} vs {bare_rss[-1]:.0f} MB)")
    return lines


def update_docs(table: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one short round with smaller sizes (about a minute)")
    ap.add_argument("--rounds", type=int, help="rounds (default 5; quick 1)")
    ap.add_argument("--seconds", type=float, help="timed window of each closed-loop run (default 1.5; quick 1)")
    ap.add_argument("--only", help="comma-separated workloads: "
                    + ", ".join([w.name for w in workloads(Config())] + list(SCALE_WORKLOADS)))
    ap.add_argument("--setups", help="comma-separated set-ups (default: all): " + ", ".join(SETUPS))
    ap.add_argument("--no-litellm", action="store_true", help="leave out the LiteLLM set-up")
    ap.add_argument("--otel", action="store_true",
                    help="add the OpenTelemetry set-ups (export on; receiver down): " + ", ".join(OTEL_SETUPS))
    ap.add_argument("--agent-sessions", type=int, help="agents workload: sessions at once (default 4; quick 3)")
    ap.add_argument("--agent-turns", type=int, help="agents workload: requests per session (default 30; quick 12)")
    ap.add_argument("--budget", type=float, help="seconds for all rounds (default 270; quick 180)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--update-docs", action="store_true", help=f"write the table into {DOCS.relative_to(ROOT)}")
    ap.add_argument("--profile", metavar="WORKLOAD", choices=("agents", "messages-1", "messages-16", "burst"),
                    help="instead of the table: profile the proxy with py-spy under this workload")
    ap.add_argument("--profile-target", choices=("gateway", "mitmdump"), default="gateway",
                    help="the proxy --profile samples (default: the gateway)")
    ap.add_argument("--hooks", type=int, metavar="N",
                    help="instead of the table: the gateway's hooks alone, in-process, for N exchanges (bench/hooks.py)")
    ap.add_argument("--per-hook", action="store_true", help="with --hooks: each concern's hooks timed too")
    ap.add_argument("--quotas", type=int, metavar="N",
                    help="the quota check's cost: the gateway's hooks for N exchanges without quotas, with the memory "
                    "store and with a local redis-server, and Redis's round trips (tests/bench/quotas.py)")
    ap.add_argument("--notes", action="store_true", help="with --hooks: gateway_flow_notes on, as in mitmweb")
    ap.add_argument("--profile-raw", metavar="FILE",
                    help="with --profile: also keep py-spy's raw stacks here (one `frame;frame;… count` per line)")
    return ap.parse_args(argv)


def _interrupt(signum, frame) -> None:
    """SIGTERM ends the run as Ctrl-C does, through the same clean-up."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config.quick() if args.quick else Config()
    if args.hooks:
        from bench import hooks

        return hooks.main(gateway_rules(hooks.UPSTREAM), request_body(False), args.hooks, args.notes, args.per_hook)
    if args.quotas:
        from bench import hooks, quotas

        return quotas.main(gateway_rules(hooks.UPSTREAM), request_body(False), args.quotas)
    if args.profile:
        from bench import profile

        def request_for(target: Target, workload: str) -> bytes:
            scenario = {"x-fake-scenario": json.dumps({"burst": cfg.burst_events})} if workload == "burst" else {}
            return target.request(request_body(workload == "burst"), scenario)

        return profile.main(args.profile, args.profile_target, args.seconds or 10.0, gateway_rules, request_for,
                            raw_out=args.profile_raw)
    for name in ("rounds", "seconds", "budget", "agent_sessions", "agent_turns"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    known = {w.name for w in workloads(cfg)} | set(SCALE_WORKLOADS)
    only = set(args.only.split(",")) if args.only else None
    if only and only - known:
        print(f"unknown workloads: {', '.join(sorted(only - known))} (known: {', '.join(sorted(known))})", file=sys.stderr)
        return 2
    names = set(args.setups.split(",")) if args.setups else set(SETUPS)
    if names - set(SETUPS):
        print(f"unknown set-ups: {', '.join(sorted(names - set(SETUPS)))}", file=sys.stderr)
        return 2
    if args.no_litellm:
        names.discard("litellm")
    if not args.otel and not args.setups:
        names -= set(OTEL_SETUPS)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _interrupt)
    bench = Bench(cfg, names, only, log)
    started = time.monotonic()
    bench.info = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": "scripts/bench " + " ".join(argv or sys.argv[1:]),
                  "load_before": os.getloadavg(), "machine": machine(), "config": cfg.__dict__}
    try:
        log(f"starting {', '.join(sorted(bench.needed() | {'source'}))}")
        bench.start()
        asyncio.run(bench.run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted: stopping everything the bench started")
        return 130
    finally:
        signal.signal(signal.SIGTERM, _interrupt)  # the loop's own handler is gone with the loop
        bench.stop()
    bench.info["load_after"] = os.getloadavg()
    bench.info["seconds"] = time.monotonic() - started
    table = report(bench)
    print(table)
    if args.json:
        bench.info["pids"] = bench.pids
        args.json.write_text(json.dumps({"info": bench.info, "results": bench.results, "errors": bench.errors}, indent=1))
    if args.update_docs:
        update_docs(table)
        log(f"table written to {DOCS}")
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
