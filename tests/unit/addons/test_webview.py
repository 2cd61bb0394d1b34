"""mitmweb aids: the message contentview, the bounded stream copy, and flow comments and markers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy import contentviews, exceptions, flow as mflow, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.contentviews import Metadata
from mitmproxy.test import taddons, tutils

from gwtest import api_flow, forward, read_body, rule_file
from llm_gateway.pipeline import exchange
from llm_gateway.protocol import sse
from llm_gateway.protocol import errors
from llm_gateway.protocol import jsoncodec
from llm_gateway.protocol import messages
from llm_gateway.addons import webview
from llm_gateway.pipeline import flows
from llm_gateway.addons.routing import ApiRouter
from llm_gateway.addons.streams import StreamPreference
from llm_gateway.addons.answer import AnswerPipeline
from llm_gateway.addons.webview import MessageView, StreamCopyTap, WebView

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "sse"
SSE = "text/event-stream"

USAGE = {
    "input_tokens": 21,
    "cache_creation_input_tokens": 7,
    "cache_read_input_tokens": 13,
    "cache_creation": {"ephemeral_5m_input_tokens": 7, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 9,
    "server_tool_use": {"web_search_requests": 1},
}

# One block of every kind the API sends, plus one it may send in the future.
BLOCKS = [
    {"type": "thinking", "thinking": "The user wants the weather.\nCheck Paris first.", "signature": "c2lnbmF0dXJl"},
    {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"},
    {
        "type": "text",
        "text": "Paris is sunny.",
        "citations": [{"type": "web_search_result_location", "cited_text": "sunny all day", "url": "https://w.example/p"}],
    },
    {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris", "days": [1, 2]}},
    {"type": "server_tool_use", "id": "srvtoolu_01B", "name": "web_search", "input": {"query": "paris weather"}},
    {
        "type": "web_search_tool_result",
        "tool_use_id": "srvtoolu_01B",
        "content": [{"type": "web_search_result", "url": "https://w.example/p", "title": "Paris forecast"}],
    },
    {"type": "mcp_tool_use", "id": "mcptoolu_01C", "name": "lookup", "server_name": "docs", "input": {"q": "x"}},
    {"type": "mcp_tool_result", "tool_use_id": "mcptoolu_01C", "is_error": False, "content": [{"type": "text", "text": "found it"}]},
    {"type": "future_block", "payload": {"answer": 42}},
]
MESSAGE = {
    "id": "msg_01XYZ",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": BLOCKS,
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": USAGE,
}


def response_meta(content_type: str | None, flow=None) -> Metadata:
    resp = tutils.tresp(headers=http.Headers(content_type=content_type) if content_type else http.Headers())
    return Metadata(flow=flow, content_type=content_type, http_message=resp)


def view_text(data: bytes, content_type: str | None = SSE, flow=None) -> str:
    return MessageView().prettify(data, response_meta(content_type, flow))


# --- the contentview ------------------------------------------------------------------------------


def test_every_block_kind_is_readable():
    text = view_text(messages.message_to_sse(MESSAGE))
    lines = text.splitlines()
    assert lines[0] == "assistant message msg_01XYZ · model claude-sonnet-4-5"
    assert lines[1] == "stop reason: tool_use"
    assert lines[2:5] == [
        "tokens: input 21 · output 9",
        "cache: read 13 · write 7 (5m 7, 1h 0) · hit 32%",
        "server tools: web_search_requests 1",
    ]
    # thinking: the whole text, and only the size of the signature
    assert "── [0] thinking\nThe user wants the weather.\nCheck Paris first.\n  (signature: 12 chars)" in text
    assert "c2lnbmF0dXJl" not in text
    assert f"── [1] redacted_thinking\n(redacted: {len(BLOCKS[1]['data'])} chars of encrypted thinking)" in text
    assert "── [2] text\nParis is sunny.\n  cited: 'sunny all day' (https://w.example/p)" in text
    # tool calls: name, id, and the input as indented JSON
    tool = text.split("── [3] tool_use get_weather (toolu_01A)\n", 1)[1].split("\n\n", 1)[0]
    assert json.loads(tool) == {"city": "Paris", "days": [1, 2]} and '\n  "city": "Paris"' in tool
    server = text.split("── [4] server_tool_use web_search (srvtoolu_01B)\n", 1)[1].split("\n\n", 1)[0]
    assert json.loads(server) == {"query": "paris weather"}
    result = text.split("── [5] web_search_tool_result for srvtoolu_01B\n", 1)[1].split("\n\n", 1)[0]
    assert json.loads(result) == BLOCKS[5]["content"]
    mcp = text.split("── [6] mcp_tool_use lookup (mcptoolu_01C)\n", 1)[1].split("\n\n", 1)[0]
    assert mcp.splitlines()[-1] == '  {"server_name":"docs"}' and json.loads(mcp.rsplit("\n", 1)[0]) == {"q": "x"}
    assert "── [7] mcp_tool_result for mcptoolu_01C\n" in text and '"text": "found it"' in text
    assert text.endswith('── [8] future_block\n  {"payload":{"answer":42}}')


def test_json_and_stream_of_one_message_read_the_same():
    as_json = view_text(jsoncodec.dumps(MESSAGE), "application/json")
    assert as_json == view_text(messages.message_to_sse(MESSAGE))
    assert "stream" not in as_json.splitlines()[0]


def test_fake_upstream_style_stream_with_pings_and_split_deltas():
    from fakes.upstream import Scenario, build_message, message_to_events, sse_frame

    spec = Scenario.reply(*BLOCKS[:4], usage={"cache_read_input_tokens": 0}, chunk_size=3, json_chunk_size=4)
    msg = build_message(spec, {"model": "claude-x"}, "msg_fake")
    body = b"".join(sse_frame(name, data) for name, data in message_to_events(msg, spec))
    text = view_text(body)
    assert "── [2] text\nParis is sunny." in text and "cache: read 0 · write 7 (5m 7, 1h 0) · hit 0%" in text


def test_stop_sequence_details_and_extra_fields_are_shown():
    message = dict(MESSAGE, content=[{"type": "text", "text": "hi"}], stop_reason="stop_sequence", stop_sequence="END",
                   stop_details={"type": "refusal"}, container={"id": "cont_1"})
    text = view_text(jsoncodec.dumps(message), "application/json")
    assert "stop reason: stop_sequence (stop sequence 'END')" in text
    assert 'stop details: {"type":"refusal"}' in text and 'container: {"id":"cont_1"}' in text


def test_incomplete_stream_says_so():
    events = messages.message_to_events(MESSAGE)
    cut = b"".join(sse.encode(name, data) for name, data in events[:8])  # a few blocks, no message_stop
    text = view_text(cut)
    assert text.splitlines()[0] == "stream INCOMPLETE: it ended before message_stop"
    assert "── [0] thinking" in text and "stop reason: None" in text


def test_stream_error_event_is_shown_with_what_came_before():
    events = messages.message_to_events(dict(MESSAGE, content=[{"type": "text", "text": "half an answ"}]))[:3]
    body = b"".join(sse.encode(n, d) for n, d in events) + sse.encode("error", errors.error_body("overloaded_error", "Overloaded"))
    text = view_text(body)
    assert text.splitlines()[0] == "stream error: overloaded_error: Overloaded"
    assert "half an answ" in text


def test_error_only_stream():
    text = view_text(sse.encode("error", errors.error_body("rate_limit_error", "slow down")))
    assert text == "stream error: rate_limit_error: slow down"


def test_malformed_events_are_reported():
    body = messages.message_to_sse(dict(MESSAGE, content=[{"type": "text", "text": "ok"}]))
    body = body.replace(b"event: message_stop", b'event: content_block_delta\ndata: {"type":"content_block_delta","index":7,"delta":{}}\n\nevent: message_stop')
    text = view_text(body)
    assert "some events could not be applied (malformed)" in text and "── [0] text\nok" in text


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.txt")), ids=lambda p: p.stem)
def test_sdk_fixtures_render(path):
    data = path.read_bytes()
    acc = messages.message_from_sse(data)
    text = view_text(data)
    assert f"model {acc.message['model']}" in text.splitlines()[1 if not acc.complete or acc.malformed else 0]
    for index, block in enumerate(acc.message["content"]):
        assert f"── [{index}] {block['type']}" in text
        if block["type"] == "text":
            assert block["text"] in text


def test_not_a_message_is_refused():
    view = MessageView()
    for data, ctype in [(b"data: {}\n\n", SSE), (b'{"type":"error","error":{}}', "application/json"), (b"plain", None)]:
        with pytest.raises(ValueError):
            view.prettify(data, response_meta(ctype))
        assert view.render_priority(data, response_meta(ctype)) < 0


def test_priority_beats_json_and_raw_for_messages_only():
    view = MessageView()
    stream = messages.message_to_sse(MESSAGE)
    body = jsoncodec.dumps(MESSAGE)
    assert view.render_priority(stream, response_meta(SSE)) > 1
    assert view.render_priority(body, response_meta("application/json")) > contentviews.json_view.render_priority(
        body, response_meta("application/json")
    )
    request = tutils.treq(content=body)
    assert view.render_priority(body, Metadata(content_type="application/json", http_message=request)) < 0
    ask = jsoncodec.dumps(REQUEST)
    meta = Metadata(content_type="application/json", http_message=tutils.treq(content=ask))
    assert view.render_priority(ask, meta) > contentviews.json_view.render_priority(ask, meta)
    assert view.render_priority(b'{"messages": 3}', meta) < 0  # not a Messages request: the JSON view's
    assert view.render_priority(b"", response_meta(SSE)) < 0
    other_stream = b'event: update\ndata: {"type":"message","x":1}\n\n'
    assert view.render_priority(other_stream, response_meta(SSE)) < 0


REQUEST = {
    "model": "claude-opus-4-5", "max_tokens": 32000, "stream": True, "thinking": {"type": "enabled", "budget_tokens": 1024},
    "tools": [{"name": "Bash", "input_schema": {"type": "object"}}, {"type": "web_search_20250305", "name": "web_search"}],
    "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": "List the files."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a.py\nb.py"}]},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo" * 1000}},
        ]},
    ],
}


def test_a_messages_request_reads_as_its_conversation():
    meta = Metadata(content_type="application/json", http_message=tutils.treq(content=jsoncodec.dumps(REQUEST)))
    text = MessageView().prettify(jsoncodec.dumps(REQUEST), meta)
    assert text.splitlines()[:3] == [
        "request · model claude-opus-4-5",
        'max_tokens 32000 · stream true · thinking {"type":"enabled","budget_tokens":1024}',
        "tools (2): Bash, web_search",
    ]
    assert "══ system\n── [0] text\nYou are Claude Code.\n  {\"cache_control\":{\"type\":\"ephemeral\"}}" in text
    assert "══ message 0 · user\nList the files." in text
    assert '══ message 1 · assistant\n── [0] tool_use Bash (toolu_1)\n{\n  "command": "ls"\n}' in text
    assert "── [0] tool_result for toolu_1\n  ── [0] text\n  a.py\n  b.py" in text
    assert "── [1] image\n(image/png, 11000 characters of base64)" in text
    assert "iVBORw0KGgo" not in text


def test_truncated_copy_is_noted_from_flow_metadata():
    f = api_flow(resp=True)
    f.metadata[webview.STREAM_COPY_KEY] = {"kept_bytes": 1024, "total_bytes": 5000, "truncated": True}
    text = view_text(messages.message_to_sse(MESSAGE)[:600], flow=f)
    assert text.splitlines()[0].startswith("NOTE: only the first 1.0k of 4.9k were kept")


def test_addon_registers_the_view_and_removes_it():
    addon = WebView()
    with taddons.context(addon) as tctx:
        assert contentviews.registry["llm-message"] is addon.view
        f = api_flow(resp=True)
        f.response.headers["content-type"] = "text/event-stream; charset=utf-8"
        f.response.content = messages.message_to_sse(MESSAGE)
        pretty = contentviews.prettify_message(f.response, f)
        assert pretty.view_name == "llm-message" and "── [3] tool_use get_weather" in pretty.text
        f.response.headers["content-type"] = "application/json"
        f.response.content = jsoncodec.dumps(MESSAGE)
        assert contentviews.prettify_message(f.response, f).view_name == "llm-message"
        tctx.master.addons.remove(addon)
    assert "llm-message" not in contentviews.registry
    assert contentviews.prettify_message(f.response, f).view_name == "JSON"


# --- the stream copy ------------------------------------------------------------------------------


def events_of(body: bytes) -> list[sse.Event]:
    parser = sse.SSEParser()
    return parser.feed(body) + parser.flush()


def test_copy_tap_keeps_whole_events_up_to_the_limit():
    events = events_of(messages.message_to_sse(MESSAGE))
    sizes = [len(e.raw) for e in events]
    limit = sum(sizes[:5])  # exactly five events fit
    tap = StreamCopyTap(limit)
    for e in events:
        assert tap.on_event(e) is None
    assert tap.on_end() == b""
    assert tap.body() == b"".join(e.raw for e in events[:5])
    assert tap.summary() == {"kept_bytes": limit, "total_bytes": sum(sizes), "truncated": True}


def test_copy_tap_stops_at_the_first_event_that_does_not_fit():
    events = events_of(b"event: a\ndata: 1\n\n" + b"event: b\ndata: " + b"x" * 100 + b"\n\n" + b"event: c\ndata: 2\n\n")
    tap = StreamCopyTap(40)
    for e in events:
        tap.on_event(e)
    assert tap.body() == b"event: a\ndata: 1\n\n"  # "c" would fit, but the copy stays a prefix
    assert tap.truncated and tap.total == sum(len(e.raw) for e in events)


def test_copy_tap_under_the_limit_keeps_everything():
    body = messages.message_to_sse(MESSAGE)
    tap = StreamCopyTap(len(body))
    for e in events_of(body):
        tap.on_event(e)
    assert tap.body() == body and not tap.truncated


def streamed_flow(addons, body_chunks, *, content_type=SSE):
    """An API flow whose SSE response passes the real relay in `body_chunks`; returns (flow, forwarded)."""
    router = addons[0]
    f = api_flow(b'{"model":"claude-x","max_tokens":5,"stream":true,"messages":[]}')
    router.requestheaders(f)
    router.request(f)
    read_body(f)
    for addon in addons[1:]:
        if hasattr(addon, "request"):
            addon.request(f)
    f.response = tutils.tresp(headers=http.Headers(content_type=content_type), content=b"")
    for addon in addons[1:]:
        if hasattr(addon, "responseheaders"):
            addon.responseheaders(f)
    forwarded = b""
    if callable(f.response.stream):
        forwarded = forward(f.response.stream, body_chunks)
        f.response.data.content = None  # what mitmproxy leaves on a streamed response
    for addon in addons[1:]:
        if hasattr(addon, "response"):
            addon.response(f)
    return f, forwarded


def chunks(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def pipeline():  # the gateway's API-flow addons, in its order, without records
    return [ApiRouter(rule_file()), StreamPreference(), AnswerPipeline(), WebView()]


def test_streamed_body_is_kept_for_viewing_and_forwarding_is_unchanged():
    body = messages.message_to_sse(MESSAGE)
    addons = pipeline()
    with taddons.context(*addons):
        f, forwarded = streamed_flow(addons, chunks(body, 7))
        assert forwarded == body
        assert f.response.raw_content == body
        assert f.metadata[webview.STREAM_COPY_KEY] == {"kept_bytes": len(body), "total_bytes": len(body), "truncated": False}
        assert "── [3] tool_use get_weather" in contentviews.prettify_message(f.response, f).text


def test_stream_copy_keeps_what_was_forwarded_after_other_taps_rewrote_it():
    events = messages.message_to_events(dict(MESSAGE, content=[{"type": "text", "text": "hi"}]))[:2]
    wrapped = {"error": {"message": '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
                         "type": "None", "param": "None", "code": "529"}}
    body = b"".join(sse.encode(n, d) for n, d in events) + sse.encode("error", wrapped)
    addons = pipeline()
    with taddons.context(*addons):
        f, forwarded = streamed_flow(addons, chunks(body, 50))
        assert b'"type":"overloaded_error"' in forwarded and b'"code":"529"' not in forwarded
        assert f.response.raw_content == forwarded
        assert f.marked == ":x:" and "error overloaded_error unwrapped from stream error event" in f.comment


def test_stream_copy_limit_and_truncation_note():
    body = messages.message_to_sse(dict(MESSAGE, content=[{"type": "text", "text": "word " * 2000}]))
    addons = pipeline()
    with taddons.context(*addons) as tctx:
        tctx.configure(addons[-1], gateway_keep_stream_body="1k")
        f, forwarded = streamed_flow(addons, chunks(body, 333))
        assert forwarded == body
        kept = f.response.raw_content
        assert 0 < len(kept) <= 1024 and body.startswith(kept) and kept.endswith(b"\n\n")
        copy = f.metadata[webview.STREAM_COPY_KEY]
        assert copy == {"kept_bytes": len(kept), "total_bytes": len(body), "truncated": True}
        assert "body copy cut at" in f.comment
        assert contentviews.prettify_message(f.response, f).text.startswith("NOTE: only the first")


def test_stream_copy_can_be_turned_off_and_leaves_buffered_bodies_alone():
    body = messages.message_to_sse(MESSAGE)
    addons = pipeline()
    with taddons.context(*addons, Proxyserver()) as tctx:
        tctx.configure(addons[-1], gateway_keep_stream_body="0")
        f, forwarded = streamed_flow(addons, chunks(body, 100))
        assert forwarded == body and f.response.raw_content is None
        tctx.configure(addons[-1], gateway_keep_stream_body="4m", store_streamed_bodies=True)
        f, _ = streamed_flow(addons, chunks(body, 100))
        assert not any(isinstance(t, StreamCopyTap) for t in exchange.of(f).sse_taps)
        tctx.configure(addons[-1], store_streamed_bodies=False)
        f, forwarded = streamed_flow(addons, [], content_type="application/json")
        assert forwarded == b"" and f.response.raw_content == b""  # buffered: nothing to copy, body untouched
        assert not any(isinstance(t, StreamCopyTap) for t in exchange.of(f).sse_taps)


def test_bad_size_is_refused():
    addon = WebView()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, gateway_keep_stream_body="lots")
        tctx.configure(addon, gateway_keep_stream_body="512k")
        assert addon.keep_limit == 512 * 1024


def test_cut_off_stream_keeps_its_copy_on_error():
    body = messages.message_to_sse(MESSAGE)
    addons = pipeline()
    with taddons.context(*addons):
        f = api_flow(b'{"model":"claude-x","max_tokens":5,"stream":true,"messages":[]}')
        addons[0].requestheaders(f)
        addons[0].request(f)
        read_body(f)
        addons[1].request(f)
        f.response = tutils.tresp(headers=http.Headers(content_type=SSE), content=b"")
        for addon in addons[1:]:
            getattr(addon, "responseheaders", lambda f: None)(f)
        forwarded = f.response.stream(body[:700])
        f.response.data.content = None
        f.error = mflow.Error("peer closed connection")
        addons[-1].error(f)
        assert f.response.raw_content == forwarded and forwarded
        assert f.marked == ":x:" and "failed: peer closed connection" in f.comment


# --- comments and markers -------------------------------------------------------------------------


def api_exchange(**fields) -> tuple[http.HTTPFlow, exchange.Exchange]:
    router = ApiRouter(rule_file())
    f = api_flow()
    with taddons.context(router):
        router.requestheaders(f)
        router.request(f)
        read_body(f)
    f.response = tutils.tresp()
    ex = exchange.of(f)
    for k, v in fields.items():
        setattr(ex, k, v)
    return f, ex


def test_comment_names_client_session_stream_and_tokens():
    f, ex = api_exchange(
        client="claude-code", session="0f9e8d7c-6b5a-4321-8765-43210fedcba9", stream_requested=True,
        stream_upstream=False, converted="sse->json", usage=dict(USAGE), complete=True,
    )
    webview.annotate(f)
    assert f.comment == "$? claude-code 0f9e8d7c · hit 32% · stream forced off, converted sse->json · in 21 out 9 cache r13 w7"
    assert f.marked == ""


def test_comment_says_where_the_agent_was_going_when_a_route_sent_it_elsewhere():
    f, ex = api_exchange(client="claude-code", usage=dict(USAGE), complete=True)
    f.request.host, f.request.port = "127.0.0.1", 4000  # what the route did: the list shows this
    webview.annotate(f)
    assert f.comment == "$? claude-code · hit 32% · asked api.anthropic.com/v1/messages · in 21 out 9 cache r13 w7"


def test_comment_leads_with_cost_when_the_model_has_a_price():
    from llm_gateway.policy import rules as rules_mod

    f, ex = api_exchange(client="claude-code", usage=dict(USAGE), complete=True)
    ex.rules = rules_mod.parse(
        "apis: []\npricing:\n  - {model: claude-x, input: 3, output: 15, cache_write_5m: 3.75, cache_write_1h: 6,"
        " cache_read: 0.3}\n", "p.yaml")
    webview.annotate(f)
    # 21*3 + 9*15 + 7*3.75 + 13*0.3 = 228.15 dollars per million tokens
    assert f.comment == "0.02¢ claude-code · hit 32% · in 21 out 9 cache r13 w7"


@pytest.mark.parametrize("usd, text", [
    (0.0, "0¢"), (0.00004, "<0.01¢"), (0.0002, "0.02¢"), (0.0024, "0.24¢"), (0.0123, "1.2¢"), (0.456, "46¢"),
    (1.0, "$1.00"), (12.345, "$12.35"),
])
def test_short_money_leaves_room_for_the_client(usd, text):
    assert webview.short_money(usd) == text


def test_comment_escapes_values_from_the_traffic():
    f, ex = api_exchange(client="evil\nclient", session="s\u2028x", error_type="x\r\n[00:00:00] forged", complete=True)
    webview.annotate(f)
    assert "\n" not in f.comment and "\r" not in f.comment and "\u2028" not in f.comment
    assert f.comment == "evil\\nclient s\\u2028x · error x\\r\\n[00:00:00] forged"


def test_short_session_is_kept_whole():
    f, ex = api_exchange(client="goose", session="s-42", complete=True)
    webview.annotate(f)
    assert f.comment == "goose s-42"


def test_unwrapped_error_is_marked():
    f, ex = api_exchange(client="litellm", error_type="rate_limit_error", unwrapped=True,
                         unwrapped_from="litellm-passthrough 429")
    f.response.status_code = 429
    webview.annotate(f)
    assert f.comment == "litellm · error rate_limit_error unwrapped from litellm-passthrough 429"
    assert f.marked == ":x:"


def test_error_status_without_type_and_failed_flow_are_marked():
    f, ex = api_exchange()
    f.response.status_code = 502
    webview.annotate(f)
    assert f.marked == ":x:"
    f, ex = api_exchange()
    f.response = None
    f.error = mflow.Error("connection refused")
    webview.annotate(f)
    assert f.marked == ":x:" and f.comment == "unknown · failed: connection refused"


def test_cache_break_is_marked_with_a_warning():
    usage = dict(USAGE, cache_read_input_tokens=0)
    f, ex = api_exchange(client="claude-code", session="abc", usage=usage, cache_break=True, complete=True)
    webview.annotate(f)
    assert f.marked == ":warning:" and f.comment == "$? claude-code abc · hit 0% CACHE BREAK · in 21 out 9 cache r0 w7"
    f, ex = api_exchange(client="claude-code", session="abc", usage=usage, cache_break=True, complete=True,
                         cache_break_reason="tools_changed", cache_break_detail="tool 'x' removed",
                         cache_break_tokens_lost=900, cache_break_cost_usd=0.00243, principal="team-a")
    webview.annotate(f)
    assert f.comment == ("$? claude-code abc · hit 0% CACHE BREAK tools_changed · principal team-a"
                         " · in 21 out 9 cache r0 w7 · lost 900 cached tokens ($0.0024): tools_changed (tool 'x' removed)")


def test_incomplete_answer_is_said():
    f, ex = api_exchange(client="x", complete=False)
    webview.annotate(f)
    assert f.comment == "x · incomplete"


def test_refused_egress_is_marked():
    for decision in ("denied", "blocked", "fronting"):
        f = api_flow(resp=True, host="evil.example")
        f.response.status_code = 403
        f.metadata[flows.EGRESS_METADATA] = {"decision": decision, "host": "evil.example", "port": 443, "rule": "default deny"}
        webview.annotate(f)
        assert f.marked == ":no_entry:" and f.comment == f"egress {decision}: evil.example:443 (default deny)"
    f = api_flow(resp=True, host="ok.example")
    f.metadata[flows.EGRESS_METADATA] = {"decision": "allowed", "host": "ok.example"}
    webview.annotate(f)
    assert f.marked == "" and f.comment == ""


def test_connect_refusal_is_annotated_by_the_hook():
    addon = WebView()
    with taddons.context(addon):
        f = api_flow(resp=True, host="evil.example")
        f.metadata[flows.EGRESS_METADATA] = {"decision": "denied"}
        addon.http_connect_error(f)
        assert f.marked == ":no_entry:" and f.comment == "egress denied: evil.example"


def test_other_flows_and_users_own_notes_are_left_alone():
    f = api_flow(resp=True, host="example.com")
    webview.annotate(f)
    assert f.comment == "" and f.marked == ""
    f, ex = api_exchange(client="claude-code", error_type="api_error")
    f.comment, f.marked = "mine", ":star:"
    webview.annotate(f)
    assert f.comment == "mine" and f.marked == ":star:"


# --- gateway_flow_notes ---------------------------------------------------------------------------


def test_flow_notes_are_for_places_where_someone_can_look_at_flows(tmp_path):
    from mitmproxy.addons.save import Save
    from mitmproxy.tools.dump import DumpMaster

    mitmdump = DumpMaster.__new__(DumpMaster)  # only its type is looked at
    with taddons.context(Save()) as tctx:
        assert webview.flow_notes_wanted("auto", mitmdump, tctx.options) is False
        tctx.options.update(save_stream_file=str(tmp_path / "flows.mitm"))  # mitmdump -w: the saved flows carry them
        assert webview.flow_notes_wanted("auto", mitmdump, tctx.options) is True
        tctx.options.update(save_stream_file=None)
        assert webview.flow_notes_wanted("auto", tctx.master, tctx.options) is True  # mitmweb, the console
        assert webview.flow_notes_wanted(" ON ", mitmdump, tctx.options) is True
        assert webview.flow_notes_wanted("off", tctx.master, tctx.options) is False
        with pytest.raises(exceptions.OptionsError, match="gateway_flow_notes"):
            webview.flow_notes_wanted("sometimes", tctx.master, tctx.options)


def test_with_flow_notes_off_no_comment_marker_or_metadata_is_written_and_the_rest_still_is():
    body = messages.message_to_sse(MESSAGE)
    addons = pipeline()
    try:
        with taddons.context(*addons) as tctx:
            tctx.configure(addons[-1], gateway_flow_notes="off")
            f, forwarded = streamed_flow(addons, chunks(body, 50))
            assert forwarded == body and exchange.of(f).usage  # the exchange is read as ever
            assert f.comment == "" and not f.marked and "gateway" not in f.metadata
            assert f.response.raw_content == body  # the body copy has its own option
            tctx.configure(addons[-1], gateway_flow_notes="on")
            f, _ = streamed_flow(addons, chunks(body, 50))
            assert f.comment and f.metadata["gateway"]["api"] == "anthropic"
    finally:
        exchange.publishing = True
