"""Incremental decoders for `Content-Encoding`, so a compressed stream can be read while it passes.

mitmproxy hands a stream callable the body still encoded; buffering it to decode would defeat
streaming, so each chunk is decoded as it arrives.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import brotli
import zstandard


class Decoder(Protocol):
    def decode(self, chunk: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class _Zlib:
    def __init__(self, wbits: int) -> None:
        self._d = zlib.decompressobj(wbits)
        self._wbits = wbits
        self._started = False

    def decode(self, chunk: bytes) -> bytes:
        if not self._started and self._wbits == zlib.MAX_WBITS and chunk:
            self._started = True
            # "deflate" is meant to be zlib-wrapped, but some servers send raw deflate.
            try:
                return self._d.decompress(chunk)
            except zlib.error:
                self._d = zlib.decompressobj(-zlib.MAX_WBITS)
        return self._d.decompress(chunk)

    def flush(self) -> bytes:
        return self._d.flush()


class _Brotli:
    def __init__(self) -> None:
        self._d = brotli.Decompressor()

    def decode(self, chunk: bytes) -> bytes:
        return self._d.process(chunk) if chunk else b""

    def flush(self) -> bytes:
        return b""


class _Zstd:
    def __init__(self) -> None:
        self._d = zstandard.ZstdDecompressor().decompressobj()

    def decode(self, chunk: bytes) -> bytes:
        return self._d.decompress(chunk) if chunk else b""

    def flush(self) -> bytes:
        return b""


def decoder_for(content_encoding: str | None) -> Decoder | None:
    """A decoder for the header's value; None for identity. Raises ValueError for what it cannot decode."""
    enc = (content_encoding or "").strip().lower()
    if enc in ("", "identity"):
        return None
    if enc in ("gzip", "x-gzip"):
        return _Zlib(16 + zlib.MAX_WBITS)
    if enc == "deflate":
        return _Zlib(zlib.MAX_WBITS)
    if enc == "br":
        return _Brotli()
    if enc == "zstd":
        return _Zstd()
    raise ValueError(f"unsupported content-encoding {content_encoding!r}")
