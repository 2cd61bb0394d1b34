"""A fast fake Anthropic upstream on asyncio, the load source the benchmarked proxies forward to.

`tests/fakes/upstream.py`'s FakeUpstream is the oracle of the end-to-end tests: a thread per connection
and an answer built from scratch per request. Behind a proxy it would share the CPU with the proxy
being measured, so the benchmark feeds the proxies from this server instead: one event loop, answers
built once per (model, scenario) and then written as bytes. It reads the same `x-fake-scenario` header
(the fields `delay`, `event_delay`, `burst`, `stream_bytes`, `chunk_size`, `stream`), and answers with
the same bytes FakeUpstream would (built by FakeUpstream's own functions), each SSE event in a chunk
of its own as FakeUpstream writes them. The benchmark measures both directly.

    python -m bench.source --port 0     prints "listening on http://127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import itertools
import json
import signal
import sys
from typing import Any

from fakes.upstream import (
    SCENARIO_HEADER,
    Scenario,
    _dumps,
    _message_delta,
    _message_start,
    _pattern_text,
    build_message,
    message_to_events,
    sse_frame,
)

DRAIN_EVERY = 64 * 1024  # bytes written between two waits for the socket to drain
MESSAGE_ID = f"msg_011Fake{1:015d}"  # the shape FakeUpstream gives its ids


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Answers:
    """Answers built once per (model, scenario, stream) and kept as bytes."""

    def __init__(self) -> None:
        self.cache: dict[tuple, Any] = {}
        self.ids = itertools.count(1)

    def message(self, spec: Scenario, body: Any) -> dict:
        msg = build_message(spec, body, MESSAGE_ID)
        if spec.burst is not None:  # as FakeUpstream: one word per delta, "w0", " w1", …
            msg["content"] = [{"type": "text", "text": "w0" + "".join(f" w{i}" for i in range(1, spec.burst))}]
            msg["usage"]["output_tokens"] = spec.burst
        return msg

    def json_body(self, key: tuple, spec: Scenario, body: Any) -> bytes:
        if key not in self.cache:
            self.cache[key] = _dumps(self.message(spec, body)).encode()
        return self.cache[key]

    def events(self, key: tuple, spec: Scenario, body: Any) -> list[bytes]:
        """The chunked frames of a stream, one chunk per event."""
        if key not in self.cache:
            if spec.burst is not None:
                spec = Scenario(**{**spec.__dict__, "chunk_size": None})
            msg = self.message(spec, body)
            self.cache[key] = [chunk(sse_frame(name, data)) for name, data in message_to_events(msg, spec)]
        return self.cache[key]

    def sized(self, key: tuple, spec: Scenario, body: Any, stream: bool) -> tuple[bytes, list[bytes], int, bytes]:
        """A body of about `stream_bytes` bytes, as FakeUpstream's `_send_sized` makes it:
        (head chunk, the repeating middle chunks, how many middle chunks, tail chunk)."""
        if key not in self.cache:
            total = int(spec.stream_bytes or 0)
            piece = max(16, spec.chunk_size or 1024)
            msg = build_message(spec, body, MESSAGE_ID)
            msg["content"] = [{"type": "text", "text": ""}]
            period = 92  # len(fakes.upstream._PATTERN): the text repeats with this period
            if stream:
                overhead = len(sse_frame("content_block_delta", {
                    "type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ""}}))
                n = max(1, (total - 1500) // (piece + overhead))
                msg["usage"]["output_tokens"] = n
                head = b"".join(chunk(sse_frame(*e)) for e in [
                    ("message_start", _message_start(msg)), ("ping", {"type": "ping"}),
                    ("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}})])
                middle = [chunk(sse_frame("content_block_delta", {
                    "type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": _pattern_text(piece, i * piece)}})) for i in range(period)]
                tail = b"".join(chunk(sse_frame(*e)) for e in [
                    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                    ("message_delta", _message_delta(msg, spec.delta_usage)),
                    ("message_stop", {"type": "message_stop"})])
            else:
                n = max(1, (total - 600) // piece)
                msg["usage"]["output_tokens"] = n
                marker = "\x00TEXT\x00"
                msg["content"][0]["text"] = marker
                prefix, suffix = _dumps(msg).split(_dumps(marker)[1:-1], 1)
                head, tail = chunk(prefix.encode()), chunk(suffix.encode())
                middle = [chunk(_pattern_text(piece, i * piece).encode()) for i in range(period)]
            self.cache[key] = (head, middle, n, tail)
        return self.cache[key]


class Source:
    def __init__(self) -> None:
        self.answers = Answers()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                n = int(headers.get("content-length") or 0)
                body = await reader.readexactly(n) if n else b""
                close = headers.get("connection", "").lower() == "close"
                await self.answer(lines[0], headers, body, writer, close)
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def answer(self, request_line: str, headers: dict, body: bytes, writer: asyncio.StreamWriter,
                     close: bool) -> None:
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        scenario = headers.get(SCENARIO_HEADER)
        spec = Scenario.from_dict(json.loads(scenario)) if scenario else Scenario()
        if spec.delay:
            await asyncio.sleep(spec.delay)
        wants = isinstance(parsed, dict) and parsed.get("stream") is True
        stream = wants if spec.stream is None else spec.stream
        model = parsed.get("model") if isinstance(parsed, dict) else None
        key = (model, scenario, stream)
        extra = b"Connection: close\r\n" if close else b""
        head = (b"HTTP/1.1 200 OK\r\nServer: fake-anthropic/1.0\r\nDate: %b\r\nrequest-id: req_011Fake%015d\r\n%b"
                % (email.utils.formatdate(usegmt=True).encode(), next(self.answers.ids), extra))
        if spec.stream_bytes is not None:
            first, middle, count, last = self.answers.sized(key, spec, parsed, stream)
            ctype = b"text/event-stream; charset=utf-8\r\nCache-Control: no-cache" if stream else b"application/json"
            writer.write(head + b"Content-Type: %b\r\nTransfer-Encoding: chunked\r\n\r\n" % ctype + first)
            period, written = len(middle), 0
            for i in range(count):
                data = middle[i % period]  # the i-th piece of text starts at i * piece, modulo the period
                writer.write(data)
                written += len(data)
                if written >= DRAIN_EVERY:
                    written = 0
                    await writer.drain()
            writer.write(last + b"0\r\n\r\n")
            await writer.drain()
        elif stream:
            frames = self.answers.events(key, spec, parsed)
            writer.write(head + b"Content-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n"
                         b"Cache-Control: no-cache\r\n\r\n")
            written = 0
            start = asyncio.get_running_loop().time()
            for i, frame in enumerate(frames):
                if i and spec.event_delay:  # on a fixed schedule: a late event does not delay the next ones
                    await writer.drain()
                    await asyncio.sleep(max(0.0, start + i * spec.event_delay - asyncio.get_running_loop().time()))
                writer.write(frame)
                written += len(frame)
                if written >= DRAIN_EVERY:
                    written = 0
                    await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        else:
            data = self.answers.json_body(key, spec, parsed)
            writer.write(head + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(data), data))
            await writer.drain()


async def serve(port: int) -> None:
    source = Source()
    server = await asyncio.start_server(source.handle, "127.0.0.1", port, backlog=512)
    print(f"listening on http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
