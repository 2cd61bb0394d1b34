"""How many agent-like streams one proxy process carries, and what memory it keeps: `scale` and `soak`.

scale: N clients open their connections at once and each asks for a paced stream, as a coding agent
receives one: `events` text deltas of about 100 bytes, one every 1/`rate` seconds (the source keeps a
fixed schedule). For every event the client notes how late it arrived against that schedule (its start
taken from the event of the stream that came most on time). The delay a proxy adds is its p99 lateness minus the p99 lateness of the
source asked directly with the same N in the same run (what the load generator and the source add on this
machine themselves). N climbs a ladder until the added p99 reaches the limit (10 ms), an event or a
stream is lost, or a stream fails; the figure is the largest N below the limit. RSS per stream is the
proxy's peak RSS during the step minus its RSS before, over N.

soak: rounds of N concurrent streams of `events` unpaced events in one proxy process; the RSS after each
round shows whether memory is given back or grows into a plateau, and how high that plateau is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

from bench import procs
from bench.load import READ_LIMIT, BenchError, Target, _parse_head


@dataclass
class ScaleConfig:
    ladder: tuple[int, ...] = (25, 50, 100, 150, 200, 300, 400, 600, 800)
    events: int = 600  # per stream: 20 s at 30 events/s
    rate: float = 30.0  # events per second per stream
    limit_ms: float = 10.0  # added p99 event delay a proxy may have at the figure
    soak_rounds: int = 5
    soak_streams: int = 150
    soak_events: int = 1000
    budget: float = 420.0  # seconds for the scale ladder of every set-up, and the soak

    @classmethod
    def quick(cls) -> "ScaleConfig":
        return cls(ladder=(10, 25, 50), events=90, soak_rounds=2, soak_streams=50, soak_events=200, budget=120.0)


@dataclass
class StreamResult:
    lateness: list[float] = field(default_factory=list)  # seconds, per event (see paced_stream)
    events: int = 0
    ok: bool = False
    error: str | None = None


async def paced_stream(target: Target, request: bytes, interval: float, expected: int, timeout: float) -> StreamResult:
    """One streamed request on a new connection; every event's lateness against the source's fixed schedule,
    whose start is taken from the event that came most on time (so lateness is never negative, and the first
    event's own delay, a matter of connecting, counts only if later events came earlier than it)."""
    out = StreamResult()
    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(target.host, target.port, limit=READ_LIMIT), timeout)
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status, headers = _parse_head(head)
        if status != 200 or "chunked" not in headers.get("transfer-encoding", ""):
            raise BenchError(f"HTTP {status}, {headers.get('transfer-encoding')}")
        offsets: list[float] = []
        last = b""
        tail = b""
        deadline = time.perf_counter() + timeout
        while True:
            line = await asyncio.wait_for(reader.readuntil(b"\r\n"), max(0.1, deadline - time.perf_counter()))
            n = int(line.split(b";", 1)[0], 16)
            if n == 0:
                await reader.readuntil(b"\r\n")
                break
            data = (await reader.readexactly(n + 2))[:-2]
            now = time.perf_counter()
            count = data.count(b"\n\n") + (last == b"\n" and data[:1] == b"\n")
            last = data[-1:]
            tail = (tail + data)[-64:]
            for _ in range(count):
                offsets.append(now - out.events * interval)  # when it came, less when it was due after the first
                out.events += 1
        # Against the stream's own best: the event that came most on time sets when the schedule began.
        anchor = min(offsets, default=0.0)
        out.lateness = [t - anchor for t in offsets]
        out.ok = b"message_stop" in tail and out.events >= expected
        if not out.ok:
            out.error = f"{out.events} events of {expected}, ends {tail[-40:]!r}"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
            TimeoutError, BenchError, ValueError) as e:
        out.error = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()
    return out


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] if values else float("nan")


async def step(target: Target, request: bytes, n: int, cfg: ScaleConfig, pids: list[int]) -> dict:
    """N paced streams at once through one set-up: lateness p50/p99 (ms), lost streams, RSS per stream."""
    interval = 1 / cfg.rate
    timeout = cfg.events * interval * 3 + 30
    expected = cfg.events + 4  # message_start, content_block_start, the deltas, …, message_stop
    base = procs.rss_kb(pids)
    peak = base
    cpu = procs.cpu_seconds(pids)

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, procs.rss_kb(pids))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample()) if pids else None
    started = time.perf_counter()
    try:
        results = await asyncio.gather(*(paced_stream(target, request, interval, expected, timeout) for _ in range(n)))
    finally:
        if sampler:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
    elapsed = time.perf_counter() - started
    lateness = [x for r in results for x in r.lateness]
    failed = [r.error for r in results if not r.ok]
    out = {"n": n, "p50": percentile(lateness, 0.5) * 1000, "p99": percentile(lateness, 0.99) * 1000,
           "failed": len(failed), "error": failed[0] if failed else None, "seconds": elapsed}
    if pids:
        out["rss_per_stream_kb"] = (peak - base) / n
        out["rss_peak_mb"] = peak / 1024
        out["cpu_share"] = (procs.cpu_seconds(pids) - cpu) / elapsed  # cores the proxy used
    return out


def stream_request(target: Target, events: int, rate: float | None) -> bytes:
    from bench.run import request_body

    scenario = {"burst": events, **({"event_delay": 1 / rate} if rate else {})}
    return target.request(request_body(True), {"x-fake-scenario": json.dumps(scenario, separators=(",", ":"))})


async def ladder(setups: dict, cfg: ScaleConfig, log, deadline: float) -> dict[str, list[dict]]:
    """Every rung of the ladder for every set-up still within the limit, the direct source first."""
    results: dict[str, list[dict]] = {name: [] for name in setups}
    going = set(setups)
    for n in cfg.ladder:
        if time.monotonic() + cfg.events / cfg.rate * (len(going) + 1) > deadline or going <= {"source"}:
            log(f"  scale: stopping before {n} streams ({'time budget' if going - {'source'} else 'all past the limit'})")
            break
        for name in [s for s in setups if s in going]:
            setup = setups[name]
            r = await step(setup.target, stream_request(setup.target, cfg.events, cfg.rate), n, cfg, setup.pids())
            base = next((x for x in results["source"] if x["n"] == n), None) if name != "source" else r
            r["added_p99"] = r["p99"] - base["p99"] if base else float("nan")
            results[name].append(r)
            shown = ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k != "error")
            log(f"  scale {name:10} {shown}" + (f" ({r['error'][:100]})" if r["error"] else ""))
            if name != "source" and (r["failed"] or r["added_p99"] >= cfg.limit_ms):
                going.discard(name)
    return results


def capacity(rungs: list[dict], limit_ms: float) -> dict | None:
    """The last rung (largest N) with nothing lost and the added p99 under the limit, before the first that failed."""
    best = None
    for r in rungs:
        if r["failed"] or not r["added_p99"] < limit_ms:
            break
        best = r
    return best


async def soak(setup, cfg: ScaleConfig, log) -> dict:
    """Rounds of concurrent unpaced streams in one process: RSS (MB) before and after each round."""
    request = stream_request(setup.target, cfg.soak_events, None)
    pids = setup.pids()
    rss = [procs.rss_kb(pids) / 1024]
    lost = 0
    for _ in range(cfg.soak_rounds):
        results = await asyncio.gather(*(paced_stream(setup.target, request, 0.0, cfg.soak_events + 4, 120)
                                         for _ in range(cfg.soak_streams)))
        lost += sum(not r.ok for r in results)
        await asyncio.sleep(1.0)  # what is still held a second after the round is what the process keeps
        rss.append(procs.rss_kb(pids) / 1024)
    log(f"  soak {setup.name:10} RSS MB {' → '.join(f'{x:.0f}' for x in rss)}, lost streams {lost}")
    return {"rss": rss, "lost": lost}


def report(results: dict[str, list[dict]], soaks: dict[str, dict], cfg: ScaleConfig, names: dict[str, str]) -> list[str]:
    out = ["", f"### Scale: concurrent paced streams ({cfg.events} events of ~100 bytes at {cfg.rate:.0f}/s each, "
           f"{cfg.events / cfg.rate:.0f} s)", "",
           "| set-up | streams | p50 event delay ms | p99 ms | added p99 ms | lost streams | proxy CPU (cores) | RSS per stream KB | peak RSS MB |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, rungs in results.items():
        for r in rungs:
            out.append(f"| {names[name]} | {r['n']} | {r['p50']:.1f} | {r['p99']:.1f} | "
                       f"{'–' if name == 'source' else f'{r['added_p99']:.1f}'} | {r['failed']} | "
                       f"{r.get('cpu_share', float('nan')):.2f} | {r.get('rss_per_stream_kb', float('nan')):.0f} | "
                       f"{r.get('rss_peak_mb', float('nan')):.0f} |".replace("nan", "–"))
    out += ["", f"Delay: how late each event arrives against the source's schedule (started by the stream's most "
            f"punctual event); "
            f"\"added\": the set-up's p99 minus the direct source's at the same number of streams. A set-up stops "
            f"climbing at its first rung over {cfg.limit_ms:.0f} ms added or with a lost stream.", "",
            "| set-up | streams carried with added p99 < " + f"{cfg.limit_ms:.0f} ms | RSS per stream KB there | vs bare mitmdump |",
            "|---|---|---|---|"]
    bare = capacity(results.get("mitmdump", []), cfg.limit_ms)
    for name, rungs in results.items():
        if name == "source":
            continue
        best = capacity(rungs, cfg.limit_ms)
        top = rungs[-1]["n"] if rungs else 0
        carried = "none" if best is None else f"{best['n']}" + (" (the ladder's top)" if best is rungs[-1] and top == cfg.ladder[-1] else "")
        ratio = f"{best['n'] / bare['n']:.2f}" if best and bare and name != "mitmdump" else "–"
        out.append(f"| {names[name]} | {carried} | {'–' if best is None else f'{best.get('rss_per_stream_kb', 0):.0f}'} | {ratio} |")
    if soaks:
        out += ["", f"### Soak: {cfg.soak_rounds} rounds of {cfg.soak_streams} concurrent streams of "
                f"{cfg.soak_events} events in one process", "",
                "| set-up | RSS MB before, then after each round | growth MB | lost streams |", "|---|---|---|---|"]
        for name, s in soaks.items():
            out.append(f"| {names[name]} | {' → '.join(f'{x:.0f}' for x in s['rss'])} | {s['rss'][-1] - s['rss'][0]:.0f} | {s['lost']} |")
    return out
