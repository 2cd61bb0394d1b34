"""Incremental decoders for `Content-Encoding`, so a compressed stream can be read while it passes, and a
compressed body is never decoded past a bound.

mitmproxy hands a stream callable the body still encoded; buffering it to decode would defeat
streaming, so each chunk is decoded as it arrives. mitmproxy's own `get_content()` decodes a whole body with
no bound: a 728-byte brotli body expands to gigabytes. Every decoder here takes `limit` (bytes of decoded
output) and raises `TooLarge` as soon as its output crosses it, having produced at most `STEP` bytes more:
zlib's `max_length`, brotli's `output_buffer_limit` (brotli >= 1.2) and a zstd stream writer whose sink counts.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import brotli
import zstandard

STEP = 256 * 1024  # bytes of output produced per step, between two checks of the bound


class TooLarge(ValueError):
    """The decoded body crossed `limit` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"decoded body over {limit} bytes")
        self.limit = limit


class Decoder(Protocol):
    def decode(self, chunk: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class _Bounded:
    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.produced = 0  # bytes of decoded output so far
        self.keep = True  # False: output is only counted (a measuring pass), never returned

    def _count(self, out: bytes) -> bytes:
        self.produced += len(out)
        if self.limit is not None and self.produced > self.limit:
            raise TooLarge(self.limit)
        return out if self.keep else b""


class _Zlib(_Bounded):
    def __init__(self, wbits: int, limit: int | None = None) -> None:
        super().__init__(limit)
        self._d = zlib.decompressobj(wbits)
        self._wbits = wbits
        self._started = False

    def decode(self, chunk: bytes) -> bytes:
        if not self._started and self._wbits == zlib.MAX_WBITS and chunk:
            self._started = True
            # "deflate" is meant to be zlib-wrapped, but some servers send raw deflate.
            try:
                return self._run(chunk)
            except zlib.error:
                self._d = zlib.decompressobj(-zlib.MAX_WBITS)
                self.produced = 0
        return self._run(chunk)

    def _run(self, chunk: bytes) -> bytes:
        parts = [self._count(self._d.decompress(chunk, STEP))]
        while self._d.unconsumed_tail:
            parts.append(self._count(self._d.decompress(self._d.unconsumed_tail, STEP)))
        return b"".join(parts)

    def flush(self) -> bytes:
        return self._count(self._d.flush())


class _Brotli(_Bounded):
    def __init__(self, limit: int | None = None) -> None:
        super().__init__(limit)
        self._d = brotli.Decompressor()

    def decode(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        parts = [self._count(self._d.process(chunk, output_buffer_limit=STEP))]
        while not self._d.is_finished():  # more output may be waiting: drained a step at a time (brotli 1.2's
            out = self._d.process(b"", output_buffer_limit=STEP)  # can_accept_more_data() can say True before)
            if not out:
                break
            parts.append(self._count(out))
        return b"".join(parts)

    def flush(self) -> bytes:
        return b""


class _Sink:
    """Where the zstd stream writer puts its output, `STEP` bytes at a time at most."""

    def __init__(self, owner: _Zstd) -> None:
        self.owner = owner
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(self.owner._count(bytes(data)))
        return len(data)


class _Zstd(_Bounded):
    def __init__(self, limit: int | None = None) -> None:
        super().__init__(limit)
        self._sink = _Sink(self)
        self._w = zstandard.ZstdDecompressor().stream_writer(self._sink, write_size=STEP, closefd=False)

    def decode(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        self._w.write(chunk)
        out, self._sink.parts = b"".join(self._sink.parts), []
        return out

    def flush(self) -> bytes:
        return b""


def decoder_for(content_encoding: str | None, limit: int | None = None) -> Decoder | None:
    """A decoder for the header's value, bounded to `limit` decoded bytes (None: unbounded); None for identity.
    Raises ValueError for what it cannot decode."""
    enc = (content_encoding or "").strip().lower()
    if enc in ("", "identity", "none"):
        return None
    if enc in ("gzip", "x-gzip"):
        return _Zlib(16 + zlib.MAX_WBITS, limit)
    if enc == "deflate":
        return _Zlib(zlib.MAX_WBITS, limit)
    if enc == "br":
        return _Brotli(limit)
    if enc == "zstd":
        return _Zstd(limit)
    raise ValueError(f"unsupported content-encoding {content_encoding!r}")


def decode(content: bytes, content_encoding: str | None, limit: int) -> bytes:
    """A whole body decoded, never past `limit` bytes (`TooLarge`). What it cannot decode (an unknown
    encoding, corrupt data) comes back as it is, as mitmproxy's `get_content(strict=False)` gives it."""
    try:
        if decoder_for(content_encoding) is None:
            return content
        # First only measured, `STEP` bytes at a time: a body that crosses the limit is refused having cost no
        # more memory than a step (bare mitmproxy holds only its compressed bytes); then decoded to keep.
        counter = decoder_for(content_encoding, limit)
        counter.keep = False
        counter.decode(content)
        counter.flush()
        decoder = decoder_for(content_encoding, limit)
        return decoder.decode(content) + decoder.flush()
    except TooLarge:
        raise
    except (ValueError, zlib.error, brotli.error, zstandard.ZstdError):
        return content
