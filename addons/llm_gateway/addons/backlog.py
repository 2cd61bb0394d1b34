"""A deeper listen queue for mitmproxy's listeners, so that a burst of new connections is not dropped.

mitmproxy 12 opens its TCP listeners with `asyncio.start_server(handler, host, port)`
(`mitmproxy/proxy/mode_servers.py`, `AsyncioServerInstance.listen`), whose `backlog` defaults to 100,
and has no option for it. When more than 100 connections arrive before the event loop accepts them
(a cluster's agents reconnecting at once, a load test), the kernel drops the SYNs past the queue and
each of those clients waits for TCP's retransmission, one second and more, before it gets in.

Linux lets `listen()` be called again on a listening socket to change its queue length, so this
concern does that on every TCP listener mitmproxy runs, each time its set of listeners changes (start-up,
a `mode` change): `gateway_listen_backlog` (default 4096; the kernel caps it at
`net.core.somaxconn`, 4096 on current kernels; 0 leaves mitmproxy's 100). It reads the listeners
through mitmproxy's `proxyserver` addon and the private `_servers` list of its server instances; when
a mitmproxy release changes those, it logs a warning and changes nothing.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx

from llm_gateway.mitm import server

logger = logging.getLogger("llm_gateway.backlog")

DEFAULT_BACKLOG = 4096


class ListenBacklog:
    def __init__(self) -> None:
        self._watching = None  # the proxyserver whose changes we follow

    def load(self, loader) -> None:
        loader.add_option(
            "gateway_listen_backlog",
            int,
            DEFAULT_BACKLOG,
            "Listen queue length of mitmproxy's TCP listeners (mitmproxy's own is 100; the kernel caps it at "
            "net.core.somaxconn). A burst of more new connections than this waits for TCP's one-second retry. "
            "0: leave mitmproxy's.",
        )

    def running(self) -> None:
        proxyserver = server.find_proxyserver()
        if proxyserver is None:
            return
        if self._watching is not proxyserver:
            self._watching = proxyserver
            server.on_listeners_changed(proxyserver, self.apply)  # held weakly by mitmproxy: we keep ourselves
        self.apply()

    def configure(self, updated: set[str]) -> None:
        if "gateway_listen_backlog" in updated and self._watching is not None:
            self.apply()

    def apply(self) -> None:
        """Set the backlog on every listener now running. Never raises: the listeners work without it."""
        backlog = ctx.options.gateway_listen_backlog
        if backlog <= 0 or self._watching is None:
            return
        try:
            socks = server.listening_sockets(self._watching)
            for sock in socks:
                server.set_backlog(sock, backlog)
        except Exception as e:  # a mitmproxy whose internals moved, a socket closing under us
            logger.warning(f"cannot set the listen backlog to {backlog}: {e}; mitmproxy's own (100) stays")
            return
        if socks:
            logger.debug(f"listen backlog {backlog} on {len(socks)} listener(s)")
