"""Bad input never breaks traffic: the addon hooks as mitmproxy calls them, fed arbitrary and malformed
requests and responses, and the rule file loader fed arbitrary YAML.

The parts have their own property tests (test_sse, test_messages, test_envelopes, test_clients); these drive
the composed addons instead, in gateway.py's order and mitmproxy's hook order, with tflow flows:

- nothing raises out of a hook or out of the stream callable, whatever the body, headers, encoding,
  status, line endings or chunking, and whether the exchange ends with `response` or `error`;
- what the gateway does not understand it passes on unchanged (bytes compared), and says so in its log;
- every exchange gives exactly one usage record that is one whole JSON line, and a flow that mitmproxy
  can still save (`-w`, mitmweb export);
- the rules loader only ever raises `RulesError`, naming the file and a line.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
import zlib
from pathlib import Path
from typing import Any

import brotli
import pytest
import yaml
import zstandard
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from mitmproxy import flow as mflow
from mitmproxy import http, io as mio
from mitmproxy import contentviews
from mitmproxy.test import taddons

from gwtest import api_flow, call, flow_addons, rule_file
from unit.protocol.test_sse import _empty
from llm_gateway.pipeline import exchange
from llm_gateway.pipeline import relay
from llm_gateway.policy import rules
from llm_gateway.policy import spec
from llm_gateway.protocol import sse
from llm_gateway.protocol import errors as protocol_errors
from llm_gateway.protocol import jsoncodec
from llm_gateway.protocol import messages
from llm_gateway.pipeline.answer import TRUNCATED_MESSAGE
from llm_gateway.policy.rules import RulesError
from llm_gateway.protocol.tokens import TOKEN_FIELDS
from llm_gateway.addons.usage import Usage

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_RULES_TEXT = (ROOT / "rules.yaml").read_text()
SSE_TYPE = "text/event-stream"

# The default client signatures, plus two clients that force the upstream stream flag, and a route.
RULES = DEFAULT_RULES_TEXT.replace(
    "clients:\n",
    "clients:\n  - {name: forced-on, headers: [x-force-on], stream: \"on\"}\n"
    "  - {name: forced-off, headers: [x-force-off], stream: \"off\"}\n",
    1,
).replace("routes: []", "routes:\n  - {match: {mode: reverse}, upstream: \"http://127.0.0.1:4000/anthropic\"}", 1)

MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
           "content": [{"type": "text", "text": "Hello there"}], "stop_reason": "end_turn", "stop_sequence": None,
           "usage": {"input_tokens": 10, "output_tokens": 7, "cache_creation_input_tokens": 3,
                     "cache_read_input_tokens": 500}}
STREAM = messages.message_to_sse(MESSAGE)


# ------------------------------------------------------------------------------------------ the gateway


class Gateway:
    """The addons gateway.py loads (app.default_addons), in its order, driven hook by hook like mitmproxy."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.rule_file = rule_file(RULES)
        self.addons = flow_addons(self.rule_file)  # what gateway.py loads, in its order (gwtest.flow_addons)
        self.records = self.addons[1]
        self.seen: list[dict] = []  # usage records (the egress policy's decision records are not counted here)
        self.records.observers.append(lambda r: self.seen.append(r) if r.get("kind") == "usage" else None)

    def hook(self, name: str, flow: http.HTTPFlow) -> None:
        """Call one hook on every addon, in order; an exception here is the failure under test."""
        for addon in self.addons:
            fn = getattr(addon, name, None)
            if fn is not None:
                call(fn, flow)

    def lines(self) -> list[str]:
        """The usage record lines of the log (egress decision records share it)."""
        text = self.log.read_text(encoding="utf-8") if self.log.exists() else ""
        return [line for line in text.splitlines(keepends=True) if not line.startswith('{"kind":"egress"')]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    log = tmp_path_factory.mktemp("robustness") / "usage.jsonl"
    gw = Gateway(log)
    names = [c.name for c in gw.rule_file.rules.clients]
    assert names[:2] == ["forced-on", "forced-off"] and "claude-code" in names and len(gw.rule_file.rules.routes) == 1
    with taddons.context(*gw.addons) as tctx:
        tctx.configure(gw.records, gateway_log=str(log))
        yield gw
        gw.records.done()


FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


# ----------------------------------------------------------------------------------------- strategies

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12,
)
# The fields the gateway reads, with right and wrong types.
request_dicts = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.sampled_from(["claude-sonnet-4-5", "claude-x" * 40]), json_values),
        "stream": st.one_of(st.booleans(), json_values),
        "max_tokens": json_values,
        "messages": st.one_of(st.just([{"role": "user", "content": "hi"}]), json_values),
        "metadata": st.one_of(
            st.fixed_dictionaries({"user_id": st.one_of(st.text(max_size=80), json_values)}), json_values
        ),
        "system": st.one_of(st.text(max_size=60), st.lists(json_values, max_size=3)),
    },
)


def _raw_json(d: dict) -> bytes:
    return json.dumps(d).encode()


request_bodies = st.one_of(
    request_dicts.map(_raw_json),
    # JSON that Python reads but cannot always write back as UTF-8: a lone surrogate escape, NaN.
    request_dicts.map(lambda d: _raw_json(d)[:-1] + (b',"x":"\\ud83d"}' if len(d) else b'"x":"\\udc00"}')),
    request_dicts.map(lambda d: _raw_json({**d, "stream": False})[:-1] + b',"temperature":NaN}'),
    request_dicts.map(_raw_json).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),  # cut short
    st.binary(max_size=120),  # anything, invalid UTF-8 included
    st.just(b"[" * 5000),  # deep nesting
)
header_names = st.one_of(
    st.sampled_from(
        [
            b"user-agent", b"x-api-key", b"authorization", b"cookie", b"x-gateway-client", b"x-session-id",
            b"x-claude-code-session-id", b"x-litellm-key", b"x-app", b"anthropic-beta", b"originator",
            b"x-force-on", b"x-force-off", b"content-encoding", b"goose-session-id",
        ]
    ),
    st.binary(min_size=1, max_size=16),
)
header_values = st.one_of(
    st.sampled_from([b"claude-cli/2.1.0 (external, cli)", b"litellm/1.91.5", b"cli", b"gzip", b"identity"]),
    st.binary(max_size=60),
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
)
request_headers = st.lists(st.tuples(header_names, header_values), max_size=8)


def _event(name: str | None, data: Any) -> bytes:
    head = b"" if name is None else b"event: " + name.encode() + b"\n"
    payload = data if isinstance(data, bytes) else json.dumps(data).encode()
    return head + b"data: " + payload + b"\n\n"


_usage = st.one_of(
    st.fixed_dictionaries({k: st.one_of(st.integers(0, 10**6), json_values) for k in TOKEN_FIELDS}), json_values
)
stream_events = st.one_of(
    _usage.map(lambda u: _event("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": u}})),
    json_values.map(lambda m: _event("message_start", {"type": "message_start", "message": m})),
    st.just(_event("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})),
    st.text(max_size=30).map(lambda t: _event("content_block_delta", {
        "type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}})),
    json_values.map(lambda d: _event("content_block_delta", d)),
    st.just(_event("content_block_stop", {"type": "content_block_stop", "index": 0})),
    _usage.map(lambda u: _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                                  "usage": u})),
    st.just(_event("message_stop", {"type": "message_stop"})),
    st.just(_event("ping", {"type": "ping"})),
    st.binary(max_size=40).map(lambda b: _event("content_block_delta", b.replace(b"\n", b"").replace(b"\r", b""))),
    st.just(b": a comment\n\n"),
    st.just(b"\n"),  # a stray blank line
    st.just(b"id: 7\nretry: 10\nevent: unknown_future_event\ndata: {}\n\n"),
    st.just(b"event: message_stop\n\n"),  # no data
    st.just(b"data: " + b"x" * 300_000 + b"\n\n"),  # a huge event
)
# Error events: native, wrapped by LiteLLM, and junk.
error_events = st.one_of(
    st.just(_event("error", protocol_errors.error_body("overloaded_error", "Overloaded", "req_1"))),
    st.just(_event("error", {"error": {"message": json.dumps(protocol_errors.error_body("rate_limit_error", "slow")),
                                       "type": "None", "param": "None", "code": "429"}})),
    json_values.map(lambda d: _event("error", d)),
    st.just(b'data: {"error": "not a native one"}\n\n'),
)


def _line_endings(body: bytes, style: str) -> bytes:
    return body if style == "\n" else body.replace(b"\n", style.encode())


@st.composite
def sse_bodies(draw, errors: bool = False) -> bytes:
    events = draw(st.lists(st.one_of(stream_events, error_events) if errors else stream_events, max_size=10))
    body = b"".join(events)
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]  # cut anywhere: mid-event, mid-line, mid-"\r\n"
    return _line_endings(body, draw(st.sampled_from(["\n", "\r\n", "\r"])))


def _message(draw) -> dict:
    msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
           "content": [{"type": "text", "text": draw(st.text(max_size=20))}], "stop_reason": "end_turn",
           "stop_sequence": None, "usage": draw(_usage)}
    return draw(st.one_of(st.just(msg), st.dictionaries(st.sampled_from(list(msg)), json_values).map(
        lambda extra: {**msg, **extra})))


@st.composite
def message_bodies(draw) -> bytes:
    return jsoncodec.dumps(_message(draw))


json_bodies = st.one_of(
    message_bodies(),
    st.just(protocol_errors.error_json("rate_limit_error", "slow down", "req_2")),
    st.just(json.dumps({"error": {"message": protocol_errors.error_json("overloaded_error", "o").decode(), "type": "None",
                                  "param": "None", "code": "529"}}).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=80),
    st.just(b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"),
)

ENCODERS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
}
content_encodings = st.sampled_from([None, "identity", "gzip", "deflate", "br", "zstd", "GZIP", "compress", "gzip, br"])


@st.composite
def responses(draw):
    """(status, headers, body as sent on the wire, body before encoding or None if the encoding lies)."""
    sse_like = draw(st.booleans())
    ctype = draw(
        st.sampled_from([SSE_TYPE, "text/event-stream; charset=utf-8", "TEXT/EVENT-STREAM"])
        if sse_like
        else st.sampled_from(["application/json", "text/html", "text/plain", None, "application/json; charset=utf-8"])
    )
    status = draw(st.one_of(st.sampled_from([200, 200, 200, 400, 401, 429, 500, 502, 529]), st.integers(200, 599)))
    plain = draw(sse_bodies(errors=True) if sse_like else json_bodies)
    enc = draw(content_encodings)
    wire_body, decoded = plain, plain
    if enc and enc.lower() in ENCODERS:
        if draw(st.booleans()):
            wire_body = ENCODERS[enc.lower()](plain)
        else:
            decoded = None  # the header lies: the body is not encoded at all
    elif enc and enc != "identity":
        decoded = None  # an encoding nobody can decode
    headers = [(b"request-id", b"req_011fuzz"), (b"set-cookie", b"sid=COOKIE0123")]
    if ctype is not None:
        headers.append((b"content-type", ctype.encode()))
    if enc is not None:
        headers.append((b"content-encoding", enc.encode()))
    return status, headers, wire_body, decoded


# -------------------------------------------------------------------------------------------- helpers


def make_flow(body: bytes, fields: list[tuple[bytes, bytes]], mode: str = "reverse", path: str = "/v1/messages"):
    f = api_flow(body, mode=mode, path=path)
    f.request.headers.fields += tuple(fields)
    return f


def start_response(f: http.HTTPFlow, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    """What mitmproxy has when `responseheaders` runs: the status and headers, no body yet."""
    f.response = http.Response(b"HTTP/1.1", status, b"", http.Headers(headers), None, None, 1.0, None)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])] if data else []


def stream(relay_fn, chunks: list[bytes], end: bool = True) -> bytes:
    """Feed chunks as mitmproxy does (then b"", unless the connection died first); what went out."""
    out = []
    for chunk in [*chunks, b""] if end else chunks:
        sent = relay_fn(chunk)
        assert sent != b"", "b'' would end a chunked body early"
        if isinstance(sent, list):
            assert all(isinstance(s, bytes) for s in sent)
            sent = b"".join(sent)
        assert isinstance(sent, bytes)
        out.append(sent)
    return b"".join(out)


def events_of(body: bytes) -> list[sse.Event]:
    """The events a client dispatches from a whole body: an unterminated last one is discarded (as the SSE
    spec says), but a body ending in a line break and a lone "\r" did end its last event."""
    parser = sse.SSEParser()
    events = parser.feed(body)
    rest = parser.pending
    if rest == b"\r" or re.search(rb"(?:\r\n|\r|\n)\r\Z", rest):
        events.append(sse.Event(rest))
    joined: list[sse.Event] = []  # each run of empty events as one: where the parser cuts a run depends on the bytes
    for event in events:
        if joined and _empty(joined[-1].raw) and _empty(event.raw):
            joined[-1] = sse.Event(joined[-1].raw + event.raw)
        else:
            joined.append(event)
    return joined


def error_like(event: sse.Event) -> bool:
    """An event the error tap may rewrite (see answer.StreamReader)."""
    return event.name == "error" or (event.name is None and '"error"' in event.data)


def check_record(gw: Gateway, lines_before: int, seen_before: int, f: http.HTTPFlow) -> dict:
    """Exactly one new usage record: one whole JSON line in the log, and a flow mitmproxy can still save."""
    new = gw.lines()[lines_before:]
    assert len(gw.seen) == seen_before + 1, "one record per exchange"
    assert len(new) == 1 and new[0].endswith("\n"), new
    record = json.loads(new[0])
    assert record["kind"] == "usage"
    for key in TOKEN_FIELDS:
        assert record[key] is None or (isinstance(record[key], int) and not isinstance(record[key], bool))
    assert isinstance(record["complete"], bool)
    mio.FlowWriter(io.BytesIO()).add(f)  # -w and mitmweb export need serialisable metadata
    json.dumps(f.metadata["gateway"])
    return record


# ----------------------------------------------------------------------------------- the hooks, fuzzed


@FUZZ
@given(
    body=request_bodies,
    fields=request_headers,
    mode=st.sampled_from(["regular", "reverse"]),
    path=st.sampled_from(["/v1/messages", "/v1/messages?beta=true", "/v1/messages/count_tokens",
                          "/anthropic/v1/messages"]),
    response=responses(),
    cuts=st.lists(st.integers(0, 4000), max_size=8),
    ending=st.sampled_from(["response", "response", "error", "error before the response"]),
)
def test_hooks_never_raise_and_pass_on_what_they_do_not_understand(
    gateway, body, fields, mode, path, response, cuts, ending
):
    gw = gateway
    lines_before, seen_before = len(gw.lines()), len(gw.seen)
    f = make_flow(body, fields, mode, path)
    sent_fields = list(f.request.headers.fields)

    gw.hook("requestheaders", f)
    gw.hook("request", f)
    ex = exchange.of(f)
    assert ex is not None
    if any(bad in name or bad in value for name, value in sent_fields for bad in (b"\r", b"\n", b"\0")):
        assert f.response is not None and f.response.status_code == 400  # FramingGuard: never forwarded
        return

    # The request goes on unchanged, or as the same JSON with only `stream` forced; the headers too,
    # less the gateway's own x-gateway-client (and Host where routed).
    if f.request.raw_content != body:
        # as sent upstream: encoded again when the client's content-encoding names one mitmproxy can apply
        before, after = json.loads(body), json.loads(f.request.get_content(strict=False))
        assert ex.stream_upstream is not ex.stream_requested
        assert json.dumps(after, sort_keys=True) == json.dumps({**before, "stream": ex.stream_upstream}, sort_keys=True)
    ours = (b"x-gateway-client", b"host")
    if f.request.raw_content != body:  # mitmproxy sets content-length, and drops an encoding it cannot apply
        ours += (b"content-length", b"content-encoding")
    kept = [(k, v) for k, v in sent_fields if k.lower() not in ours]
    assert [(k, v) for k, v in f.request.headers.fields if k.lower() not in ours] == kept

    if ending == "error before the response":
        f.error = mflow.Error("connection closed")
        gw.hook("error", f)
        assert check_record(gw, lines_before, seen_before, f)["complete"] is False
        return

    status, headers, wire_body, decoded = response
    start_response(f, status, headers)
    gw.hook("responseheaders", f)
    chunks = cut(wire_body, cuts)
    died = ending == "error"
    if callable(f.response.stream):  # the relay
        shown = chunks[: len(chunks) // 2] if died else chunks
        out = stream(f.response.stream, shown, end=not died)
        if not died and decoded is None and wire_body.startswith((b"event:", b"data:")) and len(chunks[0]) >= 16:
            # (What a shorter first chunk does is test_a_content_encoding_that_lies_is_forwarded_as_received.)
            assert out == wire_body, "not decodable as labelled: forwarded exactly as received"
        elif not died and decoded is not None:
            events = sse.SSEParser().feed(decoded)
            if not any(error_like(e) for e in events) and any(e.name == "message_stop" for e in events):
                assert out == decoded, "a whole stream nothing needed to change goes out byte for byte"
    elif not died:
        f.response.raw_content = wire_body  # buffered: mitmproxy read the body
    if died:
        f.error = mflow.Error("peer closed the connection")
        gw.hook("error", f)
    else:
        before_fields = list(f.response.headers.fields)
        gw.hook("response", f)
        success = f.response.status_code == status < 400  # not a 2xx whose body is an error (answered as one)
        if f.response.stream is True or (not f.response.stream and success and ex.converted is None):
            # Streamed untouched (an encoding nobody can read), or an answer that needed no change.
            assert f.response.raw_content in (None, wire_body) and list(f.response.headers.fields) == before_fields
        elif not f.response.stream and f.response.status_code >= 400 and f.response.raw_content != wire_body:
            assert protocol_errors.is_native_error(json.loads(f.response.raw_content))

    record = check_record(gw, lines_before, seen_before, f)
    # A cut answer is incomplete, unless a relayed stream's message_stop came before the cut: then the message
    # was whole, however the transfer ended (docs/fidelity.md).
    relayed = b"".join(shown) if died and callable(f.response.stream) else b""
    encoded = any(k.lower() == b"content-encoding" for k, _ in headers)  # the prefix is not read as SSE here
    stopped = bool(relayed) and (encoded or any(e.kind == "message_stop" for e in sse.SSEParser().feed(relayed)))
    assert record["complete"] is False or not died or stopped
    # mitmweb shows what came back through the gateway's view without failing (mitmproxy's own path).
    assert isinstance(contentviews.prettify_message(f.response, f).text, str)


# ------------------------------------------------------------------------------ the relay, through hooks


def relayed(gw: Gateway, headers: list[tuple[bytes, bytes]] | None = None) -> http.HTTPFlow:
    """A streaming API exchange up to `responseheaders`, with every tap the gateway puts on it."""
    f = make_flow(b'{"model":"claude-x","max_tokens":5,"stream":true,"messages":[]}', [])
    gw.hook("requestheaders", f)
    gw.hook("request", f)
    start_response(f, 200, headers or [(b"content-type", b"text/event-stream")])
    gw.hook("responseheaders", f)
    assert relay.of(f) is not None
    return f


def finish(gw: Gateway, f: http.HTTPFlow) -> None:
    gw.hook("response", f)


@FUZZ
@given(body=sse_bodies(), cuts=st.lists(st.integers(0, 4000), max_size=10))
@example(body=STREAM[: STREAM.index(b"Hello")], cuts=[100])  # the upstream stopped in the middle of a delta
@example(body=b": a comment\r\r: a comment\r\r", cuts=[])  # a run of empty events, its end a lone CR
def test_a_cut_stream_reaches_the_client_whole_and_ends_with_one_error_event(gateway, body, cuts):
    """Whatever the upstream sent before it stopped goes out unchanged, and a stream without message_stop
    ends with a native error event a client reads as its own event: never glued onto a half event."""
    lines_before, seen_before = len(gateway.lines()), len(gateway.seen)
    f = relayed(gateway)
    out = stream(f.response.stream, cut(body, cuts))
    finish(gateway, f)
    sent, got = events_of(body), events_of(out)
    finished = any(e.name == "message_stop" for e in sent)
    assert [e.raw for e in got[: len(sent)]] == [e.raw for e in sent]
    assert out.startswith(b"".join(e.raw for e in sent))
    if finished:
        assert out == body
    else:
        [last] = got[len(sent):]
        assert last.name == "error" and last.json() == protocol_errors.error_body("api_error", TRUNCATED_MESSAGE)
    record = check_record(gateway, lines_before, seen_before, f)
    assert record["complete"] is finished


@FUZZ
@given(body=sse_bodies(), enc=st.sampled_from(sorted(ENCODERS)), cuts=st.lists(st.integers(0, 400), max_size=6))
@example(body=STREAM, enc="gzip", cuts=[1])  # one byte first, then the rest
def test_a_content_encoding_that_lies_is_forwarded_as_received(gateway, body, enc, cuts, caplog):
    """`content-encoding: gzip` (or br, zstd, deflate) on a body that is not encoded: every byte goes out
    as it came, however the first chunks are cut, and the log says why the stream was not read."""
    # A real event first (no decoder takes "event:" or "data:" for its own header), long enough to say so.
    assume(len(body) >= 16 and body.startswith((b"event:", b"data:")))
    caplog.clear()
    f = relayed(gateway, [(b"content-type", b"text/event-stream"), (b"content-encoding", enc.encode())])
    out = stream(f.response.stream, cut(body, cuts))
    finish(gateway, f)
    assert out == body
    assert "cannot decode" in caplog.text


MAX_HELD = 32 * 1024 * 1024  # what the relay may hold back waiting for the end of one event


def test_a_huge_event_is_not_held_without_bound(gateway):
    """A body labelled SSE that never has a blank line (a misconfigured proxy, a huge event) must not be
    held in memory whole: past a bound the relay forwards what it holds and stops reading the stream."""
    f = relayed(gateway)
    chunk = b"data: " + b"x" * (1024 * 1024 - 6)
    fed = sent = 0
    for _ in range(48):
        sent += len(stream(f.response.stream, [chunk], end=False))
        fed += len(chunk)
        assert fed - sent <= MAX_HELD + len(chunk), f"{fed - sent} bytes held back after {fed} fed"
    rest = stream(f.response.stream, [])
    finish(gateway, f)
    assert sent + len(rest) >= fed


def test_huge_events_that_do_end_pass_whole(gateway):
    """A 5 MB event (a big tool result) is an event like any other: forwarded whole and read."""
    f = relayed(gateway)
    start = messages.message_to_sse({"id": "m", "type": "message", "role": "assistant", "model": "claude-x",
                                 "content": [{"type": "text", "text": "x" * 5_000_000}], "stop_reason": "end_turn",
                                 "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 4}})
    out = stream(f.response.stream, cut(start, list(range(0, len(start), 65536))))
    finish(gateway, f)
    assert out == start
    assert exchange.of(f).complete and exchange.of(f).usage["output_tokens"] == 4


# ------------------------------------------------------------------------- what is not understood is logged


def test_what_the_gateway_cannot_read_is_passed_on_and_logged(gateway, caplog):
    caplog.set_level(logging.INFO)
    # An encoding nobody decodes: streamed untouched (through the taps' `on_unread` only: the key scrub).
    f = make_flow(b'{"model":"claude-x","stream":true,"messages":[]}', [])
    gateway.hook("requestheaders", f)
    gateway.hook("request", f)
    start_response(f, 200, [(b"content-type", b"text/event-stream"), (b"content-encoding", b"compress")])
    gateway.hook("responseheaders", f)
    assert f.response.stream(b"\x1f\x9d opaque") == b"\x1f\x9d opaque" and f.response.headers["content-encoding"] == "compress"
    assert "unsupported content-encoding 'compress'" in caplog.text
    gateway.hook("response", f)

    # A client that must get SSE, an upstream that answered JSON which is not a Message: left as it is.
    caplog.clear()
    body = b'{"type":"completion","completion":"hi"}'
    f = make_flow(b'{"model":"claude-x","stream":true,"messages":[]}', [(b"x-force-off", b"1")])
    gateway.hook("requestheaders", f)
    gateway.hook("request", f)
    assert json.loads(f.request.content)["stream"] is False
    start_response(f, 200, [(b"content-type", b"application/json")])
    gateway.hook("responseheaders", f)
    f.response.raw_content = body
    gateway.hook("response", f)
    assert f.response.raw_content == body and f.response.headers["content-type"] == "application/json"
    assert "not a Message; passing it on unchanged" in caplog.text


def test_a_body_python_cannot_write_back_is_still_forced(gateway):
    """`"\\ud83d"` (half an emoji, cut by a client) is valid JSON; forcing `stream` must still work."""
    body = b'{"model":"claude-x","stream":true,"messages":[{"role":"user","content":"cut \\ud83d"}]}'
    f = make_flow(body, [(b"x-force-off", b"1")])
    gateway.hook("requestheaders", f)
    gateway.hook("request", f)
    assert json.loads(f.request.content) == {**json.loads(body), "stream": False}


# ------------------------------------------------------------------------------------------ the rule file

LOCATED = re.compile(r"^r\.yaml:(\d+): \S")


def parse_or_refuse(text: str) -> spec.Rules | None:
    """The rules, or None after checking the refusal is a RulesError naming file and line."""
    try:
        return rules.parse(text, "r.yaml")
    except RulesError as e:
        m = LOCATED.match(str(e))
        assert m, f"no file:line in {str(e)!r}"
        assert 1 <= int(m.group(1)) <= len(re.split(r"\r\n|[\n\r\x85\u2028\u2029]", text)) + 1
        return None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_is_rules_or_a_located_refusal(text):
    parse_or_refuse(text)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_default_rule_file_edited_anywhere_is_rules_or_a_located_refusal(data):
    text = DEFAULT_RULES_TEXT
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        if data.draw(st.booleans()):
            text = text[:at] + data.draw(st.text(max_size=8)) + text[at:]
        else:
            text = text[:at] + text[at + data.draw(st.integers(1, 30)):]
    parse_or_refuse(text)


SECTIONS = ["apis", "routes", "clients", "egress", "usage", "errors", "pricing"]
KEYS = ["name", "hosts", "paths", "match", "upstream", "host", "path", "mode", "api", "user_agent", "headers",
        "header_values", "system_prompt", "metadata_user_id", "stream", "default", "allow", "inspect", "block",
        "log", "unwrap", "max_message", "model", "input", "output", "cache_write_5m", "cache_write_1h", "cache_read"]
yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=20),
    st.sampled_from(["http://127.0.0.1:4000/x", "https://[::1]:99999", "on", "off", "as-sent", "deny", "[a-", "*",
                     "-", "~/u.jsonl", "reverse", "regular", "api.anthropic.com:443", "[::1]:8", "claude-*"]),
)
structures = st.recursive(
    yaml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), yaml_scalars.filter(lambda v: v is not None)), inner,
                        max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(SECTIONS), structures, max_size=5), st.sampled_from([True, False]))
def test_arbitrary_structures_are_rules_or_a_located_refusal(tree, flow_style):
    parse_or_refuse(yaml.safe_dump(tree, default_flow_style=flow_style, allow_unicode=True))


TRICKY_VALUES = [
    "2024-13-01", "!!timestamp 2001-99-99", "!!int abc", "!!float x", "!!bool maybe", "!!binary '@@@'",
    "!!python/object:os.system x", "!!set {a}", "!!omap [a]", "*nowhere", "&a x", "!!null x", "1" + "0" * 5000,
    "!!str", "? a", "|\n  block", "'unterminated", "[" * 400, "{" * 400 + "}" * 400, "!<tag:x> y", "\x00", "\ud800",
]
TEMPLATES = [
    "apis: [{name: V, hosts: [a], paths: [b]}]",
    "apis:\n  - name: a\n    hosts: [V]\n    paths: [b]",
    "routes: [{upstream: V}]",
    "clients:\n  - name: x\n    header_values: {V: b}\n    stream: V",
    "egress: {default: V, allow: [V]}",
    "usage: {log: V}",
    "errors: {max_message: V, unwrap: V}",
    "pricing: [{model: a, input: V, output: 1, cache_write_5m: 1, cache_write_1h: 1, cache_read: 1}]",
    "V: x",
    "V",
]


@pytest.mark.parametrize("value", TRICKY_VALUES, ids=range(len(TRICKY_VALUES)))
def test_tags_bad_dates_huge_numbers_and_deep_nesting_are_located_refusals(value):
    for template in TEMPLATES:
        parse_or_refuse(template.replace("V", value))


@pytest.mark.parametrize(
    "text, line",
    [("apis:\n  - " + "- " * 2000 + "x", 2), ("a: 1\nb: " + "[" * 20000 + "]" * 20000, 2),
     ("a: 1\n\nc: " + "{a: " * 5000 + "1" + "}" * 5000, 3)],
)
def test_deep_nesting_is_a_located_refusal(text, line):
    with pytest.raises(RulesError, match=rf"^r\.yaml:{line}: nested too deeply"):
        rules.parse(text, "r.yaml")


# ------------------------------------------------------------------------------------------ bounded state

MAX_TOTALS = 1000  # a generous bound on what the gateway keeps per client name


def test_client_names_chosen_by_requests_do_not_grow_memory_without_bound(gateway):
    """`x-gateway-client` lets a request name its client, so the names are the clients' choice (one per
    request, if a buggy agent so wishes). Metrics fold them into "other" past a bound; the per-client
    totals behind `gateway.stats` must stay bounded too."""
    usage = next(a for a in gateway.addons if isinstance(a, Usage))
    body = jsoncodec.dumps({**MESSAGE, "usage": {"input_tokens": 1, "output_tokens": 1}})
    for i in range(2 * MAX_TOTALS):
        f = make_flow(b'{"model":"claude-x","max_tokens":5,"messages":[]}', [(b"x-gateway-client", f"agent-{i}".encode())])
        gateway.hook("requestheaders", f)
        gateway.hook("request", f)
        start_response(f, 200, [(b"content-type", b"application/json")])
        gateway.hook("responseheaders", f)
        f.response.raw_content = body
        gateway.hook("response", f)
    assert exchange.of(f).client == f"agent-{2 * MAX_TOTALS - 1}"
    assert len(usage.totals) <= MAX_TOTALS, f"{len(usage.totals)} clients' totals kept"
