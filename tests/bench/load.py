"""A small HTTP/1.1 load generator on asyncio streams: keep-alive connections, no dependencies.

It speaks just enough HTTP for the benchmark (Content-Length and chunked bodies, `Connection: close`)
and watches SSE bodies as they arrive without keeping them: it counts events (each ends with a blank
line, and the API's JSON never holds a raw newline) and notes when the first one completed. Every
answer is checked (status, and for streams a final `message_stop`), so a set-up that fails fast can
never pass for a fast one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

READ_LIMIT = 1 << 20  # asyncio's readuntil() limit: header blocks and chunk-size lines are far smaller


class BenchError(Exception):
    """A request failed or got a wrong answer: the measurement is void."""


@dataclass
class Target:
    """Where a set-up listens and what it needs on every request."""

    name: str
    host: str
    port: int
    path: str = "/v1/messages"
    headers: dict[str, str] = field(default_factory=dict)

    def request(self, body: bytes, headers: dict[str, str] | None = None) -> bytes:
        """The complete request bytes, built once per workload and sent as they are."""
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Content-Type: application/json",
                 "Accept: application/json, text/event-stream", f"Content-Length: {len(body)}"]
        for name, value in {**self.headers, **(headers or {})}.items():
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Answer:
    status: int
    started: float  # perf_counter when the request was written
    headers_at: float  # when the status line and headers had arrived
    first_event_at: float | None  # when the first complete SSE event had arrived (streams only)
    done_at: float
    events: int  # complete SSE events seen (streams only)
    size: int  # body bytes after de-chunking
    body: bytes  # the whole body when `keep`, else its first and last bytes
    content_type: str

    @property
    def latency(self) -> float:
        return self.done_at - self.started

    @property
    def ttfe(self) -> float | None:
        return None if self.first_event_at is None else self.first_event_at - self.started


class Connection:
    """One keep-alive connection; reconnects when the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=READ_LIMIT)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def send(self, request: bytes, *, keep: bool = True, tail: int = 256) -> Answer:
        if self.writer is None:
            await self.open()
        started = time.perf_counter()
        self.writer.write(request)
        reader = self.reader
        head = await reader.readuntil(b"\r\n\r\n")
        headers_at = time.perf_counter()
        status, headers = _parse_head(head)
        ctype = headers.get("content-type", "")
        sse = ctype.startswith("text/event-stream")
        parts: list[bytes] = []
        size = events = 0
        first_event_at = None
        last = b""  # the last byte seen, for a blank line split across two reads
        first = b""
        kept = bytearray()

        def take(data: bytes) -> None:
            nonlocal size, events, first_event_at, last, first
            size += len(data)
            if sse:
                n = data.count(b"\n\n") + (last == b"\n" and data[:1] == b"\n")
                if n and first_event_at is None:
                    first_event_at = time.perf_counter()
                events += n
                last = data[-1:]
            if keep:
                parts.append(data)
            else:
                if len(first) < tail:
                    first += data[: tail - len(first)]
                kept.extend(data)
                if len(kept) > 4 * tail:
                    del kept[:-tail]

        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                line = await reader.readuntil(b"\r\n")
                n = int(line.split(b";", 1)[0], 16)
                if n == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                        pass
                    break
                chunk = await reader.readexactly(n + 2)
                take(chunk[:-2])
        elif "content-length" in headers:
            n = int(headers["content-length"])
            if n:
                take(await reader.readexactly(n))
        else:  # read to the end of the connection
            while data := await reader.read(1 << 16):
                take(data)
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        done_at = time.perf_counter()
        body = b"".join(parts) if keep else first + b"\n...\n" + bytes(kept[-tail:])
        return Answer(status, started, headers_at, first_event_at, done_at, events, size, body, ctype)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise BenchError(f"not an HTTP response: {lines[0]!r}") from None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return status, headers


def check(answer: Answer, *, stream: bool, what: str) -> Answer:
    """Raise BenchError unless the answer is a complete 200 Message (JSON) or stream (SSE)."""
    if answer.status != 200:
        raise BenchError(f"{what}: HTTP {answer.status}: {answer.body[:300]!r}")
    if stream:
        if not answer.content_type.startswith("text/event-stream") or b"message_stop" not in answer.body[-200:]:
            raise BenchError(f"{what}: not a complete event stream ({answer.content_type}): …{answer.body[-200:]!r}")
    elif not answer.content_type.startswith("application/json") or b'"type":"message"' not in answer.body[:200].replace(b" ", b""):
        raise BenchError(f"{what}: not a Message ({answer.content_type}): {answer.body[:300]!r}")
    return answer


async def closed_loop(
    target: Target, request: bytes, *, connections: int, seconds: float, warmup: int, stream: bool,
    timeout: float, meter: Callable[[], float] = lambda: 0.0,
) -> tuple[list[float], float, float]:
    """`connections` clients sending back to back for `seconds`: (latencies, elapsed seconds, meter delta).

    Each connection first sends `warmup` requests that are not counted. `meter` (e.g. a process's CPU
    time) is read when the timed window starts and when it ends.
    """
    conns = [Connection(target.host, target.port) for _ in range(connections)]
    latencies: list[float] = []

    async def warm(conn: Connection) -> None:
        for _ in range(warmup):
            check(await conn.send(request), stream=stream, what=target.name)

    async def run(conn: Connection, deadline: float) -> None:
        while time.perf_counter() < deadline:
            answer = check(await conn.send(request), stream=stream, what=target.name)
            latencies.append(answer.latency)

    try:
        await asyncio.wait_for(asyncio.gather(*(warm(c) for c in conns)), timeout)
        metered = meter()
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(run(c, start + seconds) for c in conns)), seconds + timeout)
        elapsed = time.perf_counter() - start
        metered = meter() - metered
    except (asyncio.TimeoutError, TimeoutError):
        raise BenchError(f"{target.name}: no answer within {timeout}s") from None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        raise BenchError(f"{target.name}: {type(e).__name__}: {e}") from None
    finally:
        for c in conns:
            c.close()
    return latencies, elapsed, metered


async def one(target: Target, request: bytes, *, stream: bool, timeout: float, keep: bool = True,
              conn: Connection | None = None) -> Answer:
    """One request (on `conn`, or a fresh connection that is closed after)."""
    own = conn is None
    conn = conn or Connection(target.host, target.port)
    try:
        answer = await asyncio.wait_for(conn.send(request, keep=keep), timeout)
        return check(answer, stream=stream, what=target.name)
    except (asyncio.TimeoutError, TimeoutError):
        conn.close()
        raise BenchError(f"{target.name}: no complete answer within {timeout}s") from None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        conn.close()
        raise BenchError(f"{target.name}: {type(e).__name__}: {e}") from None
    finally:
        if own:
            conn.close()
