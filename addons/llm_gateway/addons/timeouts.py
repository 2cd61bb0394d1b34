"""Timeouts: the gateway never holds an agent longer than the rules allow.

mitmproxy has no timeout between a request sent upstream and the answer (only `tcp_timeout`, for idle
connections, and it cuts them silently). An upstream that stops sending would hold the agent until the agent's
own timeout, ten minutes for some clients. Two rule keys bound that, per exchange, with the rules the exchange
started with:

- `timeouts.first_byte` (seconds): until the upstream's response headers. On expiry the client gets a native
  504 `timeout_error` with `x-should-retry: true` (Anthropic's error list: 504 is `timeout_error`).
  `timeouts.non_streaming` (600 s, the SDKs' own wait) takes its place for a request sent upstream without
  `stream: true`: such an answer's headers come only when all of it is written, so a long turn is legitimate.
- `timeouts.stream_idle` (seconds): the longest silence between two chunks of the answer's body. On expiry a
  relayed stream gets a native `event: error` frame (`timeout_error`) appended to the events already relayed,
  then its end; an answer still buffered (nothing sent yet) becomes the 504 above.

Either way the upstream connection is closed, the record says `complete: false` and `reason`
(`first_byte_timeout` or `stream_idle_timeout`), and `llm_gateway_ended_early{reason}` counts it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import http

from llm_gateway.mitm import layers
from llm_gateway.pipeline import answer, exchange, relay
from llm_gateway.protocol.hosts import path_of

logger = logging.getLogger("llm_gateway.timeouts")

RETRY = {"x-should-retry": "true"}  # the SDKs retry a 504 anyway; this says so explicitly


def end_with_error(flow: http.HTTPFlow, ex: exchange.Exchange, reason: str, error_type: str, message: str,
                   headers: dict[str, str] | None = None) -> str:
    """End `flow` early with a native error (HTTP answer or stream frame); returns what mitm/layers.end_early did."""
    ex.stop(reason)
    done = layers.end_early(
        flow, answer.native_answer(error_type, message, headers),
        lambda: relay.interrupt(flow, answer.error_frame(error_type, message)),
    )
    logger.warning(f"{reason}: {ex.host}{path_of(ex.path)!r} ({ex.client}, session {ex.session}): {done}")
    return done


def first_byte_limit(ex: exchange.Exchange) -> tuple[str, float]:
    """(rule key, seconds) to wait for the upstream's response headers: `non_streaming` for a request sent
    upstream without streaming (an API request known not to stream), else `first_byte`."""
    timeouts = ex.rules.timeouts
    if ex.stream_upstream is False:
        return "non_streaming", timeouts.non_streaming
    return "first_byte", timeouts.first_byte


def _poll_interval(idle: float) -> float:
    """Seconds between two looks at a buffered body's growth: a tenth of `idle`, within 0.05–1 s."""
    return min(max(idle / 10, 0.05), 1.0)


class Timeouts:
    """One timer per exchange in flight (`loop.call_later`, no task): a task, an event and `wait_for` per
    request cost more CPU than the rest of the gateway's request path (docs/benchmarks.md)."""

    end_with_error = staticmethod(end_with_error)  # the drain ends what is left at its deadline the same way

    def __init__(self) -> None:
        # flow -> its pending check; a flow leaves at its response or error, or when a check finds it gone
        self._timers: dict[http.HTTPFlow, asyncio.TimerHandle] = {}

    def request(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or flow.response or flow in self._timers:
            return
        self._timers[flow] = asyncio.get_running_loop().call_later(
            first_byte_limit(ex)[1], self._first_byte_expired, flow, ex
        )

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        timer = self._timers.pop(flow, None)
        if timer is not None:
            timer.cancel()
            ex = exchange.of(flow)
            if ex is not None:  # the first look at the body comes after a first wait: most answers are over by then
                idle = ex.rules.timeouts.stream_idle
                self._timers[flow] = asyncio.get_running_loop().call_later(
                    min(idle, _poll_interval(idle)), self._watch_body, flow, ex, idle, -1, time.monotonic()
                )

    def response(self, flow: http.HTTPFlow) -> None:
        self._forget(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._forget(flow)

    def done(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _forget(self, flow: http.HTTPFlow) -> None:
        timer = self._timers.pop(flow, None)
        if timer is not None:
            timer.cancel()

    def _first_byte_expired(self, flow: http.HTTPFlow, ex: exchange.Exchange) -> None:
        self._timers.pop(flow, None)
        key, limit = first_byte_limit(ex)
        try:
            if flow.response is None and flow.live:
                end_with_error(
                    flow, ex, "first_byte_timeout", "timeout_error",
                    f"The upstream sent no response within {limit:g} s (gateway timeouts.{key}).",
                    RETRY,
                )
        except Exception:  # a watcher must never cost the exchange
            logger.exception("timeout watcher")

    def _watch_body(self, flow: http.HTTPFlow, ex: exchange.Exchange, idle: float, seen: int, last: float) -> None:
        """Until the body ends (`response`/`error` cancel the timer): end it after `idle` seconds without a
        chunk. A relayed stream is timed by the relay's stamp of its last chunk, so the next check is exactly
        at the deadline; a buffered body by mitmproxy's body buffer growing (`seen` bytes, the last growth at
        monotonic `last`), checked every `_poll_interval`."""
        try:
            if not flow.live:
                self._timers.pop(flow, None)
                return
            stream = relay.of(flow)
            if stream is None and flow.response is not None and flow.response.stream:
                self._timers.pop(flow, None)
                return  # streamed untouched (an unknown encoding): no clock on its chunks, and no way to end it well
            if stream is not None:
                last = stream.last_chunk  # the relay stamps every chunk: the next check is at the deadline
                step = last + idle - time.monotonic()
            else:  # buffered: watch mitmproxy's body buffer grow
                size = layers.buffered_response_bytes(flow)
                size = seen if size is None else size
                if size != seen:
                    seen, last = size, time.monotonic()
                step = min(last + idle - time.monotonic(), _poll_interval(idle))
            if last + idle <= time.monotonic():
                self._timers.pop(flow, None)
                end_with_error(
                    flow, ex, "stream_idle_timeout", "timeout_error",
                    f"The upstream sent nothing for {idle:g} s in the middle of its answer "
                    "(gateway timeouts.stream_idle).",
                    RETRY,
                )
                return
            self._timers[flow] = asyncio.get_running_loop().call_later(
                max(step, 0.01), self._watch_body, flow, ex, idle, seen, last
            )
        except Exception:  # a watcher must never cost the exchange
            self._timers.pop(flow, None)
            logger.exception("timeout watcher")
