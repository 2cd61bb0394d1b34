"""mitmproxy's servers and connections, reached through its `proxyserver` addon: the listening sockets (for a
deeper listen queue, addons/backlog.py) and closing listeners and idle connections (the drain, addons/drain.py).

`proxyserver.servers` and `proxyserver.connections` are mitmproxy's own bookkeeping, not an addon API; the
private `_servers` of a server instance holds its asyncio servers. tests/unit/mitm/test_contract.py asserts each
exists on the installed mitmproxy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx

logger = logging.getLogger("llm_gateway.drain")


def find_proxyserver() -> Any | None:
    """mitmproxy's `proxyserver` addon, where it runs with its server bookkeeping; else None (tests, tools)."""
    found = ctx.master.addons.get("proxyserver")
    return found if found is not None and hasattr(found, "servers") else None


def on_listeners_changed(proxyserver: Any, callback: Callable[[], Any]) -> None:
    """Call `callback` whenever mitmproxy starts or stops a listener (its server manager's `changed` signal,
    which holds the callback weakly: its owner must stay alive)."""
    proxyserver.servers.changed.connect(callback)


def listening_sockets(proxyserver) -> list:
    """The listening TCP sockets (asyncio's TransportSocket wrappers) of mitmproxy's running servers."""
    found = []
    for instance in proxyserver.servers:
        for server in getattr(instance, "_servers", None) or ():
            if isinstance(server, asyncio.Server):
                found.extend(server.sockets)
    return found


def set_backlog(sock, backlog: int) -> None:
    """`listen(backlog)` again on a listening socket: a duplicate of its descriptor reaches the same socket."""
    with sock.dup() as dup:  # a socket.socket of its own, closed after; the listener stays open
        dup.listen(backlog)


async def close_listeners() -> None:
    """Stop every listener (the listening sockets only; connections already open stay)."""
    proxyserver = find_proxyserver()
    for instance in list(proxyserver.servers if proxyserver else ()):
        try:
            await instance.stop()
        except Exception as e:  # one listener that will not close must not keep the others open
            logger.warning(f"cannot close a listener: {e}")


async def close_connections(wait: float = 2.0) -> None:
    """Close the client connections left (idle keep-alive ones) and let their handlers end (up to `wait`
    seconds), rather than have the shutdown cancel them mid-wait (Python 3.12.1's asyncio then prints a
    traceback per connection)."""
    proxyserver = find_proxyserver()
    if proxyserver is None:
        return
    for handler in list(proxyserver.connections.values()):
        io = handler.transports.get(handler.client)
        if io is not None and io.handler is not None:
            io.handler.cancel("gateway draining")
    deadline = time.monotonic() + wait
    while proxyserver.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
