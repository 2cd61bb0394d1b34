"""An API exchange is freed as soon as its flow is, not by a later garbage collection: its taps hold it
and it holds its taps, and such a cycle, with the parsed request and answer inside, is promoted to the
oldest generation and kept until a full collection (issue 18's profile)."""

from __future__ import annotations

import gc
import json
import weakref

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow

from gwtest import forward, rule_file
from llm_gateway.pipeline import exchange
from llm_gateway.protocol import jsoncodec
from llm_gateway.protocol import messages
from llm_gateway.addons.answer import AnswerPipeline
from llm_gateway.addons.recordlog import RecordLog
from llm_gateway.addons.routing import ApiRouter
from llm_gateway.addons.streams import StreamPreference
from llm_gateway.addons.usage import Usage

MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "stop_reason": "end_turn",
           "stop_sequence": None, "content": [{"type": "text", "text": "hi"}],
           "usage": {"input_tokens": 3, "output_tokens": 2}}


def run_exchange(addons, stream: bool) -> weakref.ref:
    def hook(name, f):
        for addon in addons:
            fn = getattr(addon, name, None)
            if fn:
                fn(f)

    # tutils.treq builds a request with a reference cycle of its own; a flow as mitmproxy makes one has none
    f = http.HTTPFlow(tflow.tclient_conn(), tflow.tserver_conn())
    f.client_conn.proxy_mode = ProxyMode.parse("regular")
    f.request = http.Request.make("POST", "https://api.anthropic.com/v1/messages", json.dumps(
        {"model": "claude-x", "max_tokens": 5, "stream": stream, "messages": []}), {"content-type": "application/json"})
    hook("requestheaders", f)
    hook("request", f)
    if stream:
        f.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
        hook("responseheaders", f)
        assert b"message_stop" in forward(f.response.stream, [messages.message_to_sse(MESSAGE)])
    else:
        f.response = http.Response.make(200, jsoncodec.dumps(MESSAGE), {"content-type": "application/json"})
        hook("responseheaders", f)
    hook("response", f)
    ex = exchange.of(f)
    assert ex.recorded and ex.sse_taps  # the taps were on it
    return weakref.ref(f), weakref.ref(ex)


def test_exchange_is_freed_with_its_flow_without_a_garbage_collection(tmp_path):
    records = RecordLog()
    rf = rule_file()
    addons = [rf, records, ApiRouter(rf), StreamPreference(), AnswerPipeline(), Usage(records)]
    with taddons.context(*addons) as tctx:
        tctx.configure(records, gateway_log=str(tmp_path / "usage.jsonl"))
        gc.disable()
        try:
            for stream in (False, True):
                flow, ex = run_exchange(addons, stream)
                # The flow may sit in garbage of mitmproxy's own (a caught TypeError's traceback holds the
                # frames above it): one collection frees it. The exchange must go with it, not wait for
                # another collection as a cycle of its own.
                gc.collect()
                assert flow() is None, "the flow itself is kept alive: the test proves nothing"
                assert ex() is None, f"exchange kept alive after its flow (stream={stream})"
        finally:
            gc.enable()
        records.done()
