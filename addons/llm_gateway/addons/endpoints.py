"""The gateway's own answers for the platform: probes and the Prometheus exposition.

    GET /-/healthz   200 while the process and its event loop run               (liveness probe)
    GET /-/ready     200 once rules are loaded; 503 before, and while draining  (readiness probe)
    GET /-/metrics   Prometheus text exposition (also GET /metrics on the port)  (scrape target)

Served on a port of their own (`gateway_metrics_port`, off by default), which a NetworkPolicy can open
to Prometheus and the kubelet only, and on the base-URL (reverse) listener (`gateway_status_paths`):
the Anthropic API has no paths under /-/. Never in egress mode, where a path belongs to the host the
agent asked for. The port runs on mitmproxy's own event loop, so a stuck loop fails liveness too.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from mitmproxy import ctx, http

from llm_gateway.pipeline.flows import proxy_mode
from llm_gateway.protocol.hosts import path_of

if TYPE_CHECKING:
    from llm_gateway.addons.metrics import Metrics
    from llm_gateway.addons.rulefile import RuleFile

logger = logging.getLogger("llm_gateway.endpoints")

HEALTHZ, READY, METRICS = "/-/healthz", "/-/ready", "/-/metrics"
PATHS = (HEALTHZ, READY, METRICS)
READ_TIMEOUT = 5.0  # seconds for a request head on the metrics port
TEXT = "text/plain; charset=utf-8"


class Endpoints:
    def __init__(self, rule_file: RuleFile, metrics: Metrics, drain: Any = None) -> None:
        self.rule_file = rule_file
        self.drain = drain  # a Drain: not ready while it drains
        self.metrics = metrics
        self.address: tuple[str, int] | None = None
        self._task: asyncio.Task | None = None
        self._running = False

    def load(self, loader) -> None:
        loader.add_option(
            "gateway_metrics_port", int, 0,
            "Port answering /-/metrics (Prometheus), /-/ready and /-/healthz (Kubernetes probes); 0: off.",
        )
        loader.add_option(
            "gateway_metrics_host", str, "127.0.0.1",
            "Address the metrics port binds to (0.0.0.0 inside a container).",
        )
        loader.add_option(
            "gateway_status_paths", bool, True,
            "Also answer GET /-/ready, /-/healthz and /-/metrics on the base-URL (reverse) listener.",
        )

    def configure(self, updated: set[str]) -> None:
        if self._running and {"gateway_metrics_port", "gateway_metrics_host"} & updated:
            self._start()

    def running(self) -> None:
        self._running = True
        self._start()

    def done(self) -> None:
        self._running = False
        self._stop()

    # -- what each path says -----------------------------------------------------------------------

    def answer(
        self, method: str, target: str, *, accept: str | None = None, port: bool = False
    ) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request; `accept` picks the exposition format."""
        path = path_of(target)
        if path not in PATHS and not (port and path == "/metrics"):
            return 404, TEXT, b"not found: the gateway answers /-/healthz, /-/ready and /-/metrics\n"
        if method not in ("GET", "HEAD"):
            return 405, TEXT, b"method not allowed\n"
        if path == HEALTHZ:
            return 200, TEXT, b"ok\n"
        if path == READY:
            if self.drain is not None and self.drain.draining:
                return 503, TEXT, b"not ready: draining for shutdown\n"
            if self.rule_file.loaded:
                return 200, TEXT, f"ready: rules from {self.rule_file.path}\n".encode()
            return 503, TEXT, b"not ready: no rules loaded\n"
        return 200, *self.metrics.exposition(accept)

    # -- on the base-URL listener --------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not ctx.options.gateway_status_paths:
            return
        if path_of(flow.request.path) not in PATHS or proxy_mode(flow) != "reverse":
            return
        request = flow.request
        status, content_type, body = self.answer(request.method, request.path, accept=request.headers.get("accept"))
        flow.response = http.Response.make(
            status, b"" if request.method == "HEAD" else body,
            {"content-type": content_type, "cache-control": "no-store"},
        )

    # -- on a port of its own ------------------------------------------------------------------------

    def _start(self) -> None:
        self._stop()
        port, host = ctx.options.gateway_metrics_port, ctx.options.gateway_metrics_host
        if not port:
            return
        try:
            sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as e:
            logger.error(f"metrics port: cannot listen at {host}:{port}: {e.strerror or e}")
            return
        sock.setblocking(False)
        self.address = sock.getsockname()[:2]
        self._task = asyncio.get_running_loop().create_task(self._serve(sock))
        shown = f"[{host}]" if ":" in host else host
        logger.info(f"metrics and probes listening at http://{shown}:{self.address[1]}{METRICS} {READY} {HEALTHZ}")

    def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
            self.address = None

    async def _serve(self, sock: socket.socket) -> None:
        try:
            server = await asyncio.start_server(self._handle, sock=sock)
            async with server:
                await server.serve_forever()
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("metrics port")
        finally:
            sock.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _version = request_line.split(" ", 2)
            headers = dict(line.split(":", 1) for line in header_lines if ":" in line)
            accept = next((v.strip() for k, v in headers.items() if k.strip().lower() == "accept"), None)
            status, content_type, body = self.answer(method, target, accept=accept, port=True)
            writer.write(
                f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
                + (b"" if method == "HEAD" else body)
            )
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            pass  # a scanner, a half-open connection, a request that is not HTTP: nothing to answer
        except Exception:
            logger.exception("metrics port")
        finally:
            writer.close()
