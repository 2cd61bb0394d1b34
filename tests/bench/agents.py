"""Agent-shaped traffic: sessions of growing Claude Code-like requests, several at once (`agents` workload).

Claude Code's requests are 60–300 kB and grow every turn. The shape here follows a live Claude Code request
(/work/shared/reference/clients.md: its headers; docs/benchmarks.md: sizes): `system` as two text blocks (the
one-line identity, then a prompt of about 14 kB), both with `cache_control`; 22 tools with JSON schemas (about
36 kB: Claude Code's built-in tools and a few MCP ones); the first user message with `<system-reminder>` blocks
(CLAUDE.md, about 5 kB) and the task; then per turn an assistant message (text and a `tool_use`) and a user
message whose `tool_result` holds a file (3–11 kB, sometimes as a list of text blocks), the last block of the
last message carrying `cache_control` (Claude Code moves it every turn). The first request is about 62 kB and a
30-turn session ends near 290 kB. Answers are streamed: a short text and the usage of a cache that grows
(`cache_read_input_tokens` = the previous turn's prompt), so the gateway's cache watch, pricing, records and
metrics all work on every request.

Figures, per set-up in one round:
- phase 1, the sessions alone: `sessions` sessions of `turns` requests each, each session on its own
  keep-alive connection, turn after turn: proxy CPU per request, p50 and p99 latency (added latency: the
  difference to bare mitmdump's in the same round);
- phase 2, the same sessions again while a paced stream (one event every `interval` seconds) runs beside them
  on its own connection: the p99 lateness of that stream's events (bench/scale.py's `paced_stream`), which is
  how long the other sessions' large requests held the proxy's event loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time
import uuid
from dataclasses import dataclass

from bench import scale
from bench.load import BenchError, Connection, Target, check

MODEL = "claude-sonnet-4-5-20250929"
USER_AGENT = "claude-cli/2.1.197 (external, sdk-cli)"
BETA = "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14"
# the streamed answer: a short text in 24-character deltas (about 40 events), usage filled per request below
ANSWER_TEXT = "I have read the file and will now make the change the task asks for, then run the tests. " * 8

_WORDS = ("the file function return value test module import class error path line config request session "
          "cache token stream event handler client server response status header body parse write read").split()


def _text(rng: random.Random, size: int) -> str:
    """About `size` characters of code-like text (lines of words), reproducible from `rng`."""
    lines, n = [], 0
    while n < size:
        line = "    " * rng.randrange(4) + " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(4, 12)))
        lines.append(line)
        n += len(line) + 1
    return "\n".join(lines)[:size]


def _tool(rng: random.Random, name: str, description: int, properties: int) -> dict:
    return {
        "name": name,
        "description": _text(rng, description),
        "input_schema": {
            "type": "object",
            "properties": {f"{name.lower()}_arg{i}": {"type": rng.choice(("string", "number", "boolean")),
                                                      "description": _text(rng, 120)} for i in range(properties)},
            "required": [f"{name.lower()}_arg0"],
            "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#",
        },
    }


TOOLS = ("Task", "Bash", "Glob", "Grep", "ExitPlanMode", "Read", "Edit", "MultiEdit", "Write", "NotebookEdit",
         "WebFetch", "TodoWrite", "WebSearch", "BashOutput", "KillShell", "SlashCommand",
         "mcp__ide__getDiagnostics", "mcp__ide__executeCode", "mcp__github__search_code",
         "mcp__github__get_file", "mcp__github__create_issue", "mcp__github__list_pulls")


@functools.lru_cache(maxsize=8)
def _common(seed: int) -> tuple[list, list]:
    """(system, tools), as every request of every session sends them (one Claude Code version)."""
    rng = random.Random(seed)
    system = [
        {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
         "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": _text(rng, 14_000), "cache_control": {"type": "ephemeral"}},
    ]
    tools = [_tool(rng, name, rng.randrange(400, 2600), rng.randrange(1, 5)) for name in TOOLS]
    return system, tools


def session_bodies(session: int, turns: int, seed: int = 28) -> list[bytes]:
    """The `turns` request bodies of one session, each the previous one plus a turn (answer and tool result)."""
    rng = random.Random(seed * 1000 + session)
    system, tools = _common(seed)
    session_id = str(uuid.UUID(int=rng.getrandbits(128)))
    user_id = json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": session_id})
    messages: list[dict] = [{"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>\nAs you answer the user's questions, you can use the following "
                                 "context:\n# claudeMd\n" + _text(rng, 5_000) + "\n</system-reminder>"},
        {"type": "text", "text": f"Session {session}: fix the failing tests in the parser module and explain why."},
    ]}]
    bodies = []
    for turn in range(turns):
        if turn:
            tool_id = f"toolu_01{session:04d}{turn:06d}"
            messages.append({"role": "assistant", "content": [
                {"type": "text", "text": _text(rng, rng.randrange(150, 600))},
                {"type": "tool_use", "id": tool_id, "name": rng.choice(("Read", "Grep", "Bash", "Edit")),
                 "input": {"file_path": f"/repo/src/module_{turn}.py", "limit": 2000}},
            ]})
            size = rng.randrange(3_000, 11_000)
            content = _text(rng, size) if turn % 3 else [{"type": "text", "text": _text(rng, size // 2)},
                                                          {"type": "text", "text": _text(rng, size // 2)}]
            messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id,
                                                          "content": content}]})
        last = messages[-1]["content"][-1]
        last["cache_control"] = {"type": "ephemeral"}  # Claude Code's moving breakpoint on the last block
        body = {"model": MODEL, "max_tokens": 32000, "stream": True, "metadata": {"user_id": user_id},
                "system": system, "tools": tools, "messages": messages, "temperature": 1}
        bodies.append(json.dumps(body, separators=(",", ":")).encode())
        del last["cache_control"]
    return bodies


def headers(body: bytes, previous: int) -> dict[str, str]:
    """Claude Code's headers, and the scenario: a cache read of the previous prompt, the rest written."""
    data = json.loads(body)
    session = json.loads(data["metadata"]["user_id"])["session_id"]
    tokens = len(body) // 4  # about four bytes a token
    usage = {"input_tokens": 3, "cache_read_input_tokens": previous, "cache_creation_input_tokens": tokens - previous,
             "output_tokens": 60}
    scenario = {"text": ANSWER_TEXT, "chunk_size": 24, "usage": usage}
    return {"User-Agent": USER_AGENT, "x-app": "cli", "X-Claude-Code-Session-Id": session, "anthropic-beta": BETA,
            "x-fake-scenario": json.dumps(scenario, separators=(",", ":"))}


@dataclass
class AgentConfig:
    sessions: int = 4
    turns: int = 30
    interval: float = 0.005  # seconds between the paced stream's events (phase 2)

    @classmethod
    def quick(cls) -> "AgentConfig":
        return cls(sessions=3, turns=12)


@functools.lru_cache(maxsize=4)
def _sessions(sessions: int, turns: int) -> tuple[tuple[bytes, ...], ...]:
    return tuple(tuple(session_bodies(s, turns)) for s in range(sessions))


def requests(target: Target, cfg: AgentConfig, run: int) -> list[list[bytes]]:
    """The request bytes of every session for `target`. `run` changes each session's id (the same bodies,
    another session id header): each run starts fresh sessions, as a warm cache watch would not see them."""
    out = []
    for bodies in _sessions(cfg.sessions, cfg.turns):
        prev, reqs = 0, []
        for body in bodies:
            h = headers(body, prev)
            h["X-Claude-Code-Session-Id"] += f"-{run}"
            reqs.append(target.request(body, h))
            prev = len(body) // 4
        out.append(reqs)
    return out


def sizes(cfg: AgentConfig) -> tuple[int, int]:
    """The smallest and the largest request body, in bytes."""
    bodies = [b for s in _sessions(cfg.sessions, cfg.turns) for b in s]
    return min(map(len, bodies)), max(map(len, bodies))


async def _session(target: Target, reqs: list[bytes], latencies: list[float], timeout: float) -> None:
    conn = Connection(target.host, target.port)
    try:
        for request in reqs:
            answer = check(await asyncio.wait_for(conn.send(request, keep=False), timeout), stream=True,
                           what=target.name)
            latencies.append(answer.latency)
    except (asyncio.TimeoutError, TimeoutError):
        raise BenchError(f"{target.name}: no answer within {timeout}s") from None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        raise BenchError(f"{target.name}: {type(e).__name__}: {e}") from None
    finally:
        conn.close()


_runs = iter(range(1, 1 << 30))


async def run(target: Target, cpu, cfg: AgentConfig, timeout: float, metered: bool) -> dict[str, float]:
    """Both phases through one set-up: {"cpu" (ms/request), "p50", "p99" (ms), "late99" (ms), "mb" (MB/s)}."""
    # warm-up: one session's first turns (connections, lazy imports), not counted
    await _session(target, requests(target, cfg, next(_runs))[0][:3], [], timeout)
    sessions = requests(target, cfg, next(_runs))
    latencies: list[float] = []
    before = cpu()
    start = time.perf_counter()
    await asyncio.gather(*(_session(target, reqs, latencies, timeout) for reqs in sessions))
    elapsed = time.perf_counter() - start
    used = cpu() - before
    latencies.sort()
    n = len(latencies)
    out = {"p50": latencies[n // 2] * 1000, "p99": latencies[min(n - 1, int(n * 0.99))] * 1000,
           "rps": n / elapsed}
    if metered:
        out["cpu"] = used / n * 1000
    # phase 2: a paced stream beside fresh sessions; it lasts as long as they do, about
    events = max(50, int(elapsed / cfg.interval))
    scenario = {"burst": events, "event_delay": cfg.interval}
    probe = target.request(json.dumps({"model": MODEL, "max_tokens": 100, "stream": True,
                                       "messages": [{"role": "user", "content": "watch"}]}).encode(),
                           {"x-fake-scenario": json.dumps(scenario, separators=(",", ":"))})
    sessions = requests(target, cfg, next(_runs))
    watcher = asyncio.create_task(scale.paced_stream(target, probe, cfg.interval, events, timeout))
    await asyncio.sleep(cfg.interval * 5)  # the stream is under way before the sessions start
    await asyncio.gather(*(_session(target, reqs, [], timeout) for reqs in sessions))
    watched = await watcher
    if not watched.ok:
        raise BenchError(f"{target.name}: paced stream: {watched.error}")
    out["late99"] = scale.percentile(watched.lateness, 0.99) * 1000
    return out


async def drive(target: Target, cfg: AgentConfig, seconds: float, timeout: float = 90.0) -> int:
    """Sets of fresh sessions, one after another, for about `seconds` (the profile's load): requests sent."""
    loop = asyncio.get_running_loop()
    end, sent = loop.time() + seconds, 0
    while loop.time() < end:
        sessions = requests(target, cfg, next(_runs))
        await asyncio.gather(*(_session(target, reqs, [], timeout) for reqs in sessions))
        sent += sum(map(len, sessions))
    return sent


async def in_process(cfg: AgentConfig) -> dict[str, float]:
    """The cache watch alone on the same sessions, in this process: {"fp_ms": ms to parse and fingerprint one
    request, on average; "watch_kb": KB the watch keeps per session after its last turn (policy/cachewatch.py's
    own `footprint`, which its MAX_BYTES cap counts)}."""
    from llm_gateway.policy.cachewatch import CacheWatch, fingerprint
    from llm_gateway.protocol.jsoncodec import parse_json_body

    sessions = _sessions(cfg.sessions, cfg.turns)
    bodies = [b for s in sessions for b in s]
    started = time.process_time()
    for body in bodies:
        fingerprint(parse_json_body(body, exact=False))
    spent = time.process_time() - started
    watch = CacheWatch()
    for n, s in enumerate(sessions):
        prev = 0
        for body in s:
            usage = {"input_tokens": 3, "cache_read_input_tokens": prev,
                     "cache_creation_input_tokens": len(body) // 4 - prev, "output_tokens": 60}
            watch.observe(f"session-{n}", usage, parse_json_body(body, exact=False), time.time())
            prev = len(body) // 4
    return {"fp_ms": spent / len(bodies) * 1000, "watch_kb": watch.size / len(sessions) / 1024}
