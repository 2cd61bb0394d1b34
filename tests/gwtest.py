"""Small helpers for unit tests of the addons: rules from text, flows in either mode."""

from __future__ import annotations

import asyncio
import inspect
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow, tutils

from llm_gateway.policy import rules
from llm_gateway.addons.rulefile import RuleFile

BASE_RULES = """\
apis:
  - name: anthropic
    hosts: [api.anthropic.com]
    paths: ["/v1/messages", "/v1/messages/*", "/anthropic/v1/messages"]
"""


def rule_file(text: str = BASE_RULES) -> RuleFile:
    rf = RuleFile()
    rf.rules = rules.parse(text, "test-rules.yaml")
    rf.loaded = True
    return rf


def api_flow(
    body: bytes = b'{"model":"claude-x","max_tokens":5,"messages":[]}',
    *,
    mode: str = "regular",
    host: str = "api.anthropic.com",
    path: str = "/v1/messages",
    headers: dict[str, str] | None = None,
    resp: bool = False,
):
    req = tutils.treq(
        scheme=b"https", host=host, port=443, path=path.encode(), method=b"POST", content=body,
        headers=((b"content-type", b"application/json"),),
    )
    for k, v in (headers or {}).items():
        req.headers[k] = v
    f = tflow.tflow(req=req, resp=resp)
    f.client_conn.proxy_mode = ProxyMode.parse("reverse:https://api.anthropic.com" if mode == "reverse" else "regular")
    return f


def forward(stream, chunks) -> bytes:
    """What a stream callable sends for `chunks` and the final b"": b"" must never appear (it would end a
    chunked body early); an empty list means "nothing yet"."""
    out = []
    for chunk in [*chunks, b""]:
        sent = stream(chunk)
        assert sent != b"", "b'' would end a chunked body early"
        out.append(b"".join(sent) if isinstance(sent, list) else sent)
    return b"".join(out)


def flow_addons(rf: RuleFile) -> list:
    """gateway.py's addons (app.default_addons), in its order, less the ones that act on the whole process
    or need mitmproxy's running event loop (the timer, the log filter, the open-file limit, the listen queue, the head bound, the warm-up): what a test that
    calls the flow hooks itself drives. The first two are always `rf` and the RecordLog."""
    from llm_gateway.addons.backlog import ListenBacklog
    from llm_gateway.addons.batching import ChunkBatching
    from llm_gateway.app import default_addons
    from llm_gateway.addons.fdlimit import OpenFileLimit
    from llm_gateway.addons.gatewaylog import GatewayLog
    from llm_gateway.addons.heads import HeadLimit
    from llm_gateway.addons.timeouts import Timeouts
    from llm_gateway.addons.warmup import Warmup

    process_wide = (Timeouts, GatewayLog, OpenFileLimit, ListenBacklog, ChunkBatching, HeadLimit, Warmup)
    return [a for a in default_addons(rf) if not isinstance(a, process_wide)]


def call(fn: Any, *args: Any) -> None:
    """Call one hook as mitmproxy would: an async one (BodyLimit.request) is run to its end."""
    result = fn(*args)
    if not inspect.isawaitable(result):
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop running here: run it on a new one
        asyncio.run(result)
        return
    with ThreadPoolExecutor(1) as pool:  # inside an async test: on a loop of its own, in a thread
        pool.submit(asyncio.run, result).result()


def read_body(flow: Any) -> None:
    """What `BodyLimit.request` does after routing: the request body read (bounded) into `ex.body`."""
    from llm_gateway.addons.bodies import BodyLimit

    call(BodyLimit().request, flow)
