"""Bedrock's streamed answers read as they pass: the AWS event-stream (`application/vnd.amazon.eventstream`).

InvokeModelWithResponseStream answers in binary frames (prelude, headers, payload, two CRC32s; decoded by
botocore's `EventStreamBuffer`, which checks both CRCs). A `chunk` event carries one Anthropic stream event,
base64 inside JSON (protocol/providers.py); an `exception` frame carries an AWS error (ThrottlingException, …).
Each Anthropic event goes through the exchange's taps as the SSE event it stands for, so the one
`StreamReader` reads usage, the model and the end of the message exactly as on Anthropic's own streams.

The bytes go on to the client as they came (the request was signed by the client, the answer is its cloud's):
nothing is held back, nothing rewritten. Only the decoder keeps the bytes of a frame not yet complete. When the
gateway signed the request itself (a tap masks secrets: `mask_bytes`), frames go on whole instead, each payload
through that mask (the base64 inside a `chunk` decoded for it), a frame the mask changed encoded again with its
CRCs: an upstream that echoes the gateway's session token inside a `chunk` does not hand it to the client.
A translated stream gets `event: ping` right after `message_start`, as from Anthropic's API; the pings during
silent gaps come from addons/translate.py. Nothing here may raise into mitmproxy (see pipeline/relay.py): a frame that does not decode stops the reading,
never the stream.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import struct
import time
import zlib
from collections.abc import Callable

from botocore.eventstream import EventStreamBuffer, ParserError
from mitmproxy import http

from llm_gateway.pipeline import exchange
from llm_gateway.pipeline.relay import SSERelay
from llm_gateway.protocol import jsoncodec, providers, sse, tokens
from llm_gateway.protocol.errors import error_body
from llm_gateway.protocol.sse import SSE_TYPE
from llm_gateway.util.logsafe import clean

logger = logging.getLogger("llm_gateway.eventstream")
# The longest frame the masked path holds whole (botocore's own bounds: a 16 MiB payload, 128 KiB of headers)
MAX_FRAME = 16 * 1024 * 1024 + 128 * 1024 + 16


class EventStreamReader:
    """The stream callable of one Bedrock answer: bytes forwarded unchanged, events handed to the taps; or, with
    `relay` (a translated exchange), each event turned into the Anthropic SSE event it carries and sent on through
    that SSE relay, which hands it to the taps and appends what they add at the end."""

    def __init__(self, ex: exchange.Exchange, relay: SSERelay | None = None,
                 mask: Callable[[bytes], bytes] | None = None) -> None:
        self.ex = ex
        self.relay = relay
        self.mask = mask  # set: frames go on whole, each payload masked (`_whole_frames`)
        self.pending = b""  # the masked path: the bytes of a frame not yet complete
        self.sse: list[bytes] = []  # translated: the SSE bytes of this chunk's frames
        self.buffer = EventStreamBuffer()
        self.reading = True
        self.metrics: dict[str, int] = {}  # the last chunk's amazon-bedrock-invocationMetrics, as usage fields
        self.last_chunk = time.monotonic()

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        self.last_chunk = time.monotonic()
        if self.relay is not None:
            return self._translate(chunk)
        if self.mask is not None:
            return self._whole_frames(chunk)
        if self.reading:
            try:
                if chunk:
                    self.buffer.add_data(chunk)
                    for message in self.buffer:
                        self._message(message.headers, message.payload)
                else:
                    self._end()
            except ParserError as e:
                logger.warning(f"{clean(self.ex.host)}: an event-stream frame does not decode ({clean(e)}); not read further")
                self.reading = False
            except Exception:  # never reached in normal operation: see the module docstring
                logger.exception(f"event-stream reader failed; forwarding the rest unread ({clean(self.ex.host)})")
                self.reading = False
        return chunk or []  # nothing to send must be [], not b"" (see pipeline/relay.py)

    def _whole_frames(self, chunk: bytes) -> bytes | list[bytes]:
        """The complete frames of what came so far, each masked; the rest of a frame waits for its end. What
        cannot be read as frames goes on as it came, its bytes through the mask all the same."""
        out: list[bytes] = []
        if not chunk:
            if self.reading:
                self._end()
            rest, self.pending = self.mask(self.pending), b""
            return rest or []
        self.pending += chunk
        if not self.reading:
            rest, self.pending = self.mask(self.pending), b""
            return rest
        try:
            while len(self.pending) >= 12:
                total = int.from_bytes(self.pending[:4], "big")
                if not 16 <= total <= MAX_FRAME:
                    raise ParserError(f"a frame of {total} bytes")
                if len(self.pending) < total:
                    break
                frame, self.pending = self.pending[:total], self.pending[total:]
                self.buffer.add_data(frame)
                for message in self.buffer:
                    self._message(message.headers, message.payload)
                    out.append(self._masked_frame(frame, message.headers))
        except ParserError as e:
            logger.warning(f"{clean(self.ex.host)}: an event-stream frame does not decode ({clean(e)}); not read further")
            self.reading = False
            out.append(self.mask(self.pending))
            self.pending = b""
        except Exception:  # never reached in normal operation: see the module docstring
            logger.exception(f"event-stream reader failed; forwarding the rest unread ({clean(self.ex.host)})")
            self.reading = False
            out.append(self.mask(self.pending))
            self.pending = b""
        return b"".join(out) or []

    def _masked_frame(self, frame: bytes, headers: dict) -> bytes:
        """The frame with its headers and payload masked (a `chunk`'s base64 decoded for it), its CRCs made
        again; the same bytes when the mask changed nothing."""
        headers_length = int.from_bytes(frame[4:8], "big")
        head = original = frame[12:12 + headers_length]
        payload = frame[12 + headers_length:-4]
        if self.mask(head) is not head:  # an `:exception-type` that echoes a secret
            head = _string_headers({self.mask(k.encode()).decode(): self.mask(v.encode()).decode() if isinstance(v, str)
                                    else v for k, v in headers.items()}) or self.mask(head)
        masked = self.mask(payload)
        outer = jsoncodec.parse_json_body(masked)
        if isinstance(outer, dict) and isinstance(outer.get("bytes"), str):
            try:
                inner = base64.b64decode(outer["bytes"], validate=True)
            except (binascii.Error, ValueError):
                inner = None
            if inner is not None and (inner_masked := self.mask(inner)) is not inner:
                outer["bytes"] = base64.b64encode(inner_masked).decode()
                masked = json.dumps(outer, separators=(",", ":")).encode()
        if masked is payload and head is original:
            return frame
        prelude = struct.pack(">II", 12 + len(head) + len(masked) + 4, len(head))
        message = prelude + struct.pack(">I", zlib.crc32(prelude)) + head + masked
        return message + struct.pack(">I", zlib.crc32(message))

    def _translate(self, chunk: bytes) -> bytes | list[bytes]:
        """The SSE bytes for this chunk's complete frames (the relay sees them as one chunk)."""
        self.relay.last_chunk = self.last_chunk  # stream_idle counts upstream bytes, whole frames or not
        if self.reading:
            try:
                if chunk:
                    self.buffer.add_data(chunk)
                    for message in self.buffer:
                        self._frame_sse(message.headers, message.payload)
            except ParserError as e:
                logger.warning(f"{clean(self.ex.host)}: an event-stream frame does not decode ({clean(e)}); the stream ends here")
                self.sse.append(sse.encode("error", error_body("api_error", "the upstream event stream could not be decoded")))
                self.reading = False
            except Exception:  # never reached in normal operation: see the module docstring
                logger.exception(f"event-stream translation failed ({clean(self.ex.host)})")
                self.reading = False
        out, self.sse = b"".join(self.sse), []
        if chunk:
            return self.relay(out) if out else []
        self._end(taps=False)
        return (_join(self.relay(out)) if out else b"") + _join(self.relay(b"")) or []

    def _frame_sse(self, headers: dict, payload: bytes) -> None:
        kind = headers.get(":message-type")
        if kind == "event" and headers.get(":event-type") == "chunk":
            event = providers.chunk_event(payload)
            if event is not None and providers.METRICS_KEY in event:
                self.metrics = providers.metrics_usage(event[providers.METRICS_KEY])
            raw = providers.chunk_sse(payload)
            if raw is not None:
                self.sse.append(raw)
                if event is not None and event.get("type") == "message_start":
                    self.sse.append(sse.PING)  # as Anthropic's API does; Bedrock sends none
        elif kind in ("exception", "error"):
            name = headers.get(":exception-type") or headers.get(":error-code")
            body = jsoncodec.parse_json_body(payload)
            text = body.get("message") if isinstance(body, dict) and isinstance(body.get("message"), str) else str(name)
            shown = providers.client_message(text)
            if shown != text:
                logger.info(f"Bedrock {clean(str(name))} in the stream: {clean(text)}")
            self.sse.append(sse.encode("error", error_body(providers.bedrock_error_type(str(name)), shown)))

    def _message(self, headers: dict, payload: bytes) -> None:
        kind = headers.get(":message-type")
        if kind == "event" and headers.get(":event-type") == "chunk":
            event = providers.chunk_event(payload)
            if event is None:
                return
            metrics = event.pop(providers.METRICS_KEY, None)
            if metrics is not None:
                self.metrics = providers.metrics_usage(metrics)
            name = event.get("type")
            self._tap(sse.Event(sse.encode(name if isinstance(name, str) else "", event)))
        elif kind in ("exception", "error"):
            name = headers.get(":exception-type") or headers.get(":error-code")
            body = jsoncodec.parse_json_body(payload)
            text = body.get("message") if isinstance(body, dict) else None
            error_type = providers.bedrock_error_type(name if isinstance(name, str) else None)
            self._tap(sse.Event(sse.encode("error", error_body(error_type, text if isinstance(text, str) else str(name)))))
            self.ex.note(f"Bedrock {clean(str(name))} in the stream")

    def _tap(self, event: sse.Event) -> None:
        """The event through the taps in stage order, each seeing what the one before passed on (the key scrub
        first: the reader never sees a secret the upstream echoed); the client's bytes stay as they came."""
        for tap in list(self.ex.sse_taps):
            try:
                event = tap.on_event(event) or event
            except Exception:
                logger.exception(f"{type(tap).__name__} failed on a Bedrock event")

    def _end(self, taps: bool = True) -> None:
        ex = self.ex
        if self.metrics and not ex.usage:  # no message_start read: the metrics Bedrock counted
            ex.usage = dict(self.metrics)
        elif self.metrics and ex.usage is not None:  # Bedrock's own counts for what the events left out
            for key, value in self.metrics.items():
                if tokens.token(ex.usage, key) is None:
                    ex.usage[key] = value
        if not taps:  # translated: the SSE relay ends the taps
            return
        for tap in list(ex.sse_taps):  # what they would append cannot go into these frames: effects only
            try:
                tap.on_end()
            except Exception:
                logger.exception(f"{type(tap).__name__} failed at the end of a Bedrock stream")


def _string_headers(headers: dict) -> bytes | None:
    """Event-stream headers encoded (name length, name, type 7 = string, value length, value); None when one is
    not a string (Bedrock sends strings only)."""
    out = []
    for name, value in headers.items():
        if not isinstance(value, str):
            return None
        n, v = name.encode(), value.encode()
        out.append(bytes([len(n)]) + n + b"\x07" + struct.pack(">H", len(v)) + v)
    return b"".join(out)


def _join(out: bytes | list[bytes]) -> bytes:
    return b"".join(out) if isinstance(out, list) else out


def install(flow: http.HTTPFlow, ex: exchange.Exchange) -> None:
    """Stream this event-stream answer through a reader: bytes unchanged, or (a translated exchange) as the
    Anthropic event stream the client asked for."""
    response = flow.response
    if not ex.translated:
        mask = next((tap.mask_bytes for tap in ex.sse_taps if hasattr(tap, "mask_bytes")), None)
        response.stream = EventStreamReader(ex, mask=mask).__call__
        return
    response.headers["content-type"] = f"{SSE_TYPE}; charset=utf-8"
    if response.headers.pop("content-length", None) is not None and not (response.is_http2 or response.is_http3):
        response.headers["transfer-encoding"] = "chunked"
    response.stream = EventStreamReader(ex, SSERelay(ex, None)).__call__
