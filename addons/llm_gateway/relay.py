"""The one stream callable an API flow's SSE response passes through.

Several parts need to see (and some to rewrite) a stream's events while it passes: usage, error
unwrapping, truncation detection, the mitmweb copy. mitmproxy allows one `response.stream` callable,
so this relay owns it and hands each complete event to the taps the other addons put on the
exchange. A compressed upstream body is decoded on the fly and forwarded as identity (the relay
removes `content-encoding`), so taps can rewrite events without re-encoding. Untouched events go out
as their original bytes; only a partial event at the end of a chunk is held until it completes.

Nothing here may raise into mitmproxy: an exception inside a stream callable kills the connection.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from . import exchange
from .decoding import Decoder, decoder_for
from .sse import SSEParser

logger = logging.getLogger("llm_gateway.relay")


class SSERelay:
    def __init__(self, ex: exchange.Exchange, decoder: Decoder | None) -> None:
        self.ex = ex
        self.decoder = decoder
        self.parser = SSEParser()
        self.tapping = True
        self.decoding = decoder is not None

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        try:
            # Nothing to send yet must be [], not b"": mitmproxy writes b"" as the chunk that ends the body.
            return self._relay(chunk) or []
        except Exception:  # never reached in normal operation: see the module docstring
            logger.exception(f"stream relay failed; forwarding the rest untouched ({self.ex.host}{self.ex.path})")
            self.tapping = False
            return chunk if self.decoding else self._held() + chunk

    def _relay(self, chunk: bytes) -> bytes:
        end = not chunk
        data = chunk
        if self.decoding:
            try:
                data = self.decoder.decode(chunk) + (self.decoder.flush() if end else b"")
            except Exception as e:
                logger.warning(f"cannot decode the {self.ex.host} stream ({e}); forwarding it as received")
                self.decoding = self.tapping = False
                return self._held() + chunk
        if not self.tapping:
            return data
        events = self.parser.feed(data) if data else []
        if end:
            events += self.parser.flush()
        out = [self._tap(ev) for ev in events]
        if end:
            out.extend(self._end())
        return b"".join(out)

    def _held(self) -> bytes:
        """Give up parsing: the bytes held back for an incomplete event, to forward as they are."""
        held, self.parser = self.parser.pending, SSEParser()
        return held

    def _tap(self, event) -> bytes:
        for tap in self.ex.sse_taps:
            try:
                replaced = tap.on_event(event)
            except Exception:
                logger.exception(f"{type(tap).__name__} failed on an event; forwarding it unchanged")
                continue
            if replaced is not None:
                event = replaced
        return event.raw

    def _end(self) -> list[bytes]:
        extra = []
        for tap in self.ex.sse_taps:
            try:
                extra.append(tap.on_end())
            except Exception:
                logger.exception(f"{type(tap).__name__} failed at the end of a stream")
        return extra


def install(flow: http.HTTPFlow, ex: exchange.Exchange) -> bool:
    """Stream this response through a relay; False (buffer as usual) if its encoding is unknown."""
    try:
        decoder = decoder_for(flow.response.headers.get("content-encoding"))
    except ValueError as e:
        logger.warning(f"{e}: streaming {ex.host}{ex.path} untouched, usage not read")
        flow.response.stream = True
        return False
    if decoder is not None:
        del flow.response.headers["content-encoding"]
        flow.response.headers.pop("content-length", None)
    flow.response.stream = SSERelay(ex, decoder)
    return True
