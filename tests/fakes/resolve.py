"""A test-only mitmproxy script: made-up host names resolve to loopback addresses (tests have no DNS).

    mitmdump -s addons/gateway.py -s tests/fakes/resolve.py   with   LLM_GATEWAY_TEST_HOSTS="tunnel.test=127.0.0.1"

An entry may also move the port (`api.anthropic.com=127.0.0.1:8443`), to watch for connections to a host.

It acts in `server_connect`, after the gateway's egress policy has judged the name and just before mitmproxy
opens the connection: where DNS would act. Names match exactly (no case folding, no trailing-dot stripping),
so a test also shows that the gateway connects to the normal form of the name it judged. The mapping comes
from the environment, so the gateway needs no option that exists only for tests.
"""

from __future__ import annotations

import logging
import os

from mitmproxy.proxy import server_hooks

logger = logging.getLogger("llm_gateway.test_resolve")
ENV = "LLM_GATEWAY_TEST_HOSTS"


def parse(text: str) -> dict[str, tuple[str, int | None]]:
    hosts = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, address = item.partition("=")
        ip, _, port = address.partition(":")
        hosts[name] = (ip, int(port) if port else None)
    return hosts


class Resolve:
    def __init__(self) -> None:
        self.hosts = parse(os.environ.get(ENV, ""))

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        address = data.server.address
        if data.server.error:  # killed by the gateway: leave its log line as it is
            return
        if address and address[0] in self.hosts:
            ip, port = self.hosts[address[0]]
            data.server.address = (ip, port or address[1])
            logger.info(f"test resolver: {address[0]}:{address[1]} -> {ip}:{port or address[1]}")


addons = [Resolve()]
