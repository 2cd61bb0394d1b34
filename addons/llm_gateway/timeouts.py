"""Timeouts: the gateway never holds an agent longer than the rules allow.

mitmproxy has no timeout between a request sent upstream and the answer (only `tcp_timeout`, for idle
connections, and it cuts them silently). An upstream that stops sending would hold the agent until the agent's
own timeout, ten minutes for some clients. Two rule keys bound that, per exchange, with the rules the exchange
started with:

- `timeouts.first_byte` (seconds): until the upstream's response headers. On expiry the client gets a native
  504 `timeout_error` with `x-should-retry: true` (Anthropic's error list: 504 is `timeout_error`).
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
import weakref

from mitmproxy import http

from . import exchange, interrupt, relay

logger = logging.getLogger("llm_gateway.timeouts")

RETRY = {"x-should-retry": "true"}  # the SDKs retry a 504 anyway; this says so explicitly


def timeout_answer(message: str) -> http.Response:
    return interrupt.native_answer("timeout_error", message, RETRY)


def end_with_error(flow: http.HTTPFlow, ex: exchange.Exchange, reason: str, error_type: str, message: str,
                   headers: dict[str, str] | None = None) -> str:
    """End `flow` early with a native error (HTTP answer or stream frame); returns what `interrupt` did."""
    ex.reason = reason
    done = interrupt.end_early(
        flow, interrupt.native_answer(error_type, message, headers), interrupt.error_frame(error_type, message)
    )
    logger.warning(f"{reason}: {ex.host}{ex.path.split('?', 1)[0]!r} ({ex.client}, session {ex.session}): {done}")
    return done


class Timeouts:
    def __init__(self) -> None:
        self._tasks: weakref.WeakKeyDictionary[http.HTTPFlow, asyncio.Task] = weakref.WeakKeyDictionary()
        self._headers: weakref.WeakKeyDictionary[http.HTTPFlow, asyncio.Event] = weakref.WeakKeyDictionary()

    def request(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or flow.response or flow in self._tasks:
            return
        self._headers[flow] = asyncio.Event()
        self._tasks[flow] = asyncio.get_running_loop().create_task(self._watch(flow, ex))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if (headers := self._headers.get(flow)) is not None:
            headers.set()

    def response(self, flow: http.HTTPFlow) -> None:
        self._forget(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._forget(flow)

    def done(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()

    def _forget(self, flow: http.HTTPFlow) -> None:
        task = self._tasks.pop(flow, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _watch(self, flow: http.HTTPFlow, ex: exchange.Exchange) -> None:
        limits = ex.rules.timeouts
        try:
            try:
                await asyncio.wait_for(self._headers[flow].wait(), limits.first_byte)
            except asyncio.TimeoutError:
                if flow.response is None and flow.live:
                    end_with_error(
                        flow, ex, "first_byte_timeout", "timeout_error",
                        f"The upstream sent no response within {limits.first_byte:g} s (gateway timeouts.first_byte).",
                        RETRY,
                    )
                return
            await self._watch_body(flow, ex, limits.stream_idle)
        except asyncio.CancelledError:
            pass
        except Exception:  # a watcher must never cost the exchange
            logger.exception("timeout watcher")

    async def _watch_body(self, flow: http.HTTPFlow, ex: exchange.Exchange, idle: float) -> None:
        """Until the body ends (the task is cancelled then): end it after `idle` seconds without a chunk."""
        seen, last = -1, time.monotonic()
        while flow.live:
            stream = relay.of(flow)
            if stream is None and flow.response is not None and flow.response.stream:
                return  # streamed untouched (an unknown encoding): no clock on its chunks, and no way to end it well
            if stream is not None:
                last = stream.last_chunk  # the relay stamps every chunk: sleep exactly until the deadline
                step = last + idle - time.monotonic()
            else:  # buffered: watch mitmproxy's body buffer grow
                layer = interrupt.find_stream(flow)
                size = len(layer.response_body_buf) if layer is not None else seen
                if size != seen:
                    seen, last = size, time.monotonic()
                step = min(last + idle - time.monotonic(), max(idle / 10, 0.05), 1.0)
            if last + idle <= time.monotonic():
                end_with_error(
                    flow, ex, "stream_idle_timeout", "timeout_error",
                    f"The upstream sent nothing for {idle:g} s in the middle of its answer "
                    "(gateway timeouts.stream_idle).",
                    RETRY,
                )
                return
            await asyncio.sleep(max(step, 0.01))
