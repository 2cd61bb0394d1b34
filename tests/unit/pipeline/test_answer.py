"""The answer pipeline as tables: paths × shapes, so that one row proves every path.

A shape is one upstream answer (status, headers, body bytes). A path is what the client asked for and what
the upstream was asked for: pass-through JSON, pass-through SSE, forced on (client JSON, upstream SSE),
forced off (client SSE, upstream JSON). Every shape runs through every path that can carry it (an HTTP error
through all four, a stream through the two that ask the upstream for one, a Message through the other two),
in both modes, through the addons gateway.py loads (app.default_addons), hook by hook as mitmproxy calls
them. Each row states once what the client must get and what the record must say; each path must give it.

Shapes: every LiteLLM capture in tests/fixtures/litellm (the reference captures are the 1.91.5 ones), the
SDK's stream fixtures in tests/fixtures/sse, and the new shapes of issue 15.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from gwtest import api_flow, call, flow_addons, forward, rule_file
from llm_gateway.policy import pricing
from llm_gateway.protocol import sse
from llm_gateway.protocol import errors as protocol_errors
from llm_gateway.protocol import messages
from llm_gateway.protocol import tokens as protocol_usage
from llm_gateway.pipeline.answer import TRUNCATED_MESSAGE, failure_reason
from unit.protocol.test_envelopes import EXPECTED, load

ROOT = Path(__file__).resolve().parents[3]
SSE_FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "sse"
SSE = "text/event-stream"
RULES = (ROOT / "rules.yaml").read_text().replace(
    "clients:\n",
    "clients:\n  - {name: forced-on, headers: [x-force-on], stream: \"on\"}\n"
    "  - {name: forced-off, headers: [x-force-off], stream: \"off\"}\n",
    1,
)
PATHS = {  # name -> (client streams, header choosing the client rule, upstream streams)
    "json": (False, {}, False),
    "sse": (True, {}, True),
    "forced-on": (False, {"x-force-on": "1"}, True),
    "forced-off": (True, {"x-force-off": "1"}, False),
}
MODES = ("regular", "reverse")


@dataclass
class Shape:
    status: int
    headers: dict[str, str]
    body: bytes
    # what every path must give
    error_type: str | None = None
    http_status: int | None = None  # the status of a native HTTP error (None: not an HTTP error)
    request_id: str | None = None
    retry_after: str | None = None
    usage: tuple | None = None  # (input, output, cache_read, cache_write) in the record
    complete: bool | None = None
    extra: dict = field(default_factory=dict)  # more record fields that must hold

    @property
    def streamed(self) -> bool:
        return self.headers.get("content-type", "").startswith(SSE)

    def paths(self) -> list[str]:
        if self.status >= 400:
            return list(PATHS)
        return ["sse", "forced-on"] if self.streamed else ["json", "forced-off"]


def frame(name: str | None, data) -> bytes:
    payload = data if isinstance(data, (str, bytes)) else json.dumps(data)
    payload = payload.encode() if isinstance(payload, str) else payload
    return (b"event: " + name.encode() + b"\n" if name else b"") + b"data: " + payload + b"\n\n"


def message_start(usage: dict, model: str = "claude-sonnet-4-5-20250929") -> bytes:
    return frame("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": usage}})


def litellm_frame(message: str, code, type_="throttling_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


# ---------------------------------------------------------------------------------------- the new shapes

RATE_INNER = json.dumps(protocol_errors.error_body("rate_limit_error", "Number of request tokens exceeded", "req_x1"))
FIRST_CHUNK_ERROR = json.dumps(litellm_frame(
    f"litellm.RateLimitError: AnthropicException - {RATE_INNER}. Received Model Group=m\n"
    "Available Model Group Fallbacks=None", "429"))
BEDROCK_FRAME = litellm_frame('litellm.RateLimitError: BedrockException - {"message":"Too many tokens"}', "429")
VERTEX = {"error": {"message": "Error code: 429 - {'error': {'code': 429, 'message': 'Quota exceeded for "
                               "aiplatform.googleapis.com/generate_content_requests_per_minute', "
                               "'status': 'RESOURCE_EXHAUSTED'}}", "type": None, "param": None, "code": 500}}
OVERLOAD = "litellm.InternalServerError: AnthropicException - Overloaded. Handle with `litellm.InternalServerError`."
GROWING = message_start({"input_tokens": 10, "output_tokens": 1, "cache_creation_input_tokens": 556,
                         "cache_read_input_tokens": 0,
                         "cache_creation": {"ephemeral_5m_input_tokens": 456, "ephemeral_1h_input_tokens": 100}})

NEW: dict[str, Shape] = {
    # 1. an error answered as a stream, with and without LiteLLM's [DONE]
    "error-as-stream": Shape(429, {"content-type": SSE, "llm_provider-retry-after": "17"},
                             frame(None, FIRST_CHUNK_ERROR), "rate_limit_error", 429, "req_x1", "17", complete=True),
    "error-as-stream-done": Shape(429, {"content-type": SSE, "llm_provider-retry-after": "17"},
                                  frame(None, FIRST_CHUNK_ERROR) + frame(None, "[DONE]"), "rate_limit_error", 429,
                                  "req_x1", "17", complete=True),
    # 2. message_start, then LiteLLM's unnamed wrapped error frame; and a wrapped named one typed "None"
    "start-then-unnamed-error": Shape(
        200, {"content-type": SSE},
        message_start({"input_tokens": 40, "output_tokens": 1, "cache_read_input_tokens": 12000}) + frame(None, BEDROCK_FRAME),
        "rate_limit_error", usage=(40, 1, 12000, None), complete=False),
    "wrapped-error-event": Shape(
        200, {"content-type": SSE},
        message_start({"input_tokens": 5, "output_tokens": 1})
        + frame("error", {"error": {"message": "upstream went away", "type": "None", "param": "None", "code": "529"}}),
        "overloaded_error", usage=(5, 1, None, None), complete=False),
    # 3. a 500 stating another status; LiteLLM's 500 for an Anthropic overload, as a body and mid-stream
    "vertex-429-in-500": Shape(500, {"content-type": "application/json"}, json.dumps(VERTEX).encode(),
                               "rate_limit_error", 429, complete=True),
    "litellm-overload-500": Shape(500, {"content-type": "application/json"},
                                  json.dumps(litellm_frame(OVERLOAD, "500", None)).encode(), "overloaded_error", 529,
                                  complete=True),
    "litellm-overload-mid-stream": Shape(
        200, {"content-type": SSE},
        message_start({"input_tokens": 7, "output_tokens": 1}) + frame(None, litellm_frame(OVERLOAD, "500", None)),
        "overloaded_error", usage=(7, 1, None, None), complete=False),
    # 5. cache writes growing during the stream: the final total, split consistently
    "cache-write-grows": Shape(
        200, {"content-type": SSE},
        GROWING + frame("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                          "usage": {"output_tokens": 30, "cache_creation_input_tokens": 7345}})
        + frame("message_stop", {"type": "message_stop"}),
        usage=(10, 30, 0, 7345), complete=True,
        extra={"cache_creation_5m_input_tokens": 7245, "cache_creation_1h_input_tokens": 100,
               # Sonnet 4.5 list prices: 10*3 + 30*15 + 7245*3.75 + 100*6 (dollars per million)
               "cost_usd": round((10 * 3 + 30 * 15 + 7245 * 3.75 + 100 * 6) / 1e6, 8),
               "price_source": pricing.LIBRARY, "model": "claude-sonnet-4-5-20250929"}),
    # a stream cut without message_stop: a native api_error, never a complete answer
    "cut-stream": Shape(200, {"content-type": SSE}, message_start({"input_tokens": 3, "output_tokens": 1}),
                        "api_error", usage=(3, 1, None, None), complete=False,
                        extra={"reason": "upstream stream ended before message_stop"}),
}


# ------------------------------------------------------------------------------------ the captured shapes


def capture_shapes() -> dict[str, Shape]:
    shapes = {}
    for version, names in EXPECTED.items():
        for name, expected in names.items():
            if name.startswith("chat_") and "ok" in name:
                continue  # OpenAI chat completions, not a Messages answer
            status, headers, body = load(version, name)
            headers = {k: v for k, v in headers.items() if k not in ("transfer-encoding", "content-length", "connection")}
            shape = Shape(status, headers, body)
            if status >= 400:
                if expected is None:  # native already: passes as it is
                    native = json.loads(body)
                    expected = (status, native["error"]["type"], native.get("request_id"), None)
                shape.http_status, shape.error_type, shape.request_id = expected[:3]
                shape.complete = True
                if "retry-after" in headers or "llm_provider-retry-after" in headers:
                    shape.retry_after = headers.get("retry-after") or headers["llm_provider-retry-after"]
            else:
                acc = messages.message_from_sse(body) if shape.streamed else None
                message = acc.message if acc else json.loads(body)
                usage = (message or {}).get("usage")
                shape.usage = tuple(protocol_usage.token(usage, k) for k in (
                    "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
                if not any(shape.usage):
                    shape.usage = None
                shape.complete = acc.complete if acc else True
                if acc and b'"error"' in body:
                    shape.error_type = "overloaded_error"  # every captured mid-stream failure is an overload
                elif acc and not acc.complete:
                    shape.error_type = "api_error"  # cut: the gateway says so
            shapes[f"{version}/{name}"] = shape
    for path in sorted(SSE_FIXTURES.glob("*.txt")):
        # The SDK's files end without the blank line that ends their last event (clients would drop it): end
        # them as the API does.
        body = path.read_bytes().rstrip(b"\r\n") + b"\n\n"
        acc = messages.message_from_sse(body)
        usage = acc.message.get("usage") if acc.message else None
        shapes[f"sdk/{path.stem}"] = Shape(
            200, {"content-type": SSE}, body,
            None if acc.complete else "api_error",
            usage=tuple(protocol_usage.token(usage, k) for k in (
                "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")),
            complete=acc.complete,
        )
    return shapes


SHAPES = {**capture_shapes(), **NEW}
ROWS = [(name, path) for name, shape in SHAPES.items() for path in shape.paths()]


# ---------------------------------------------------------------------------------------------- driving


class Gateway:
    def __init__(self) -> None:
        self.addons = flow_addons(rule_file(RULES))
        self.records: list[dict] = []
        self.addons[1].observers.append(lambda r: self.records.append(r) if r.get("kind") == "usage" else None)

    def hook(self, name: str, f: http.HTTPFlow) -> None:
        for addon in self.addons:
            fn = getattr(addon, name, None)
            if fn is not None:
                call(fn, f)

    def exchange(self, shape: Shape, path: str, mode: str, chunk: int = 9) -> tuple[http.HTTPFlow, bytes, dict]:
        """One exchange: the request on `path`, the upstream's `shape`; what the client got, and the record."""
        client_streams, headers, upstream_streams = PATHS[path]
        body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": client_streams,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        f = api_flow(body, mode=mode, headers=headers)
        self.hook("requestheaders", f)
        self.hook("request", f)
        assert json.loads(f.request.content)["stream"] is upstream_streams
        f.response = http.Response.make(shape.status, shape.body, shape.headers)
        self.hook("responseheaders", f)
        if callable(f.response.stream):
            sent = forward(f.response.stream, [shape.body[i: i + chunk] for i in range(0, len(shape.body), chunk)])
            f.response.content = None  # as mitmproxy leaves a streamed body
        else:
            sent = None
        self.hook("response", f)
        if sent is None:
            sent = f.response.content
        [record] = self.records[-1:]
        return f, sent, record


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    gateway = Gateway()
    with taddons.context(*gateway.addons) as tctx:
        # the records go to a temporary file: the rules' own usage.log would be usage.jsonl in the working folder
        tctx.configure(gateway.addons[1], gateway_log=str(tmp_path_factory.mktemp("answer") / "usage.jsonl"))
        yield gateway


def client_view(f: http.HTTPFlow, sent: bytes, streams: bool) -> tuple[int, str | None, str | None]:
    """(status, error type, request id) as the client sees them: an HTTP error, or a stream's error event."""
    if f.response.status_code >= 400 or not streams:
        body = json.loads(sent)
        if protocol_errors.is_native_error(body):
            return f.response.status_code, body["error"]["type"], f.response.headers.get("request-id")
        assert body["type"] == "message"
        return f.response.status_code, None, f.response.headers.get("request-id")
    assert f.response.headers["content-type"].startswith(SSE)
    parser = sse.SSEParser()
    errors = [e.json() for e in parser.feed(sent) + parser.flush() if e.name == "error"]
    assert len(errors) <= 1, errors
    if errors:
        assert protocol_errors.is_native_error(errors[0]), errors[0]
        assert errors[0]["error"]["type"] != "None"
        return 200, errors[0]["error"]["type"], errors[0].get("request_id") or f.response.headers.get("request-id")
    return 200, None, f.response.headers.get("request-id")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "path"), ROWS, ids=[f"{n}-{p}" for n, p in ROWS])
def test_every_path_gives_what_the_row_says(gw, name, path, mode):
    shape = SHAPES[name]
    client_streams = PATHS[path][0]
    f, sent, record = gw.exchange(shape, path, mode)
    status, error_type, request_id = client_view(f, sent, client_streams)

    assert error_type == shape.error_type
    assert record["error_type"] == shape.error_type
    if shape.http_status is not None or (error_type and not client_streams):
        # an HTTP error, whatever the path: the native JSON, with its status and restored headers
        assert f.response.headers["content-type"] == "application/json"
        assert status == (shape.http_status or protocol_errors.status_for_error_type(shape.error_type))
        if shape.retry_after:
            assert f.response.headers["retry-after"] == shape.retry_after
    assert record["status"] == status  # what the client got
    if shape.request_id:
        assert request_id == shape.request_id and record["request_id"] == shape.request_id
    if shape.usage is not None:
        assert (record["input_tokens"], record["output_tokens"], record["cache_read_input_tokens"],
                record["cache_creation_input_tokens"]) == shape.usage
    assert record["complete"] is shape.complete
    for key, value in shape.extra.items():
        assert record[key] == value, key
    if error_type and shape.http_status is None:  # an answer that ended early says why; an HTTP error is whole
        assert record["reason"]


@pytest.mark.parametrize("name", sorted(n for n, s in SHAPES.items() if len(s.paths()) > 1))
def test_one_row_one_record(gw, name):
    """The records of one shape agree on every path, in both modes, but for what the path itself is."""
    path_fields = {"ts", "mode", "stream_requested", "stream_upstream", "converted", "ttfb_ms", "duration_ms",
                   "client", "status", "unwrapped", "unwrapped_from"}
    seen = []
    for path in SHAPES[name].paths():
        for mode in MODES:
            _, _, record = gw.exchange(SHAPES[name], path, mode)
            seen.append({k: v for k, v in record.items() if k not in path_fields})
    assert all(r == seen[0] for r in seen), seen


# ------------------------------------------------------------------------------------------- the error hook


@pytest.mark.parametrize(
    ("message", "streamed", "status", "error_type", "reason"),
    [
        ("peer closed connection without sending complete message body: received 40 bytes, expected 100",
         False, 502, "api_error", "upstream closed before the end of its body"),
        ("Connection refused", None, 502, "api_error", "upstream refused the connection"),
        ("[Errno 111] Connect call failed ('127.0.0.1', 9)", None, 502, "api_error", "upstream refused the connection"),
        ("[Errno 104] Connection reset by peer", None, 502, "api_error", "upstream reset the connection"),
        ("peer closed connection", True, 200, None, "upstream closed the stream"),
        ("Client disconnected.", True, 200, None, "client disconnected"),
        ("Client disconnected.", None, None, None, "client disconnected"),
    ],
    ids=["closed-before-content-length", "refused", "refused-asyncio", "reset", "cut-mid-stream", "client-left-mid-stream",
         "client-left-before-answer"],
)
def test_failures_record_what_the_client_got(gw, message, streamed, status, error_type, reason):
    """mitmproxy's own answer (no upstream response): a text/html 502 it writes after the `error` hook; the
    record says so. A relayed stream already sent its 200; a client that left got nothing."""
    f = api_flow(json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 5, "stream": bool(streamed),
                             "messages": []}).encode())
    gw.hook("requestheaders", f)
    gw.hook("request", f)
    if streamed is not None:
        f.response = http.Response.make(200, b"", {"content-type": SSE if streamed else "application/json"})
        gw.hook("responseheaders", f)
        if streamed:
            assert callable(f.response.stream)
            f.response.stream(message_start({"input_tokens": 8, "output_tokens": 1}))
    f.client_conn.timestamp_end = None  # tflow's client connection is closed; here it is still open
    f.error = tflow.terr(message)
    gw.hook("error", f)
    record = gw.records[-1]
    assert (record["status"], record["error_type"], record["reason"], record["complete"]) == (
        status, error_type, reason, False)
    if streamed:
        assert record["input_tokens"] == 8


def test_failure_reasons_are_short():
    assert failure_reason("TLS handshake failed: certificate verify failed", False) == "upstream TLS failed"
    assert failure_reason("something else entirely", False) == "upstream failed"
    # mitm/heads.py's message for an answer head past gateway_head_size_limit
    assert failure_reason("the upstream's answer head is longer than 262144 bytes", False) == "upstream answer head too long"
    assert TRUNCATED_MESSAGE.startswith("the upstream stream ended")


# --- buffered answers decoded off the event loop (issue 30) -------------------------------------------------


def _gzip(data: bytes) -> bytes:
    import zlib

    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def _encoded_response(body: bytes, encoding: str = "gzip", status: int = 500) -> http.Response:
    response = http.Response.make(status, b"", {"content-type": "application/json", "content-encoding": encoding})
    response.raw_content = _gzip(body) if encoding == "gzip" else body  # as received (`content=` would encode)
    return response


def test_a_compressed_answer_is_decoded_once_in_a_worker_thread(monkeypatch):
    import asyncio
    import threading

    from llm_gateway.pipeline import answer

    native = json.dumps(protocol_errors.error_body("overloaded_error", "busy")).encode()
    response = _encoded_response(native)
    threads = []
    decode = answer._decode
    monkeypatch.setattr(answer, "_decode", lambda raw, enc: threads.append(threading.current_thread()) or decode(raw, enc))
    asyncio.run(answer.decode_off_loop(response))
    assert threads and threads[0] is not threading.main_thread()  # decoded off the (main-thread) event loop
    assert answer.body_of(response) == native and answer.body_of(response) == native
    assert len(threads) == 1, "the hooks after it reuse the decoded body"
    response.content = b'{"changed": true}'  # new bytes: decoded again, not the stale copy
    assert answer.body_of(response) == b'{"changed": true}'
    answer.forget(response)
    assert response not in answer._decoded


def test_a_compressed_answer_past_the_bound_is_none_and_identity_is_not_cached():
    import asyncio

    from llm_gateway.pipeline import answer

    bomb = _encoded_response(b"\0" * (answer.ANSWER_LIMIT + 1))
    asyncio.run(answer.decode_off_loop(bomb))
    assert answer._decoded[bomb][1] is None and answer.body_of(bomb) is None
    plain = http.Response.make(500, b'{"a":1}', {"content-type": "application/json"})
    unknown = _encoded_response(b"not compressed", encoding="x-unknown")
    for response in (plain, unknown):
        asyncio.run(answer.decode_off_loop(response))
        assert response not in answer._decoded
    assert answer.body_of(unknown) == b"not compressed"  # as mitmproxy's get_content(strict=False) gives it


def test_a_success_holding_a_compressed_bomb_is_not_decoded_without_bound():
    """`error_in_success` read a 200's JSON body with mitmproxy's unbounded get_content()."""
    from llm_gateway.pipeline import answer

    bomb = _encoded_response(b" " * (answer.ANSWER_LIMIT + 1), status=200)
    assert answer.error_in_success(bomb) is False
    wrapped = _encoded_response(json.dumps(protocol_errors.error_body("rate_limit_error", "slow")).encode(), status=200)
    assert answer.error_in_success(wrapped) is True and wrapped.status_code == 429
