"""Load, end to end: at least 200 concurrent streaming exchanges through one mitmdump with every feature on
(the default client rules, stream conversion, gzip decoding, error unwrapping, usage records, the mitmweb
stream copy), while the rule file is rewritten again and again.

Checked: every exchange completes within its deadline and its client gets the whole stream; the usage
log holds exactly one whole JSON line per exchange and nothing else; the gateway's memory stays bounded;
and every exchange ran under exactly one version of the rules (client name, upstream and upstream stream
flag all from the same version, and the request really reached that version's upstream).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import yaml

from conftest import DEFAULT_RULES, routed_rules
from fakes.upstream import FakeUpstream, Scenario
from harness import Gateway

pytestmark = pytest.mark.e2e

CONCURRENCY = 200
DURATION = 15.0  # seconds of load; each worker also stops after MAX_PER_WORKER exchanges
MAX_PER_WORKER = 12
DEADLINE = 30.0  # per exchange
RELOAD_EVERY = 0.7
WORDS = 20
RSS_GROWTH_LIMIT_MB = 150  # generous: measured growth is reported by the test

DEFAULT_CLIENTS = yaml.safe_load(DEFAULT_RULES.read_text())["clients"]


def version(name: str, fake_url: str, stream: str) -> str:
    """One version of the rules: the load client's name, its stream preference and its upstream."""
    clients = [{"name": name, "headers": ["x-load-client"], "stream": stream}, *DEFAULT_CLIENTS]
    return routed_rules(fake_url, clients=clients)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def exchange(port: int, session: str, gzip: bool) -> tuple[int, bytes]:
    """One streaming Messages exchange on a raw socket (HTTP/1.1, chunked or not); (status, body)."""
    body = json.dumps({"model": "claude-load-1", "max_tokens": 64, "stream": True,
                       "messages": [{"role": "user", "content": f"load {session}"}]}).encode()
    scenario = Scenario(burst=WORDS, event_delay=0.02, gzip=gzip).to_header()
    head = (
        "POST /v1/messages HTTP/1.1\r\nhost: api.anthropic.com\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nx-api-key: sk-ant-load-test\r\nx-load-client: 1\r\n"
        f"x-session-id: {session}\r\nx-fake-scenario: {scenario}\r\nconnection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            parts = []
            while size := int((await reader.readline()).split(b";")[0], 16):
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            data = b"".join(parts)
        elif "content-length" in headers:
            data = await reader.readexactly(int(headers["content-length"]))
        else:
            data = await reader.read()
        assert "content-encoding" not in headers  # the relay decoded gzip and forwards identity
        return status, data
    finally:
        writer.close()


async def load(gw: Gateway, versions: list[str]) -> dict:
    """CONCURRENCY workers, each running exchanges one after the other; the rule file is rewritten,
    alternating the versions, every RELOAD_EVERY seconds while they run."""
    results: dict[str, tuple[int, bytes] | str] = {}
    in_flight = peak = 0
    stop_at = time.monotonic() + DURATION
    rewrites = 0
    rss_peak = 0.0

    async def worker(w: int) -> None:
        nonlocal in_flight, peak
        for n in range(MAX_PER_WORKER):
            if n and time.monotonic() > stop_at:
                return
            session = f"load-{w:03d}-{n:02d}"
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                results[session] = await asyncio.wait_for(exchange(gw.reverse_port, session, gzip=bool(w % 2)), DEADLINE)
            except Exception as e:  # noqa: BLE001 - recorded and asserted on below
                results[session] = f"{type(e).__name__}: {e}"
            finally:
                in_flight -= 1

    async def reloader() -> None:
        nonlocal rewrites, rss_peak
        while time.monotonic() < stop_at:
            await asyncio.sleep(RELOAD_EVERY)
            rewrites += 1
            gw.write_rules(versions[rewrites % 2])
            rss_peak = max(rss_peak, rss_mb(gw.proc.pid))

    started = time.monotonic()
    await asyncio.gather(reloader(), *(worker(w) for w in range(CONCURRENCY)))
    return {"results": results, "peak": peak, "rewrites": rewrites, "seconds": time.monotonic() - started,
            "rss_peak": rss_peak}


async def warm_up(gw: Gateway) -> list[tuple[int, bytes]]:
    jobs = (exchange(gw.reverse_port, f"warm-{i}", gzip=bool(i % 2)) for i in range(20))
    return await asyncio.wait_for(asyncio.gather(*jobs), 60)


def test_200_concurrent_streams_with_reloads(tmp_path):
    with FakeUpstream() as fake_a, FakeUpstream() as fake_b:
        versions = [version("load-a", fake_a.url, "as-sent"), version("load-b", fake_b.url, "off")]
        expected = {  # client -> (upstream, stream flag sent upstream)
            "load-a": (fake_a.url, True),
            "load-b": (fake_b.url, False),
        }
        with Gateway(versions[0], regular=False) as gw:
            # Warm up (imports, first TLS-free connections) before the baseline.
            warm = asyncio.run(warm_up(gw))
            assert all(status == 200 for status, _ in warm)
            gw.records(count=20, timeout=10)
            rss_before = rss_mb(gw.proc.pid)
            run = asyncio.run(load(gw, versions))
            time.sleep(1.0)  # the last records
            rss_after = rss_mb(gw.proc.pid)

            results = run["results"]
            failures = {s: r for s, r in results.items() if not isinstance(r, tuple) or r[0] != 200}
            assert not failures, list(failures.items())[:5]
            assert run["peak"] >= CONCURRENCY
            for session, (_status, body) in results.items():
                assert body.rstrip().endswith(b'data: {"type":"message_stop"}'), (session, body[-200:])
                text = "".join(
                    json.loads(line[6:])["delta"]["text"]
                    for line in body.decode().splitlines()
                    if line.startswith("data: ") and '"text_delta"' in line
                )
                assert text == " ".join(f"w{i}" for i in range(WORDS)), (session, text)

            # Every line one whole record: no corrupted or interleaved lines, one per exchange.
            lines = gw.usage_log.read_bytes().split(b"\n")
            assert lines[-1] == b""
            records = [json.loads(line) for line in lines[:-1]]
            assert all(r["kind"] == "usage" for r in records)
            loaded = [r for r in records if r["session"].startswith("load-")]
            assert sorted(r["session"] for r in loaded) == sorted(results), "exactly one record per exchange"

            # One rules version per exchange, never a mix.
            reached = {
                fake_a.url: {r.headers.get("x-session-id") for r in fake_a.requests},
                fake_b.url: {r.headers.get("x-session-id") for r in fake_b.requests},
            }
            seen_versions = set()
            for r in loaded:
                assert r["client"] in expected, r
                upstream, stream_upstream = expected[r["client"]]
                assert (r["upstream"], r["stream_upstream"]) == (upstream, stream_upstream), r
                assert r["session"] in reached[upstream], f"{r['session']} did not reach {upstream}"
                assert r["complete"] is True and r["status"] == 200 and r["stream_requested"] is True
                assert (r["input_tokens"], r["output_tokens"], r["cache_read_input_tokens"]) == (21, WORDS, 13), r
                assert r["converted"] == (None if stream_upstream else "json->sse")
                seen_versions.add(r["client"])
            assert seen_versions == set(expected), "the load did not run under both versions"
            reloads = gw.output().count("rules reloaded")
            assert reloads >= 5, f"only {reloads} reloads"

            growth = rss_after - rss_before
            summary = (
                f"load: {len(results)} streaming exchanges, peak concurrency {run['peak']}, "
                f"{run['seconds']:.1f}s, {len(records)} records ({len(loaded)} under load), "
                f"{run['rewrites']} rule rewrites, {reloads} reloads; VmRSS before {rss_before:.0f} MB, "
                f"peak {run['rss_peak']:.0f} MB, after {rss_after:.0f} MB (+{growth:.0f} MB)"
            )
            print(summary)
            assert growth < RSS_GROWTH_LIMIT_MB, summary
            out = gw.output()
            assert gw.proc.poll() is None and "Traceback" not in out and "mitmproxy has crashed" not in out
