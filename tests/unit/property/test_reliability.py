"""Unit tests of the reliability parts: rule keys, the relay's early end, capped and lean request bodies,
the drain's answers. The behaviour through a real mitmdump is in test_e2e_timeouts/drain/bodies.py."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import taddons

from gwtest import BASE_RULES, api_flow, forward, read_body, rule_file
from llm_gateway.pipeline import exchange
from llm_gateway.pipeline import answer as pipeline_answer
from llm_gateway.protocol import leanjson
from llm_gateway.pipeline import relay
from llm_gateway.policy import rules
from llm_gateway.protocol import sse
from llm_gateway.protocol import errors
from llm_gateway.mitm.layers import CappedBody
from llm_gateway.addons.drain import Drain
from llm_gateway.addons.timeouts import Timeouts
from llm_gateway.addons.endpoints import Endpoints
from llm_gateway.addons.metrics import Metrics
from llm_gateway.addons.routing import ApiRouter
from llm_gateway.pipeline.streamreader import StreamReader
from llm_gateway.pipeline.record import build_record


@pytest.fixture(autouse=True)
def tctx():
    with taddons.context() as ctx:
        yield ctx


# -- rule keys ------------------------------------------------------------------------------------------------


def test_rule_keys_and_defaults():
    default = rules.parse(BASE_RULES)
    assert (default.timeouts.first_byte, default.timeouts.stream_idle) == (300, 120)
    assert default.limits.request_body == 32 * 1024 * 1024
    custom = rules.parse(BASE_RULES + "timeouts: {first_byte: 2.5}\nlimits: {request_body: 1m}\n")
    assert (custom.timeouts.first_byte, custom.timeouts.stream_idle) == (2.5, 120)
    assert custom.limits.request_body == 1024 * 1024
    assert rules.parse("limits: {request_body: 1000}").limits.request_body == 1000


@pytest.mark.parametrize("text, reason", [
    ("timeouts: {first_byte: 0}", "timeouts.first_byte must be more than 0"),
    ("timeouts: {stream_idle: -1}", "timeouts.stream_idle must be a non-negative number"),
    ("timeouts: {stream_idle: soon}", "timeouts.stream_idle must be a non-negative number"),
    ("timeouts: {connect: 3}", "unknown key 'connect' in timeouts"),
    ("\nlimits: {request_body: lots}", "limits.request_body must be a size"),
    ("limits: {request_body: 0}", "limits.request_body must be a size"),
])
def test_bad_rule_keys_are_refused_with_file_and_line(text, reason):
    with pytest.raises(rules.RulesError) as e:
        rules.parse(text, "r.yaml")
    assert reason in str(e.value) and str(e.value).startswith("r.yaml:")


# -- the relay's early end ---------------------------------------------------------------------------------------


def streaming_exchange():
    router = ApiRouter(rule_file())
    f = api_flow(b'{"model":"claude-x","stream":true,"max_tokens":5,"messages":[]}')
    router.requestheaders(f)
    router.request(f)
    read_body(f)
    ex = exchange.of(f)
    ex.sse_taps.append(StreamReader(ex))
    return f, ex


def test_interrupted_stream_drops_the_half_event_and_appends_the_frame():
    f, ex = streaming_exchange()
    r = relay.SSERelay(ex, None)
    start = sse.encode("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 3}}})
    half = b'event: content_block_delta\ndata: {"type":"content_blo'
    frame = pipeline_answer.error_frame("timeout_error", "silent upstream")
    sent = r(start + half)
    r.interrupt(frame)
    tail = r(b"")
    assert (b"".join(sent) if isinstance(sent, list) else sent) == start
    assert tail == frame, "the half event is dropped, the frame appended whole"
    assert ex.error_type == "timeout_error" and ex.complete is False and ex.usage == {"input_tokens": 3}
    assert json.loads(frame.split(b"data: ", 1)[1]) == errors.error_body("timeout_error", "silent upstream")


def test_relay_stamps_every_chunk():
    _, ex = streaming_exchange()
    r = relay.SSERelay(ex, None)
    first = r.last_chunk
    forward(r, [b"event: ping\ndata: {}\n\n"])
    assert r.last_chunk >= first


def test_answers_are_native():
    answer = pipeline_answer.native_answer("timeout_error", "late", {"x-should-retry": "true"})
    assert answer.status_code == 504 and answer.headers["x-should-retry"] == "true"
    assert errors.is_native_error(json.loads(answer.content))


# -- request bodies ---------------------------------------------------------------------------------------------


def test_capped_body_keeps_nothing_past_the_limit():
    body = CappedBody(10)
    body += b"12345"
    body += b"678"
    assert bytes(body) == b"12345678" and not body.refused
    body += b"901"
    assert body.refused and bytes(body) == b"" and len(body) == 0
    body += b"x" * 100
    assert bytes(body) == b"" and body.received == 111
    declared = CappedBody(10, refused=True)
    declared += b"abc"
    assert bytes(declared) == b""


def large_request(**extra) -> dict:
    turns = [{"role": "user", "content": [{"type": "text", "text": "x" * 1000 + f' "{i}" ]}}'}]} for i in range(5000)]
    return {"model": "claude-x", "max_tokens": 5, **extra, "messages": turns}


@pytest.mark.parametrize("indent", [None, 1])
def test_lean_body_reads_the_small_fields_only(indent):
    request = large_request(stream=False, metadata={"user_id": 'u"1'}, system=[{"type": "text", "text": "sys"}])
    data = json.dumps(request, indent=indent).encode()
    assert len(data) > leanjson.LEAN_ABOVE
    lean = leanjson.parse_request_body(data)
    assert isinstance(lean, leanjson.LeanBody) and lean.omitted == {"messages"}
    assert dict(lean) == {k: v for k, v in request.items() if k != "messages"}
    assert json.loads(lean.with_stream(data, True)) == {**request, "stream": True}


def test_lean_body_adds_a_missing_stream_flag_and_refuses_what_is_not_an_object():
    request = large_request()
    data = json.dumps(request).encode()
    assert json.loads(leanjson.parse(data).with_stream(data, False)) == {**request, "stream": False}
    assert json.loads(leanjson.parse(b"{ }").with_stream(b"{ }", True)) == {"stream": True}
    for bad in (b"[1, 2]", b'{"a": 1', b'{"a": 1} tail', b'{"a" 1}', b'{"a": [1}', b'{"a": "x}'):
        assert leanjson.parse(bad) is None, bad
    small = b'{"model": "m", "stream": true}'
    assert leanjson.parse_request_body(small) == {"model": "m", "stream": True}
    assert not isinstance(leanjson.parse_request_body(small), leanjson.LeanBody)


# -- drain and records --------------------------------------------------------------------------------------------


def test_drain_answers_new_requests_and_turns_not_ready():
    drain = Drain(Timeouts())
    endpoints = Endpoints(rule_file(), Metrics(), drain)
    assert endpoints.answer("GET", "/-/ready")[0] == 200
    drain.draining = True
    status, _, body = endpoints.answer("GET", "/-/ready")
    assert status == 503 and b"draining" in body
    router = ApiRouter(rule_file())
    api = api_flow()
    router.requestheaders(api)
    drain.requestheaders(api)
    assert api.response.status_code == 529 and api.response.headers["retry-after"]
    assert json.loads(api.response.content)["error"]["type"] == "overloaded_error"
    assert exchange.of(api).reason == "shutdown"
    other = api_flow(host="example.com")
    drain.requestheaders(other)
    assert other.response.status_code == 503


def test_record_says_why_an_exchange_ended_early():
    f, ex = streaming_exchange()
    assert build_record(f, ex, ex.started)["reason"] is None
    ex.reason = "stream_idle_timeout"
    assert build_record(f, ex, ex.started)["reason"] == "stream_idle_timeout"
    metrics = Metrics()
    metrics.observe(ex, 200)
    assert b'llm_gateway_ended_early_total{reason="stream_idle_timeout"} 1.0' in metrics.exposition()[1]


def test_deployment_gives_the_drain_time_and_open_files():
    from e2e import test_deploy

    pod = test_deploy.deployment()["spec"]["template"]["spec"]
    [prestop_sleep] = [int(a) for a in test_deploy.container()["lifecycle"]["preStop"]["exec"]["command"] if a.isdigit()]
    grace = int(test_deploy.env()["LLM_GATEWAY_DRAIN_GRACE"])
    with taddons.context(Drain(Timeouts())) as ctx:
        assert grace == ctx.options.gateway_drain_grace  # the option's default, as the docs say
    assert pod["terminationGracePeriodSeconds"] > prestop_sleep + grace
    assert int(test_deploy.env()["LLM_GATEWAY_NOFILE"]) >= 65536


# -- the idle watcher -------------------------------------------------------------------------------------------


async def test_idle_watcher_ends_a_silent_relayed_stream_only(monkeypatch):
    import asyncio
    import time

    from mitmproxy.test import tflow

    from llm_gateway.addons import timeouts

    fired = []
    monkeypatch.setattr(timeouts, "end_with_error", lambda flow, ex, reason, *a, **k: fired.append(reason))
    f, ex = streaming_exchange()
    f.response = tflow.tresp()
    f.live = True
    f.response.stream = relay.SSERelay(ex, None)
    watcher = timeouts.Timeouts()
    loop = asyncio.get_running_loop()
    started = loop.time()
    watcher._watch_body(f, ex, 0.2, -1, time.monotonic())
    while not fired and loop.time() - started < 2:
        await asyncio.sleep(0.01)
    assert fired == ["stream_idle_timeout"] and loop.time() - started >= 0.19
    assert watcher._timers == {}  # the flow is let go once it is ended

    fired.clear()
    f.response.stream = True  # streamed untouched: no chunk clock, so never ended for silence
    watcher._watch_body(f, ex, 0.05, -1, time.monotonic())
    await asyncio.sleep(0.2)
    assert fired == [] and watcher._timers == {}
