"""The open-file limit: one log line per second with a count, instead of a traceback per refused accept.

Each client connection costs the gateway two file descriptors (client and upstream sockets), plus a few for
the process. At the limit (RLIMIT_NOFILE), asyncio's accept loop reports every failed `accept()` to the loop's
exception handler, which mitmproxy logs with a full traceback: 11,484 of them in ten seconds at `ulimit -n 256`.
This wraps that handler: EMFILE/ENFILE errors are counted and reported once a second; everything else goes on
to mitmproxy's handler. At start the soft limit is raised to the hard limit (as Go's runtime does), so a
container whose runtime sets a generous hard limit gets it without a wrapper script.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
from typing import Any, Callable

logger = logging.getLogger("llm_gateway.fdlimit")

EXHAUSTED = (errno.EMFILE, errno.ENFILE)
REPORT_EVERY = 1.0  # seconds


def raise_soft_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit where it is lower; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            logger.info(f"open-file limit raised from {soft} to {hard}")
            soft = hard
        except (ValueError, OSError) as e:
            logger.warning(f"cannot raise the open-file limit from {soft} to {hard}: {e}")
    return soft, hard


class OpenFileLimit:
    def __init__(self) -> None:
        self.refused = 0  # accepts refused since the last report
        self.total = 0
        self._previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], Any] | None = None
        self._report: asyncio.TimerHandle | None = None
        self.limit = 0

    def running(self) -> None:
        self.limit, _ = raise_soft_limit()
        loop = asyncio.get_running_loop()
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self.handle)

    def done(self) -> None:
        if self._report is not None:
            self._report.cancel()

    def handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in EXHAUSTED:
            self.refused += 1
            self.total += 1
            if self._report is None:
                self._report = loop.call_later(REPORT_EVERY, self.report)
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def report(self) -> None:
        self._report = None
        if self.refused:
            logger.warning(
                f"open-file limit ({self.limit}) reached: accept() failed {self.refused} times in the last "
                f"{REPORT_EVERY:g} s ({self.total} since start); new connections wait or are refused. Raise the "
                "limit (ulimit -n, the container's nofile): each connection needs two"
            )
            self.refused = 0
