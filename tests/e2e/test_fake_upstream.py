"""The fake Anthropic upstream, checked with the real Anthropic SDK (and raw HTTP where the SDK hides things)."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import anthropic
import pytest
from anthropic.types import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes.upstream import DEFAULT_TEXT, DEFAULT_USAGE, FakeUpstream, Scenario, litellm_wrapped_error, message_to_events

ROOT = Path(__file__).resolve().parents[2]
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def fake():
    with FakeUpstream() as f:
        yield f


@pytest.fixture(autouse=True)
def _clean(fake):
    fake.clear()
    yield
    fake.clear()


@pytest.fixture
def client(fake):
    return anthropic.Anthropic(base_url=fake.url, api_key="sk-ant-test", max_retries=0, timeout=20)


def dump(m) -> dict:
    """A Message (SDK object or dict) as a plain dict, without the fields that are None."""
    if isinstance(m, dict):
        m = Message.model_validate(m)
    return m.model_dump(exclude_none=True, mode="json")


def post(fake, body: dict, *, path="/v1/messages", headers=None, timeout=20):
    """A raw POST with http.client: returns (response, body bytes), body left undecoded."""
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=timeout)
    conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


def sse_events(data: bytes) -> list[tuple[str, dict]]:
    out = []
    for frame in data.decode().split("\n\n"):
        if not frame.strip():
            continue
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


# ------------------------------------------------------------------------------------------ default answer
def test_default_json(fake, client):
    msg = client.messages.create(model="claude-test-1", max_tokens=16, messages=HELLO)
    assert msg.id.startswith("msg_")
    assert msg.model == "claude-test-1"
    assert msg.content[0].type == "text" and msg.content[0].text == DEFAULT_TEXT
    assert msg.stop_reason == "end_turn"
    u = msg.usage
    assert (u.input_tokens, u.output_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens) == (21, 9, 7, 13)
    assert u.cache_creation.ephemeral_5m_input_tokens == 7 and u.cache_creation.ephemeral_1h_input_tokens == 0
    assert u.service_tier == "standard"
    assert dump(msg) == dump(fake.last_message)
    assert fake.last_message["usage"] == DEFAULT_USAGE

    [req] = fake.requests
    assert req.method == "POST" and req.path == "/v1/messages"
    key = req.headers.get("x-api-key") or req.headers["authorization"].removeprefix("Bearer ")  # SDK 2.x: Bearer
    assert key == "sk-ant-test"
    assert req.headers["ANTHROPIC-VERSION"] == req.headers["anthropic-version"]
    assert "anthropic-version" in req.headers
    assert json.loads(req.body) == req.json and req.json["model"] == "claude-test-1"
    assert req.status == 200 and req.request_id.startswith("req_") and req.wait_finished(5) and req.done
    assert req.message == fake.last_message


def test_default_stream_events_and_headers(fake):
    resp, data = post(fake, {"model": "m", "max_tokens": 5, "stream": True, "messages": HELLO})
    assert resp.status == 200
    assert resp.getheader("content-type").startswith("text/event-stream")
    assert resp.getheader("transfer-encoding") == "chunked"
    assert resp.getheader("request-id").startswith("req_")
    events = sse_events(data)
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-4:] == ["content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert all(n == d["type"] for n, d in events)
    start = events[0][1]["message"]
    assert start["usage"]["output_tokens"] == 1 and start["usage"]["input_tokens"] == 21
    assert start["content"] == [] and start["stop_reason"] is None
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == DEFAULT_TEXT
    delta = events[-2][1]
    assert delta["usage"] == {"input_tokens": 21, "cache_creation_input_tokens": 7, "cache_read_input_tokens": 13, "output_tokens": 9}
    assert delta["delta"]["stop_reason"] == "end_turn"


def test_default_stream_with_sdk(fake, client):
    with client.messages.stream(model="claude-test-2", max_tokens=16, messages=HELLO) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == DEFAULT_TEXT
    assert dump(final) == dump(fake.last_message)
    assert fake.requests[0].json["stream"] is True
    assert final.usage.output_tokens == 9 and final.usage.cache_read_input_tokens == 13


def test_prefix_and_query_are_ignored(fake, client):
    c = anthropic.Anthropic(base_url=fake.url + "/anthropic", api_key="k", max_retries=0)
    msg = c.messages.create(model="m", max_tokens=5, messages=HELLO, extra_query={"beta": "true"})
    assert msg.content[0].text == DEFAULT_TEXT
    assert fake.requests[0].path == "/anthropic/v1/messages?beta=true"
    assert fake.requests[0].path_only == "/anthropic/v1/messages" and fake.requests[0].query == "beta=true"


def test_count_tokens(fake, client):
    assert client.messages.count_tokens(model="m", messages=HELLO).input_tokens == 21
    fake.script(Scenario.error(529))  # the queue is for Messages requests: count_tokens leaves it alone
    assert client.messages.count_tokens(model="m", messages=HELLO).input_tokens == 21
    assert fake.pending == 1
    resp, data = post(fake, {"model": "m", "messages": HELLO}, path="/v1/messages/count_tokens",
                      headers={"x-fake-scenario": json.dumps({"usage": {"input_tokens": 1234}})})
    assert json.loads(data) == {"input_tokens": 1234}


@pytest.mark.parametrize("method,path", [("POST", "/v1/complete"), ("GET", "/v1/models"), ("GET", "/"), ("GET", "/v1/messages")])
def test_other_paths_are_native_404(fake, method, path):
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    conn.request(method, path, body=b"{}" if method == "POST" else None)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 404
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert body["request_id"] == resp.getheader("request-id")


# ------------------------------------------------------------------------------------------ every block type
BLOCKS = {
    "text": {"type": "text", "text": "Plain text, with unicode: héllo ✓ 🎉"},
    "text_citations": {
        "type": "text",
        "text": "The sky is blue.",
        "citations": [
            {
                "type": "web_search_result_location",
                "url": "https://example.com/sky",
                "title": "Sky",
                "encrypted_index": "EpMBCioIAhgB",
                "cited_text": "The sky is blue",
            }
        ],
    },
    "tool_use": {
        "type": "tool_use",
        "id": "toolu_01Fake",
        "name": "get_weather",
        "input": {"location": "San Francisco, CA", "unit": "celsius", "days": [1, 2, 3], "deep": {"a": None, "b": True}},
    },
    "tool_use_empty": {"type": "tool_use", "id": "toolu_02Fake", "name": "noop", "input": {}},
    "thinking": {"type": "thinking", "thinking": "Let me think about this step by step.", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"},
    "redacted_thinking": {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpP"},
    "server_tool_use": {"type": "server_tool_use", "id": "srvtoolu_01Fake", "name": "web_search", "input": {"query": "weather in Paris"}},
    "web_search_tool_result": {
        "type": "web_search_tool_result",
        "tool_use_id": "srvtoolu_01Fake",
        "content": [
            {"type": "web_search_result", "url": "https://example.com/paris", "title": "Paris weather",
             "encrypted_content": "EqgfCioIARgBIiQ3YTAwMjY1Mi1", "page_age": "April 30, 2025"}
        ],
    },
}
MIXED = [BLOCKS[k] for k in ("thinking", "redacted_thinking", "server_tool_use", "web_search_tool_result",
                             "text_citations", "text", "tool_use", "tool_use_empty")]


@pytest.mark.parametrize("name", [*BLOCKS, "mixed"])
def test_every_block_type_json_and_stream(fake, client, name):
    content = MIXED if name == "mixed" else [BLOCKS[name]]
    usage = {"input_tokens": 100, "output_tokens": 50, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2000,
             "server_tool_use": {"web_search_requests": 1, "web_fetch_requests": 0}}
    fake.script(Scenario.reply(*content, usage=usage), Scenario.reply(*content, usage=usage))

    created = client.messages.create(model="m", max_tokens=100, messages=HELLO)
    served_json = fake.last_message
    assert dump(created) == dump(served_json)
    assert [b["type"] for b in served_json["content"]] == [b["type"] for b in content]

    with client.messages.stream(model="m", max_tokens=100, messages=HELLO) as s:
        final = s.get_final_message()
    served = fake.last_message
    assert dump(final) == dump(served)
    assert served["content"] == content
    assert served["usage"]["cache_read_input_tokens"] == 2000 and served["usage"]["server_tool_use"]["web_search_requests"] == 1
    assert served["usage"]["cache_creation"] == {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}
    assert served["stop_reason"] == ("tool_use" if any(b["type"] == "tool_use" for b in content) else "end_turn")


def test_stream_shapes_of_special_blocks(fake):
    fake.script(Scenario.reply(BLOCKS["thinking"], BLOCKS["tool_use"], BLOCKS["redacted_thinking"], json_chunk_size=5))
    _, data = post(fake, {"model": "m", "stream": True, "messages": HELLO})
    events = sse_events(data)
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert starts[0] == {"type": "thinking", "thinking": "", "signature": ""}
    assert starts[1]["input"] == {}
    assert starts[2] == BLOCKS["redacted_thinking"]
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert {"type": "signature_delta", "signature": BLOCKS["thinking"]["signature"]} in deltas
    partial = [d["partial_json"] for d in deltas if d["type"] == "input_json_delta"]
    assert partial[0] == "" and all(len(p) <= 5 for p in partial)
    assert json.loads("".join(partial)) == BLOCKS["tool_use"]["input"]


def test_custom_usage_and_message_fields(fake, client):
    fake.script(Scenario(text="custom", usage={"input_tokens": 5, "output_tokens": 6, "cache_creation_input_tokens": 70,
                                               "cache_read_input_tokens": 80, "service_tier": "priority"},
                         model="claude-forced", stop_reason="max_tokens", message_id="msg_custom"))
    msg = client.messages.create(model="m", max_tokens=5, messages=HELLO)
    assert msg.id == "msg_custom" and msg.model == "claude-forced" and msg.stop_reason == "max_tokens"
    assert msg.content[0].text == "custom"
    assert (msg.usage.input_tokens, msg.usage.output_tokens, msg.usage.cache_creation_input_tokens,
            msg.usage.cache_read_input_tokens) == (5, 6, 70, 80)
    assert msg.usage.cache_creation.ephemeral_5m_input_tokens == 70
    assert msg.usage.service_tier == "priority"


def test_delta_usage_output_only_still_accumulates(fake, client):
    fake.script(Scenario(delta_usage="output", usage={"input_tokens": 3, "output_tokens": 44}))
    _, data = post(fake, {"model": "m", "stream": True, "messages": HELLO})
    assert sse_events(data)[-2][1]["usage"] == {"output_tokens": 44}
    fake.script(Scenario(delta_usage="output", usage={"input_tokens": 3, "output_tokens": 44}))
    with client.messages.stream(model="m", max_tokens=5, messages=HELLO) as s:
        final = s.get_final_message()
    assert final.usage.input_tokens == 3 and final.usage.output_tokens == 44


def test_forced_stream_and_forced_json(fake):
    fake.script(Scenario(stream=True), Scenario(stream=False))
    resp, data = post(fake, {"model": "m", "messages": HELLO})
    assert resp.getheader("content-type").startswith("text/event-stream") and sse_events(data)[-1][0] == "message_stop"
    resp, data = post(fake, {"model": "m", "stream": True, "messages": HELLO})
    assert resp.getheader("content-type") == "application/json" and json.loads(data)["type"] == "message"


# -------------------------------------------------------------------------------------- property: round trip
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_json_val = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | _text,
                         lambda c: st.lists(c, max_size=3) | st.dictionaries(_text, c, max_size=3), max_leaves=8)
_block = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, _text.filter(bool)),
    st.builds(lambda i, n, inp: {"type": "tool_use", "id": "toolu_" + i, "name": n, "input": inp},
              st.text("abcdef0123", min_size=4, max_size=8), st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
              st.dictionaries(_text, _json_val, max_size=4)),
    st.builds(lambda t, s: {"type": "thinking", "thinking": t, "signature": s}, _text, st.text("ABCxyz0189+/", min_size=1, max_size=30)),
    st.builds(lambda d: {"type": "redacted_thinking", "data": d}, st.text("ABCxyz0189+/", min_size=1, max_size=30)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.lists(_block, min_size=1, max_size=5), chunk=st.sampled_from([None, 1, 3, 17]),
       out=st.integers(0, 10**6), inp=st.integers(0, 10**6))
def test_property_stream_accumulates_to_served_message(fake, client, content, chunk, out, inp):
    fake.clear()
    fake.script(Scenario(content=content, chunk_size=chunk, json_chunk_size=chunk or 7,
                         usage={"input_tokens": inp, "output_tokens": out}))
    with client.messages.stream(model="m", max_tokens=5, messages=HELLO) as s:
        final = s.get_final_message()
    assert dump(final) == dump(fake.last_message)
    assert fake.last_message["content"] == content


def test_message_to_events_is_pure():
    msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [BLOCKS["text"]],
           "stop_reason": "end_turn", "stop_sequence": None, "usage": dict(DEFAULT_USAGE)}
    events = list(message_to_events(msg))
    assert [n for n, _ in events][0] == "message_start" and events[-1][0] == "message_stop"
    assert msg["content"] == [BLOCKS["text"]]  # not mutated


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "status,etype,cls",
    [
        (400, "invalid_request_error", anthropic.BadRequestError),
        (401, "authentication_error", anthropic.AuthenticationError),
        (402, "billing_error", anthropic.APIStatusError),
        (403, "permission_error", anthropic.PermissionDeniedError),
        (404, "not_found_error", anthropic.NotFoundError),
        (409, "conflict_error", anthropic.ConflictError),
        (413, "request_too_large", anthropic.APIStatusError),
        (429, "rate_limit_error", anthropic.RateLimitError),
        (500, "api_error", anthropic.InternalServerError),
        (504, "timeout_error", anthropic.InternalServerError),
        (529, "overloaded_error", anthropic.OverloadedError),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_native_errors(fake, client, status, etype, cls, stream):
    fake.script(Scenario.error(status, retry_after=7, should_retry=False, ratelimit={"requests-remaining": 0}))
    with pytest.raises(cls) as ei:
        if stream:
            with client.messages.stream(model="m", max_tokens=5, messages=HELLO) as s:
                s.get_final_message()
        else:
            client.messages.create(model="m", max_tokens=5, messages=HELLO)
    e = ei.value
    assert e.status_code == status and e.type == etype
    assert e.request_id and e.request_id.startswith("req_") and e.request_id == fake.requests[-1].request_id
    assert e.body["request_id"] == e.request_id and e.body["error"]["type"] == etype
    h = e.response.headers
    assert h["retry-after"] == "7" and h["x-should-retry"] == "false" and h["anthropic-ratelimit-requests-remaining"] == "0"
    assert h["content-type"] == "application/json"


def test_error_custom_type_message_and_request_id(fake, client):
    fake.script(Scenario.error(500, "overloaded_error", "Overloaded (as a 500)", request_id="req_custom"))
    with pytest.raises(anthropic.InternalServerError) as ei:
        client.messages.create(model="m", max_tokens=5, messages=HELLO)
    assert ei.value.type == "overloaded_error" and ei.value.request_id == "req_custom"
    assert ei.value.body["error"]["message"] == "Overloaded (as a 500)"


def test_sdk_retries_then_succeeds(fake):
    fake.script(Scenario.error(529, retry_after_ms=10), Scenario.error(429, retry_after=0))
    c = anthropic.Anthropic(base_url=fake.url, api_key="k", max_retries=2)
    assert c.messages.create(model="m", max_tokens=5, messages=HELLO).content[0].text == DEFAULT_TEXT
    assert [r.status for r in fake.requests] == [529, 429, 200]
    assert [r.headers["x-stainless-retry-count"] for r in fake.requests] == ["0", "1", "2"]


def test_should_retry_false_is_obeyed_by_sdk(fake):
    fake.script(Scenario.error(529, should_retry=False))
    c = anthropic.Anthropic(base_url=fake.url, api_key="k", max_retries=2)
    with pytest.raises(anthropic.OverloadedError):
        c.messages.create(model="m", max_tokens=5, messages=HELLO)
    assert len(fake.requests) == 1


def test_midstream_error(fake, client):
    fake.script(Scenario(error_after=4))
    with pytest.raises(anthropic.APIStatusError) as ei:
        with client.messages.stream(model="m", max_tokens=5, messages=HELLO) as s:
            s.get_final_message()
    assert ei.value.status_code == 200 and ei.value.type == "overloaded_error"

    fake.script(Scenario(error_after=2, stream_error={"type": "api_error", "message": "boom"}))
    resp, data = post(fake, {"model": "m", "stream": True, "messages": HELLO})
    events = sse_events(data)
    assert [n for n, _ in events] == ["message_start", "ping", "error"]
    assert events[-1][1]["error"] == {"type": "api_error", "message": "boom"}
    assert events[-1][1]["request_id"] == resp.getheader("request-id")


# ------------------------------------------------------------------------------------------ raw answers
def test_raw_html_502(fake, client):
    html = "<html><head><title>502 Bad Gateway</title></head><body>bad gateway</body></html>"
    fake.script(Scenario.raw(502, html, content_type="text/html", request_id=""))
    with pytest.raises(anthropic.InternalServerError) as ei:
        client.messages.create(model="m", max_tokens=5, messages=HELLO)
    assert ei.value.status_code == 502 and ei.value.body == html and ei.value.request_id is None
    assert ei.value.response.headers["content-type"] == "text/html"


def test_raw_text_503_and_exact_headers(fake):
    fake.script(Scenario.raw(503, "upstream connect error or disconnect/reset before headers",
                             headers=[("server", "envoy"), ("x-dup", "1"), ("x-dup", "2")], request_id=""))
    resp, data = post(fake, {"model": "m", "messages": HELLO})
    assert resp.status == 503 and data == b"upstream connect error or disconnect/reset before headers"
    assert resp.getheader("content-type") == "text/plain; charset=utf-8"
    assert resp.msg.get_all("x-dup") == ["1", "2"] and resp.getheader("request-id") is None


def test_raw_bytes_body(fake):
    fake.script(Scenario.raw(200, b"\x00\x01binary", content_type="application/octet-stream"))
    resp, data = post(fake, {"model": "m"})
    assert data == b"\x00\x01binary"


@pytest.mark.parametrize("stream", [False, True])
def test_litellm_envelope(fake, client, stream):
    fake.script(litellm_wrapped_error(429, stream=stream))
    with pytest.raises(anthropic.RateLimitError) as ei:
        client.messages.create(model="m", max_tokens=5, messages=HELLO)
    env = ei.value.body["error"]
    assert env["type"] == "None" and env["code"] == "429" and ei.value.request_id is None
    inner = env["message"]
    if stream:
        import ast
        assert inner.startswith("b'")
        inner = ast.literal_eval(inner).decode()
    assert json.loads(inner)["error"]["type"] == "rate_limit_error"


# ------------------------------------------------------------------------------------------ header selection
def test_header_wins_over_queue_and_does_not_consume_it(fake, client):
    fake.script(Scenario(text="from the queue"))
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(model="m", max_tokens=5, messages=HELLO,
                               extra_headers={"x-fake-scenario": Scenario.error(429).to_header()})
    assert fake.pending == 1
    assert client.messages.create(model="m", max_tokens=5, messages=HELLO).content[0].text == "from the queue"
    assert fake.pending == 0
    assert client.messages.create(model="m", max_tokens=5, messages=HELLO).content[0].text == DEFAULT_TEXT


def test_header_scenario_from_plain_json(fake):
    resp, data = post(fake, {"model": "m", "messages": HELLO},
                      headers={"x-fake-scenario": json.dumps({"content": [BLOCKS["tool_use"]], "usage": {"output_tokens": 77}})})
    body = json.loads(data)
    assert body["content"] == [BLOCKS["tool_use"]] and body["usage"]["output_tokens"] == 77 and body["stop_reason"] == "tool_use"


def test_bad_header_scenario_is_a_clear_500(fake):
    resp, data = post(fake, {"model": "m"}, headers={"x-fake-scenario": '{"no_such_field": 1}'})
    assert resp.status == 500 and b"no_such_field" in data


def test_script_is_fifo_and_accepts_dicts(fake, client):
    fake.script({"text": "one"}, Scenario(text="two"), {"status": 529})
    assert client.messages.create(model="m", max_tokens=5, messages=HELLO).content[0].text == "one"
    assert client.messages.create(model="m", max_tokens=5, messages=HELLO).content[0].text == "two"
    with pytest.raises(anthropic.OverloadedError):
        client.messages.create(model="m", max_tokens=5, messages=HELLO)
    assert client.messages.create(model="m", max_tokens=5, messages=HELLO).content[0].text == DEFAULT_TEXT


def test_scenario_dict_round_trip():
    s = Scenario(status=502, body=b"\xffraw", headers={"a": "b"}, delay=0.5)
    assert Scenario.from_dict(json.loads(s.to_header())).to_dict() == s.to_dict()
    with pytest.raises(ValueError):
        Scenario.from_dict({"bogus": 1})


# ------------------------------------------------------------------------------------------ gzip
def test_gzip_json(fake, client):
    fake.script(Scenario(gzip=True), Scenario(gzip=True))
    msg = client.messages.create(model="m", max_tokens=5, messages=HELLO)
    assert dump(msg) == dump(fake.last_message)
    resp, data = post(fake, {"model": "m"})
    assert resp.getheader("content-encoding") == "gzip"
    assert int(resp.getheader("content-length")) == len(data)
    assert json.loads(gzip.decompress(data))["content"][0]["text"] == DEFAULT_TEXT


def test_gzip_error(fake, client):
    fake.script(Scenario.error(529, gzip=True))
    with pytest.raises(anthropic.OverloadedError) as ei:
        client.messages.create(model="m", max_tokens=5, messages=HELLO)
    assert ei.value.type == "overloaded_error"


def test_gzip_sse_with_sdk(fake, client):
    fake.script(Scenario(content=MIXED, gzip=True))
    with client.messages.stream(model="m", max_tokens=5, messages=HELLO) as s:
        final = s.get_final_message()
    assert dump(final) == dump(fake.last_message)


def test_gzip_sse_is_flushed_per_event(fake):
    """Each event can be decoded as soon as it arrives: a real streaming gzip, not a buffered one."""
    fake.script(Scenario(gzip=True, event_delay=0.1))
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
    conn.request("POST", "/v1/messages", body=json.dumps({"model": "m", "stream": True}))
    resp = conn.getresponse()
    assert resp.getheader("content-encoding") == "gzip"
    d = zlib.decompressobj(31)
    first = d.decompress(resp.read1(65536))  # without a flush per event this would decode to b""
    assert first.startswith(b"event: message_start\n") and b"message_stop" not in first
    rest = first + d.decompress(resp.read()) + d.flush()
    assert d.eof  # the gzip stream was finished properly
    assert sse_events(rest)[-1][0] == "message_stop"
    conn.close()


# ------------------------------------------------------------------------------------------ broken streams
def test_truncated_stream_ends_cleanly_without_message_stop(fake, client):
    fake.script(Scenario(truncate_after=5))
    resp, data = post(fake, {"model": "m", "stream": True})  # http.client raises IncompleteRead if not clean
    names = [n for n, _ in sse_events(data)]
    assert len(names) == 5 and "message_stop" not in names
    assert fake.requests[-1].wait_finished(5) and fake.requests[-1].done

    fake.script(Scenario(truncate_after=5, gzip=True))
    resp, data = post(fake, {"model": "m", "stream": True})
    assert len(sse_events(gzip.decompress(data))) == 5

    fake.script(Scenario(truncate_after=4))
    with client.messages.stream(model="m", max_tokens=5, messages=HELLO) as s:
        events = [e.type for e in s]
    assert "message_stop" not in events and "message_delta" not in events


@pytest.mark.parametrize("gz", [False, True])
def test_abort_mid_stream(fake, client, gz):
    fake.script(Scenario(abort_after=3, gzip=gz))
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
    conn.request("POST", "/v1/messages", body=json.dumps({"model": "m", "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead):
        resp.read()

    fake.script(Scenario(abort_after=3, gzip=gz))
    with pytest.raises(Exception) as ei:
        with client.messages.stream(model="m", max_tokens=5, messages=HELLO) as s:
            s.get_final_message()
    assert not isinstance(ei.value, anthropic.APIStatusError)


def test_abort_mid_json_body(fake, client):
    fake.script(Scenario(abort_after=20))
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
    conn.request("POST", "/v1/messages", body=json.dumps({"model": "m"}))
    resp = conn.getresponse()
    with pytest.raises(http.client.IncompleteRead) as ei:
        resp.read()
    assert len(ei.value.partial) == 20


# ------------------------------------------------------------------------------------------ timing
def test_delay_before_headers_and_sdk_timeout(fake):
    fake.script(Scenario(delay=0.4))
    t0 = time.monotonic()
    resp, _ = post(fake, {"model": "m"})
    assert time.monotonic() - t0 >= 0.4 and resp.status == 200

    fake.script(Scenario(delay=3))
    c = anthropic.Anthropic(base_url=fake.url, api_key="k", max_retries=0, timeout=0.3)
    with pytest.raises(anthropic.APITimeoutError):
        c.messages.create(model="m", max_tokens=5, messages=HELLO)


def test_event_delay(fake, client):
    fake.script(Scenario(event_delay=0.05))
    t0 = time.monotonic()
    with client.messages.stream(model="m", max_tokens=5, messages=HELLO) as s:
        s.get_final_message()
    n_events = 5 + len(DEFAULT_TEXT.split())  # start, ping, block start, deltas, block stop, delta, stop
    assert time.monotonic() - t0 >= 0.05 * (n_events + 1) - 0.05


def test_hang_times_out_and_stop_releases_it():
    with FakeUpstream() as f:
        f.script(Scenario(hang=True))
        c = anthropic.Anthropic(base_url=f.url, api_key="k", max_retries=0, timeout=0.5)
        with pytest.raises(anthropic.APITimeoutError):
            c.messages.create(model="m", max_tokens=5, messages=HELLO)
        # a second hanging request, left waiting while we stop
        result = {}

        def call():
            try:
                anthropic.Anthropic(base_url=f.url, api_key="k", max_retries=0, timeout=30).messages.create(
                    model="m", max_tokens=5, messages=HELLO, extra_headers={"x-fake-scenario": '{"hang": true}'})
            except Exception as e:  # noqa: BLE001
                result["e"] = e

        t = threading.Thread(target=call)
        t.start()
        f.wait_for_requests(2)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 3
    t.join(5)
    assert isinstance(result.get("e"), anthropic.APIConnectionError)


# ------------------------------------------------------------------------------------------ big streams
def test_burst(fake, client):
    fake.script(Scenario(burst=500))
    _, data = post(fake, {"model": "m", "stream": True})
    deltas = [d for n, d in sse_events(data) if n == "content_block_delta"]
    assert len(deltas) == 500
    fake.script(Scenario(burst=500))
    with client.messages.stream(model="m", max_tokens=5, messages=HELLO) as s:
        final = s.get_final_message()
    assert final.content[0].text.split() == [f"w{i}" for i in range(500)]
    assert final.usage.output_tokens == 500
    assert dump(final) == dump(fake.last_message)


@pytest.mark.parametrize("gz", [False, True])
def test_sized_stream(fake, gz):
    size = 3_000_000
    fake.script(Scenario(stream_bytes=size, gzip=gz))
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=30)
    conn.request("POST", "/v1/messages", body=json.dumps({"model": "m", "stream": True}))
    resp = conn.getresponse()
    d = zlib.decompressobj(31) if gz else None
    total, tail = 0, b""
    while chunk := resp.read1(1 << 16):
        if d:
            chunk = d.decompress(chunk)
        total += len(chunk)
        tail = (tail + chunk)[-4096:]
    conn.close()
    assert size * 0.97 <= total <= size * 1.03
    assert tail.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    rec = fake.requests[-1]
    assert rec.wait_finished(5) and rec.done and rec.message["usage"]["output_tokens"] > 1000
    if gz:
        assert rec.bytes_sent < total / 2


def test_sized_json(fake):
    fake.script(Scenario(stream_bytes=1_000_000))
    resp, data = post(fake, {"model": "m"})
    body = json.loads(data)
    assert 0.97e6 <= len(data) <= 1.03e6
    assert len(body["content"][0]["text"]) > 900_000 and body["usage"] == fake.last_message["usage"]


# ------------------------------------------------------------------------------------------ server behaviour
def test_keep_alive_serves_several_requests_on_one_connection(fake):
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
    for stream in (False, True, False):
        conn.request("POST", "/v1/messages", body=json.dumps({"model": "m", "stream": stream}))
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200 and not resp.will_close
    sock = conn.sock
    conn.request("POST", "/v1/messages", body=json.dumps({"model": "m"}))
    conn.getresponse().read()
    assert conn.sock is sock
    conn.close()


def test_chunked_request_body(fake):
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
    conn.request("POST", "/v1/messages", body=iter([b'{"model": ', b'"chunky"}']), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert json.loads(resp.read())["model"] == "chunky"
    assert fake.requests[-1].json == {"model": "chunky"}


def test_concurrent_requests_are_all_recorded(fake):
    errors = []

    def worker(i):
        try:
            c = anthropic.Anthropic(base_url=fake.url, api_key="k", max_retries=0)
            if i % 2:
                with c.messages.stream(model=f"m{i}", max_tokens=5, messages=HELLO) as s:
                    assert s.get_final_message().model == f"m{i}"
            else:
                assert c.messages.create(model=f"m{i}", max_tokens=5, messages=HELLO).model == f"m{i}"
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(r.json["model"] for r in fake.requests) == sorted(f"m{i}" for i in range(24))
    assert len({r.request_id for r in fake.requests}) == 24


def test_standalone_cli():
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fakes" / "upstream.py"), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.split()[-1]
        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, timeout=10)
        assert c.messages.create(model="m", max_tokens=5, messages=HELLO).content[0].text == DEFAULT_TEXT
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_stop_closes_idle_keep_alive_connections():
    f = FakeUpstream().start()
    conn = http.client.HTTPConnection("127.0.0.1", f.port, timeout=5)
    conn.request("POST", "/v1/messages", body=b"{}")
    conn.getresponse().read()
    t0 = time.monotonic()
    f.stop()
    assert time.monotonic() - t0 < 2
    assert conn.sock.recv(1) == b""  # the server closed it
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", f.port), timeout=1).close()


# ------------------------------------------------------------------------------------------ cache accounting


def test_cache_accounting_answers_in_json_and_in_streams():
    """With CacheAccounting the prompt token counts come from the emulated cache, the same in both forms; a
    scenario's own usage still wins."""
    from fakes.upstream import CacheAccounting

    system = [{"type": "text", "text": "rules " * 1200, "cache_control": {"type": "ephemeral"}}]
    with FakeUpstream(cache=CacheAccounting(ttl_5m=0.5)) as fake:
        client = anthropic.Anthropic(base_url=fake.url, api_key="sk-ant-test", max_retries=0, timeout=20)
        first = client.messages.create(model="claude-test-1", max_tokens=5, system=system, messages=HELLO).usage
        assert first.cache_read_input_tokens == 0 and first.cache_creation_input_tokens > 1024
        assert first.cache_creation.ephemeral_5m_input_tokens == first.cache_creation_input_tokens
        with client.messages.stream(model="claude-test-1", max_tokens=5, system=system, messages=HELLO) as stream:
            second = stream.get_final_message().usage
        assert second.cache_read_input_tokens == first.cache_creation_input_tokens
        assert second.cache_creation_input_tokens == 0 and second.input_tokens == first.input_tokens
        resp, data = post(fake, {"model": "claude-test-1", "max_tokens": 5, "system": system, "messages": HELLO,
                                 "stream": True})
        start = sse_events(data)[0][1]["message"]["usage"]
        assert start["cache_read_input_tokens"] == second.cache_read_input_tokens  # in message_start too
        time.sleep(0.7)  # past the TTL
        third = client.messages.create(model="claude-test-1", max_tokens=5, system=system, messages=HELLO).usage
        assert third.cache_read_input_tokens == 0 and third.cache_creation_input_tokens > 0
        fake.script(Scenario(usage={"cache_read_input_tokens": 5}))
        scripted = client.messages.create(model="claude-test-1", max_tokens=5, system=system, messages=HELLO).usage
        assert scripted.cache_read_input_tokens == 5 and scripted.cache_creation_input_tokens == 0
