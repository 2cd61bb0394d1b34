"""Where a proxy's CPU goes under one of the bench's workloads: `scripts/bench --profile`.

Starts the bench's source and the gateway (or bare mitmdump) as `scripts/bench` does, attaches py-spy
(a sampling profiler, from the test extra) to the proxy process while the load generator runs the
workload, and prints the functions that hold the most samples: "self" (the function itself was on top
of the stack) and "total" (it was anywhere on the stack), as shares of all samples of the proxy.

    scripts/bench --profile messages-16              # the gateway, 16 connections of non-streaming Messages
    scripts/bench --profile burst --profile-target mitmdump
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

from bench import agents, procs
from bench.load import Target, closed_loop, one

PY_SPY = shutil.which("py-spy", path=str(procs.BIN)) or shutil.which("py-spy")


def collapse(raw: str) -> tuple[int, collections.Counter, collections.Counter]:
    """(samples, self counts, total counts) from py-spy's raw format: `frame;frame;… count` lines."""
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    return samples, own, total


def _short(frame: str) -> str:
    """`function (path/to/module.py:line)` -> `function (module.py)`: lines differ within one function."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if "site-packages" in parts or "llm_gateway" in parts else Path(path).name
    return f"{name} ({short})"


def table(raw: str, top: int = 30) -> str:
    samples, own, total = collapse(raw)
    if not samples:
        return "no samples"
    lines = [f"{samples} samples", "", "| self % | total % | function |", "|---|---|---|"]
    for frame, n in total.most_common(top):
        lines.append(f"| {own[frame] * 100 / samples:.1f} | {n * 100 / samples:.1f} | `{frame}` |")
    lines += ["", "| self % | function (most self time) |", "|---|---|"]
    for frame, n in own.most_common(top):
        lines.append(f"| {n * 100 / samples:.1f} | `{frame}` |")
    return "\n".join(lines)


async def drive(workload: str, target: Target, request: bytes, seconds: float) -> None:
    if workload == "agents":  # Claude Code-like sessions (bench/agents.py); `request` is not used
        await agents.drive(target, agents.AgentConfig(), seconds)
    elif workload.startswith("messages-"):
        await closed_loop(target, request, connections=int(workload.split("-")[1]), seconds=seconds, warmup=3,
                          stream=False, timeout=90)
    else:  # burst: one stream after another
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            await one(target, request, stream=True, timeout=90, keep=False)


def main(workload: str, target_name: str, seconds: float, rules: str, request_for, raw_out: str | None = None) -> int:
    if PY_SPY is None:
        print("py-spy is not installed (it is in the test extra: scripts/bench installs it)", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        source = procs.source().start()
        stack.callback(shutil.rmtree, source.dir, ignore_errors=True)
        stack.callback(source.stop)
        url = f"http://127.0.0.1:{source.port}"
        if target_name == "mitmdump":
            options = ("--set", "stream_large_bodies=1") if workload in ("burst", "agents") else ()
            proxy = procs.BareMitmdump(url, options).start()
        else:
            proxy = procs.Gateway(rules(url), reverse_to=url).start()
        stack.callback(shutil.rmtree, proxy.dir, ignore_errors=True)  # its confdir, logs and the raw profile
        stack.callback(proxy.stop)
        target = Target(target_name, "127.0.0.1", proxy.reverse_port,
                        headers={"User-Agent": "bench/1.0", "x-api-key": "sk-ant-bench-0000"})
        request = request_for(target, workload)
        asyncio.run(drive(workload, target, request, 2.0))  # warm up: imports, connections
        out = proxy.dir / "profile.txt"
        spy = subprocess.Popen([PY_SPY, "record", "--pid", str(proxy.proc.pid), "--rate", "250", "--format", "raw",
                                "--output", str(out), "--duration", str(int(seconds)), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        asyncio.run(drive(workload, target, request, seconds + 1))
        _, err = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0 or not out.exists():
            print(f"py-spy failed: {err.decode(errors='replace')[-2000:]}", file=sys.stderr)
            return 1
        if raw_out:
            shutil.copyfile(out, raw_out)
        print(f"### {target_name}, {workload}, {seconds:.0f} s\n")
        print(table(out.read_text()))
    return 0
