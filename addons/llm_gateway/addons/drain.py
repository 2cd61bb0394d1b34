"""Graceful drain: on SIGTERM or SIGINT, finish the exchanges in flight instead of cutting them.

mitmdump exits at once on SIGTERM (mitmproxy/tools/main.py calls `master.shutdown`), which cuts every stream in
flight: each cut turn is paid again by its agent. Kubernetes sends SIGTERM on every rolling update, so this
replaces that handler (`running` comes after mitmdump installs its own) with a drain:

1. at once: `/-/ready` answers 503 (Kubernetes takes the replica out of the Service) and the listeners close
   (a new connection is refused; agents' SDKs retry a refused connection on another replica);
2. a new request on a connection that was already open gets a native 529 `overloaded_error` with
   `retry-after` and `connection: close` (API flows; other requests get a plain 503), so the agent retries;
3. exchanges in flight run to their end; the process exits 0 when the last one ends, or
4. at the deadline (`gateway_drain_grace` seconds, default 25, below the Deployment's
   terminationGracePeriodSeconds): each exchange still running gets a native error (a 529 if nothing was sent
   yet, else an `event: error` frame `overloaded_error` after the events already relayed), its record is
   written with `complete: false` and `reason: "shutdown"`, then the process exits 0.

A second signal during the drain exits at once, as mitmdump would have done on the first; the exchanges it
cuts are recorded with `reason: "shutdown"` too.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import weakref
from typing import TYPE_CHECKING

from mitmproxy import ctx, http

from llm_gateway.mitm import layers, server
from llm_gateway.pipeline import exchange
from llm_gateway.pipeline.answer import native_answer

if TYPE_CHECKING:
    from llm_gateway.addons.timeouts import Timeouts

logger = logging.getLogger("llm_gateway.drain")

RETRY_AFTER = "5"  # seconds: the time another replica needs to be the one the Service sends to
SETTLE = 3.0  # seconds for the exchanges ended at the deadline to pass their hooks and write their records


class Drain:
    def __init__(self, timeouts: Timeouts) -> None:
        self.timeouts = timeouts  # ends the exchanges still running at the deadline
        self.draining = False
        self.deadline: float | None = None
        self._live: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self._quiet = asyncio.Event()
        self._task: asyncio.Task | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "gateway_drain_grace", int, 25,
            "Seconds a SIGTERM/SIGINT drain lets exchanges in flight finish before ending them with a native "
            "error and exiting (keep it below the pod's terminationGracePeriodSeconds).",
        )

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.begin)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests), no signals here
                return

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()

    # -- the flows in flight -------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        if self.draining:
            self.refuse(flow)
        else:
            self._live.add(flow)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if self.draining and not flow.response:
            self.refuse(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def _ended(self, flow: http.HTTPFlow) -> None:
        self._live.discard(flow)
        if self.draining and not self.in_flight():
            self._quiet.set()

    def in_flight(self) -> list[http.HTTPFlow]:
        return [flow for flow in self._live if flow.live]

    def refuse(self, flow: http.HTTPFlow) -> None:
        """Answer a request that arrived during the drain: native 529 for API flows, a plain 503 otherwise."""
        headers = {"retry-after": RETRY_AFTER, "connection": "close", "x-should-retry": "true"}
        ex = exchange.of(flow)
        if ex is not None:
            ex.stop("shutdown")
            flow.response = native_answer(
                "overloaded_error", "This gateway replica is shutting down; retry (another replica will answer).",
                headers,
            )
        else:
            flow.response = http.Response.make(503, b"gateway shutting down\n", {"content-type": "text/plain", **headers})

    # -- the drain -----------------------------------------------------------------------------------

    def begin(self) -> None:
        """The signal handler: start draining; a second signal exits at once."""
        if self.draining:
            flows = self.in_flight()
            for flow in flows:  # cut by the exit, not by their client or upstream: the records say so
                ex = exchange.of(flow)
                if ex is not None:
                    ex.stop("shutdown")
            logger.warning(f"second signal during the drain: exiting now, cutting {len(flows)} exchanges")
            ctx.master.shutdown()
            return
        self.draining = True
        grace = ctx.options.gateway_drain_grace
        self.deadline = time.monotonic() + grace
        logger.warning(
            f"draining: not ready, listeners closed, {len(self.in_flight())} exchanges in flight; "
            f"exit when they end or in {grace} s"
        )
        self._task = asyncio.get_running_loop().create_task(self._drain(grace))

    async def _drain(self, grace: float) -> None:
        try:
            await server.close_listeners()
            if self.in_flight():
                try:
                    await asyncio.wait_for(self._quiet.wait(), grace)
                except asyncio.TimeoutError:
                    await self._end_the_rest()
            await server.close_connections()
            logger.info("drain finished: exiting")
        except asyncio.CancelledError:
            return
        except Exception:
            logger.exception("drain failed: exiting")
        ctx.master.shutdown()

    async def _end_the_rest(self) -> None:
        flows = self.in_flight()
        logger.warning(f"drain deadline: ending {len(flows)} exchanges still running")
        for flow in flows:
            ex = exchange.of(flow)
            if ex is None:
                layers.close_upstream(flow)
                continue
            self.timeouts.end_with_error(
                flow, ex, "shutdown", "overloaded_error",
                "The gateway replica shut down before the answer ended; retry (another replica will answer).",
                {"retry-after": RETRY_AFTER, "x-should-retry": "true"},
            )
        try:
            await asyncio.wait_for(self._quiet.wait(), SETTLE)
        except asyncio.TimeoutError:
            logger.warning(f"{len(self.in_flight())} exchanges did not end after the deadline")
