"""The one stream callable an API flow's SSE response passes through.

Several parts need to see (and some to rewrite) a stream's events while it passes: usage, error
unwrapping, truncation detection, the mitmweb copy. mitmproxy allows one `response.stream` callable,
so this relay owns it and hands each complete event to the taps the other addons put on the
exchange. A compressed upstream body is decoded on the fly and forwarded as identity (the relay
removes `content-encoding`), so taps can rewrite events without re-encoding. Untouched events go out
as their original bytes; only a partial event at the end of a chunk is held until it completes.

Every event of every stream passes here, so the relay only calls a tap for the events it reads: a tap
may name them in `event_names` (a set of event names, None for events without one); a tap without it
sees every event. Most of a stream is `content_block_delta` events that only the body copy reads: a
chunk that is exactly one such event, in the API's own shape, while nothing is held back and no tap
reads them, is checked with a few `bytes` calls and sent on as the same object (the quick path; mitmproxy
hands over one HTTP chunk at a time, and the API writes one event per chunk). Every other chunk goes
through the parser, which gives the same result for these chunks, only slower. A tap that only copies
events (the mitmweb body copy) has `on_raw`: the quick path hands it the chunk's bytes. A tap that acts only
on events holding certain bytes (the upstream key's mask) names them in `event_bytes` (bytes, or a tuple
of bytes): the quick path looks for them in the chunk. Bytes the relay forwards without parsing them (an
encoding it cannot decode, a stream it gave up on) still pass every tap's `on_unread(data, end)` (the key
scrub: nothing the gateway relays skips it).

Nothing here may raise into mitmproxy: an exception inside a stream callable kills the connection.
"""

from __future__ import annotations

import logging
import re
import time

from mitmproxy import http

from llm_gateway.pipeline import exchange
from llm_gateway.protocol.decoding import Decoder, decoder_for
from llm_gateway.protocol.sse import SSEParser
from llm_gateway.util.logsafe import clean

logger = logging.getLogger("llm_gateway.relay")
_UNREAD = object()
# No Anthropic event comes near this: a body labelled SSE without a blank line for this long is not read
# any further (forwarded as it comes) rather than held in memory whole.
MAX_EVENT_BYTES = 16 * 1024 * 1024
# What the parser holds back at the end only because a last "\r" might have become "\r\n": a whole event.
_ENDED = re.compile(rb"(?:\r\n|\r|\n)\r\Z|\A\r\Z")
# The quick path's event: `event: content_block_delta`, then one `data:` line, then the blank line, "\n" only.
QUICK_NAME = "content_block_delta"
_QUICK = b"event: " + QUICK_NAME.encode() + b"\ndata:"
_QUICK_LEN = len(_QUICK)
_now = time.monotonic


class SSERelay:
    def __init__(self, ex: exchange.Exchange, decoder: Decoder | None) -> None:
        self.ex = ex
        self.decoder = decoder
        self.parser = SSEParser()
        self.tapping = True
        self.decoding = decoder is not None
        self.undecoded: bytes | None = b""  # what the decoder took before its first output (None after it)
        self._taps: list = []  # the exchange's taps when `_routes` was built
        self._routes: list[tuple] = []  # (on_event, event_names or None, tap), in tap order
        self.last_chunk = _now()  # when the upstream last sent bytes (timeouts.stream_idle reads it)
        self.final: bytes | None = None  # set by `interrupt`
        self._skips_quick = False  # no route reads QUICK_NAME events but the copiers (set with `_routes`)
        self._copiers: tuple = ()  # the taps' `on_raw`, for the quick path
        self._needles: tuple = ()  # the taps' `event_bytes`: a chunk that holds one is parsed
        self.quick = False  # the quick path may be taken: see the module docstring
        self.opaque = False  # an encoding it cannot decode: every byte passes unread (`install`)

    def interrupt(self, frame: bytes) -> None:
        """The gateway ends this stream early (a timeout, a shutdown): at the end that follows, an event
        half received is dropped and `frame` (one whole SSE event) passes the taps in its place."""
        self.final = frame

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        self.last_chunk = _now()
        try:
            # The quick path: one whole QUICK_NAME event, no "\r" (which could break lines), one `data:` line
            # (so no second `event:` field renames it), and still no tap that reads it.
            if (
                self.quick
                and chunk.startswith(_QUICK)
                and chunk.find(b"\n", _QUICK_LEN) == len(chunk) - 2
                and chunk[-1] == 10
                and chunk.find(b"\r") < 0
                and self.ex.sse_taps == self._taps
                and (not self._needles or self._misses(chunk))
            ):
                if self._copiers:  # mitmweb's body copy
                    for copy in self._copiers:
                        copy(chunk)
                return chunk
            # Nothing to send yet must be [], not b"": mitmproxy writes b"" as the chunk that ends the body.
            if chunk and self.tapping and not self.decoding:  # the common case, in as few calls as possible
                parser = self.parser
                events = parser.feed(chunk)
                if parser.held > MAX_EVENT_BYTES:
                    return self._forward(events) + self._give_up()
                out = self._forward(events) if events else b""
                self.quick = self._skips_quick and not parser.held
                return out or []
            self.quick = False
            return self._relay(chunk) or []
        except Exception:  # never reached in normal operation: see the module docstring
            self.quick = False
            logger.exception(f"stream relay failed; forwarding the rest untouched ({clean(self.ex.host + self.ex.path)})")
            self.tapping = False
            return self._unread(chunk if self.decoding else self._held() + chunk, not chunk)

    def _misses(self, chunk: bytes) -> bool:
        for needle in self._needles:
            if chunk.find(needle) >= 0:
                return False
        return True

    def _relay(self, chunk: bytes) -> bytes:
        end = not chunk
        data = chunk
        if self.decoding:
            try:
                data = self.decoder.decode(chunk) + (self.decoder.flush() if end else b"")
            except Exception as e:
                logger.warning(f"cannot decode the {clean(self.ex.host)} stream ({clean(e)}); forwarding it as received")
                self.decoding = self.tapping = False
                # A body that was never encoded: the bytes the decoder swallowed go out too.
                return self._unread(self._held() + (self.undecoded or b"") + chunk, end)
            if self.undecoded is not None:
                self.undecoded = None if data or len(self.undecoded) > 65536 else self.undecoded + chunk
        if not self.tapping:
            return self._unread(data, end) + (self.final or b"") if end else self._unread(data, end)
        events = self.parser.feed(data) if data else []
        if not end:
            return self._forward(events) + (self._give_up() if self.parser.held > MAX_EVENT_BYTES else b"")
        cut = b""
        for event in self.parser.flush():
            if _ENDED.search(event.raw):  # whole after all: its last line break was a lone "\r"
                events.append(event)
            else:  # cut inside an event: no client dispatches it, so no tap counts it
                cut = event.raw
        if self.final:
            cut = b""
            events += SSEParser().feed(self.final)
        out = self._forward(events)
        extra = b"".join(self._end())
        if cut and extra:
            # Bytes appended to an unfinished event would merge with it: drop it, as clients would.
            logger.info(f"{clean(self.ex.host)} stream cut inside an event; its {len(cut)} bytes dropped")
            cut = b""
        return b"".join([out, cut, extra])

    def _give_up(self) -> bytes:
        logger.warning(f"{clean(self.ex.host)} stream: an event of over {MAX_EVENT_BYTES} bytes; forwarding the rest unread")
        self.tapping = self.quick = False
        return self._unread(self._held(), False)

    def _unread(self, data: bytes, end: bool) -> bytes:
        """Bytes forwarded without parsing: through every tap's `on_unread` (the key scrub) all the same. An
        `on_unread` works on bytes alone and must not raise."""
        for tap in self.ex.sse_taps:
            on_unread = getattr(tap, "on_unread", None)
            if on_unread is not None:
                data = on_unread(data, end)
        return data

    def _held(self) -> bytes:
        """Give up parsing: the bytes held back for an incomplete event, to forward as they are."""
        held, self.parser = self.parser.pending, SSEParser()
        return held

    def _forward(self, events: list) -> bytes:
        """The bytes to send for these events, after every tap that reads them saw (and maybe replaced) them."""
        if not events:
            return b""
        if self.ex.sse_taps != self._taps:  # which tap reads which events: rebuilt when the taps change
            self._taps = list(self.ex.sse_taps)
            self._routes = [(tap.on_event, getattr(tap, "event_names", None), tap) for tap in self._taps]
            self._copiers = tuple(tap.on_raw for tap in self._taps if hasattr(tap, "on_raw"))
            self._needles = tuple(
                needle for tap in self._taps for needle in _needles(getattr(tap, "event_bytes", None)))
            self._skips_quick = all(
                hasattr(tap, "on_raw") or getattr(tap, "event_bytes", None) or (names is not None and QUICK_NAME not in names)
                for _, names, tap in self._routes
            )
        routes = self._routes
        if not routes:
            return events[0].raw if len(events) == 1 else b"".join([event.raw for event in events])
        out = []
        for event in events:
            name = _UNREAD
            for on_event, names, tap in routes:
                if names is not None:
                    if name is _UNREAD:
                        name = event.name
                    if name not in names:
                        continue
                try:
                    replaced = on_event(event)
                except Exception:
                    logger.exception(f"{type(tap).__name__} failed on an event; forwarding it unchanged")
                    continue
                if replaced is not None:
                    event, name = replaced, _UNREAD
            out.append(event.raw)
        return out[0] if len(out) == 1 else b"".join(out)

    def _end(self) -> list[bytes]:
        extra = []
        for tap in self.ex.sse_taps:
            try:
                extra.append(tap.on_end())
            except Exception:
                logger.exception(f"{type(tap).__name__} failed at the end of a stream")
        return extra


def _needles(event_bytes: bytes | tuple[bytes, ...] | None) -> tuple[bytes, ...]:
    if not event_bytes:
        return ()
    return (event_bytes,) if isinstance(event_bytes, bytes) else tuple(event_bytes)


def install(flow: http.HTTPFlow, ex: exchange.Exchange) -> bool:
    """Stream this response through a relay; False if its encoding is unknown: then it is streamed unread,
    through the taps' `on_unread` only."""
    try:
        decoder = decoder_for(flow.response.headers.get("content-encoding"))
    except ValueError as e:
        logger.warning(f"{clean(e)}: streaming {clean(ex.host + ex.path)} untouched, usage not read")
        unread = SSERelay(ex, None)
        unread.tapping, unread.opaque = False, True  # `of` does not name it: it is streamed untouched
        flow.response.stream = unread.__call__
        return False
    response = flow.response
    if decoder is not None:
        del response.headers["content-encoding"]
    if response.headers.pop("content-length", None) is not None and not (response.is_http2 or response.is_http3):
        # The taps may rewrite and append events: the upstream's length no longer holds. mitmproxy frames an
        # HTTP/1 body by these headers as they are (and drops transfer-encoding towards HTTP/2 clients).
        response.headers["transfer-encoding"] = "chunked"
    # The bound method, not the relay itself: mitmproxy calls it once per chunk, and calling an instance
    # goes through `__call__`'s slot (about three times the cost of a bound method call). `of` finds it.
    response.stream = SSERelay(ex, decoder).__call__
    return True


def of(flow: http.HTTPFlow) -> SSERelay | None:
    """The relay this flow's response streams through (`install` puts its bound method there; a relay put
    there itself counts too; so does the SSE relay a translated event stream feeds), or None (buffered, or
    streamed untouched)."""
    stream = flow.response.stream if flow.response is not None else None
    owner = getattr(stream, "__self__", stream)
    if isinstance(owner, SSERelay):
        return None if owner.opaque else owner
    inner = getattr(owner, "relay", None)  # a translated Bedrock stream's SSE relay (pipeline/eventstream.py)
    return inner if isinstance(inner, SSERelay) else None


def interrupt(flow: http.HTTPFlow, frame: bytes) -> bool:
    """Have the flow's relay end its stream with `frame` (`SSERelay.interrupt`); False when it has none
    (buffered, or streamed untouched): mitm.layers.end_early then cuts it instead."""
    relayed = of(flow)
    if relayed is None:
        return False
    relayed.interrupt(frame)
    return True


def replay(ex: exchange.Exchange, body: bytes) -> bytes:
    """A buffered stream (already decoded) passed through the exchange's taps exactly as a relayed one
    would be, end included: the bytes the taps pass on. The SSE→JSON conversion accumulates these, so a
    converted stream means what the same stream means when relayed."""
    stream = SSERelay(ex, None)
    sent = [stream(body), stream(b"")]
    return b"".join(b"".join(part) if isinstance(part, list) else part for part in sent)
