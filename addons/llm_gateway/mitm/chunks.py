"""Chunked HTTP/1 bodies handed on in batches: every chunk already received, as one piece of data.

mitmproxy's HTTP/1 layer reads a chunked body with h11's `ChunkedReader`, which returns one chunk per call, and
turns each into an event of its own that passes the HTTP layers, the stream callable and the write to the other
side: about 100 µs each. An SSE answer is one chunk per event (the API writes them so, and so does every
upstream we know), so a burst of 20,000 events costs mitmproxy 2 s where the bytes take 0.1 s. `Batched` wraps
the reader: after a chunk it keeps reading while the receive buffer holds more, and returns all of their data
as one `h11.Data`; what ended the batch (the end of the message, a protocol error) comes on the next call,
so nothing is lost or reordered. The body's bytes are unchanged (only how they are cut: the relay splits them
into events again, pipeline/relay.py), and a chunk that is not all there yet is never waited for.

`install` swaps mitmproxy's `make_body_reader` (looked up at each call by its HTTP/1 layer) for one that wraps
its chunked readers; `uninstall` puts it back. Content-Length and read-until-close bodies are left alone:
mitmproxy already reads those as one piece per receive.
"""

from __future__ import annotations

import logging
from typing import Any

import h11

logger = logging.getLogger("llm_gateway")

_original: Any = None  # mitmproxy's make_body_reader while ours is installed


class Batched:
    """A chunked body reader (h11's ChunkedReader interface: `__call__(buf)`, `read_eof()`) that returns the
    data of every complete or partial chunk in the buffer at once."""

    __slots__ = ("reader", "pending", "failed")

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.pending: Any = None  # the event that ended the last batch, handed on next
        self.failed: BaseException | None = None  # a protocol error met after a batch's first chunk

    def __call__(self, buf: Any) -> Any:
        if self.failed is not None:
            failed, self.failed = self.failed, None
            raise failed
        if self.pending is not None:
            event, self.pending = self.pending, None
            return event
        event = self.reader(buf)
        if type(event) is not h11.Data:
            return event
        parts, last = None, event
        while buf:  # more bytes already here: the next chunk (or the end), never a wait
            try:
                more = self.reader(buf)
            except h11.ProtocolError as e:  # the data before it goes on first, as without batching
                self.failed = e
                break
            if more is None:
                break
            if type(more) is not h11.Data:
                self.pending = more
                break
            if parts is None:
                parts = [event.data]
            parts.append(more.data)
            last = more
        if parts is None:
            return event
        return h11.Data(data=b"".join(parts), chunk_start=event.chunk_start, chunk_end=last.chunk_end)

    def read_eof(self) -> Any:
        return self.reader.read_eof()


def install() -> bool:
    """Batch chunked bodies from now on (once per process). False if mitmproxy's HTTP/1 layer no longer has
    the reader factory this wraps: then bodies pass one chunk at a time, as before."""
    global _original
    if _original is not None:
        return True
    try:
        from h11._readers import ChunkedReader
        from mitmproxy.proxy.layers.http import _http1

        original = _http1.make_body_reader
    except (ImportError, AttributeError) as e:
        logger.warning(f"cannot find mitmproxy's HTTP/1 body reader ({e}): chunked bodies are not batched")
        return False

    def make_body_reader(expected_size: int | None) -> Any:
        reader = original(expected_size)
        return Batched(reader) if type(reader) is ChunkedReader else reader

    _original = original
    _http1.make_body_reader = make_body_reader
    return True


def uninstall() -> None:
    """mitmproxy's own reader factory again (readers already made keep batching until their body ends)."""
    global _original
    if _original is None:
        return
    from mitmproxy.proxy.layers.http import _http1

    _http1.make_body_reader = _original
    _original = None


def installed() -> bool:
    return _original is not None
