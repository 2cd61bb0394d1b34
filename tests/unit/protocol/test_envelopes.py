"""Error envelopes: every LiteLLM shape in the reference, every raw capture, and properties."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_gateway.protocol import envelopes
from llm_gateway.protocol import errors as protocol_errors
from llm_gateway.protocol import jsoncodec
from llm_gateway.protocol.envelopes import Unwrapped, header_fixes, unwrap_error_event, unwrap_response

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "litellm"


# ------------------------------------------------------------------------------------------ helpers


def parse_raw(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and de-chunked body of a raw HTTP/1.1 response capture."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2 :]
        body = out
    return status, headers, body


def load(version: str, name: str) -> tuple[int, dict[str, str], bytes]:
    return parse_raw((FIXTURES / version / f"{name}.raw").read_bytes())


def native(error_type: str, message: str, request_id: str | None = None) -> dict:
    return protocol_errors.error_body(error_type, message, request_id)


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def litellm_body(message: str, code: int | str, type_: str = "None", param="None") -> bytes:
    return compact({"error": {"message": message, "type": type_, "param": param, "code": str(code)}}).encode()


def assert_native(u: Unwrapped) -> dict:
    body = json.loads(u.body)
    assert protocol_errors.is_native_error(body)
    assert body["error"]["type"] == u.error_type
    assert isinstance(body["error"]["message"], str)
    return body


RATE = native(
    "rate_limit_error",
    "This request would exceed the rate limit for your organization of 40,000 input tokens per minute.",
    "req_011FAKE429",
)
OVERLOADED = native("overloaded_error", "Overloaded", "req_011FAKE529")
UNICODE = native(
    "invalid_request_error", "prompt contains üñïçødé — \"quoted\" and 'single' \\ backslash", "req_u"
)


# ------------------------------------------------------------------------------------ raw captures

U = "unwrapped"


def wrapped_family(prefix: str, source: str) -> dict:
    """The captures of one LiteLLM route for every upstream error, streamed or not: what each must become."""
    errors = (
        ("400", 400, "invalid_request_error"),
        ("400u", 400, "invalid_request_error"),
        ("401", 401, "authentication_error"),
        ("429", 429, "rate_limit_error"),
        ("529", 529, "overloaded_error"),
    )
    return {
        f"{prefix}_{s}{c}": (status, etype, f"req_011FAKE{c.upper()}", source)
        for s in ("", "stream_")
        for c, status, etype in errors
    }


# name -> (restored status, error type, request id, source), or None: left untouched
EXPECTED: dict[str, dict[str, tuple | None]] = {
    "1.91.5": {
        "pt_400": (400, "invalid_request_error", "req_011FAKE400", "litellm-passthrough"),
        "pt_401": (401, "authentication_error", "req_011FAKE401", "litellm-passthrough"),
        "pt_429": (429, "rate_limit_error", "req_011FAKE429", "litellm-passthrough"),
        "pt_529": (529, "overloaded_error", "req_011FAKE529", "litellm-passthrough"),
        "pt_stream_400": (400, "invalid_request_error", "req_011FAKE400", "litellm-bytes-repr"),
        "pt_stream_401": (401, "authentication_error", "req_011FAKE401", "litellm-bytes-repr"),
        "pt_stream_429": (429, "rate_limit_error", "req_011FAKE429", "litellm-bytes-repr"),
        "pt_stream_529": (529, "overloaded_error", "req_011FAKE529", "litellm-bytes-repr"),
        "pt_503text": (503, "api_error", None, "proxy-error"),
        "pt_badkey": (400, "invalid_request_error", None, "proxy-error"),
        "pt_ok": None,
        "pt_stream_ok": None,
        "pt_stream_midfail": None,
        "pt_stream_reset": None,
    },
    "1.106.2": {
        # pass-through: native errors and their headers pass unchanged
        **{f"pt_{s}{c}": None for s in ("", "stream_") for c in ("400", "400u", "401", "429", "529", "ok")},
        "pt_stream_midfail": None,
        "pt_badkey": (400, "invalid_request_error", None, "proxy-error"),
        "pt_down": (500, "api_error", None, "proxy-error"),
        "pt_stream_down": (500, "api_error", None, "proxy-error"),
        # routed /v1/messages: Anthropic-shaped outside, the native error inside (stream or not alike)
        **wrapped_family("msg", "litellm-wrapped-anthropic"),
        "msg_ok": None,
        "msg_stream_ok": None,
        "msg_stream_midfail": None,
        "msg_down": None,  # already native (api_error, LiteLLM's connect message): left alone
        "msg_stream_down": None,
        # routed /v1/chat/completions: `litellm.<X>Error: AnthropicException - {…}`, a bytes repr when
        # streaming
        **wrapped_family("chat", "litellm-chat"),
        "chat_ok": None,
        "chat_stream_ok": None,
        "chat_stream_midfail": None,
        "chat_badkey": (400, "invalid_request_error", None, "proxy-error"),
        "chat_down": (500, "api_error", None, "proxy-error"),
        "chat_stream_down": (500, "api_error", None, "proxy-error"),
    },
}

CASES = [(v, n) for v, names in EXPECTED.items() for n in sorted(names)]


def test_every_capture_is_covered():
    for version, names in EXPECTED.items():
        on_disk = {p.stem for p in (FIXTURES / version).glob("*.raw")}
        assert on_disk == set(names), version


@pytest.mark.parametrize(("version", "name"), CASES, ids=[f"{v}/{n}" for v, n in CASES])
def test_capture(version, name):
    status, headers, body = load(version, name)
    u = unwrap_response(status, headers.get("content-type"), body)
    expected = EXPECTED[version][name]
    if expected is None:
        assert u is None
        return
    assert u is not None
    assert (u.status, u.error_type, u.request_id, u.source) == expected
    assert u.original_status == status
    restored = assert_native(u)
    if u.request_id:
        assert restored["request_id"] == u.request_id


@pytest.mark.parametrize("code", ["400", "400u", "401", "429", "529"])
@pytest.mark.parametrize("route", ["msg", "msg_stream", "chat", "chat_stream"])
def test_1_106_unwrapped_equals_what_the_upstream_sent(route, code):
    """The pass-through route of 1.106.2 forwards the upstream's body unchanged: the routed envelopes must
    unwrap to exactly those bytes (non-ASCII and escapes included, also through a bytes repr)."""
    _, _, upstream_body = load("1.106.2", f"pt_{code}")
    status, headers, body = load("1.106.2", f"{route}_{code}")
    u = unwrap_response(status, headers.get("content-type"), body)
    assert u is not None
    assert u.body == upstream_body


@pytest.mark.parametrize("code", ["400", "401", "429", "529"])
def test_1_91_passthrough_unwrapped_equals_inner_json(code):
    for name in (f"pt_{code}", f"pt_stream_{code}"):
        status, headers, body = load("1.91.5", name)
        u = unwrap_response(status, headers.get("content-type"), body)
        message = json.loads(body)["error"]["message"]
        inner = message[2:-1] if message.startswith("b'") else message
        assert json.loads(u.body) == json.loads(inner)


def test_1_106_chat_headers_are_restored():
    status, headers, body = load("1.106.2", "chat_429")
    u = unwrap_response(status, headers["content-type"], body)
    fixes = header_fixes(headers, u.request_id)
    assert fixes == {
        "retry-after": "17",
        "x-should-retry": "true",
        "anthropic-ratelimit-tokens-limit": "40000",
        "anthropic-ratelimit-tokens-remaining": "0",
        "anthropic-ratelimit-tokens-reset": "2030-01-01T00:00:30Z",
    }  # request-id is already there
    status, headers, body = load("1.106.2", "chat_529")
    assert header_fixes(headers) == {"retry-after": "17", "x-should-retry": "true"}


def test_1_106_routed_messages_get_request_id_from_body():
    status, headers, body = load("1.106.2", "msg_529")
    u = unwrap_response(status, headers["content-type"], body)
    assert header_fixes(headers, u.request_id) == {"request-id": "req_011FAKE529"}


def test_1_106_passthrough_keeps_native_headers():
    status, headers, body = load("1.106.2", "pt_429")
    assert unwrap_response(status, headers["content-type"], body) is None
    assert header_fixes(headers, "req_other") == {}  # nothing missing


def test_1_106_chat_midstream_error_event():
    _, _, body = load("1.106.2", "chat_stream_midfail")
    data_lines = [line[6:] for line in body.decode().splitlines() if line.startswith("data: {\"error\"")]
    assert len(data_lines) == 1
    event = unwrap_error_event(json.loads(data_lines[0]))
    # LiteLLM's report of an Anthropic overload is an overload again (explicit_status), not a 500 api_error
    assert event == native("overloaded_error", "litellm.InternalServerError: AnthropicError - Overloaded")


@pytest.mark.parametrize("name", ["pt_stream_midfail", "msg_stream_midfail"])
def test_1_106_native_midstream_error_event_untouched(name):
    _, _, body = load("1.106.2", name)
    (data,) = [line[6:] for line in body.decode().splitlines() if line.startswith('data: {"type":"error"')]
    assert unwrap_error_event(json.loads(data)) is None


# ------------------------------------------------------------------------- shapes of the reference


def test_shape1_passthrough_string():
    u = unwrap_response(429, "application/json", litellm_body(compact(RATE), 429))
    assert (u.status, u.error_type, u.request_id) == (429, "rate_limit_error", "req_011FAKE429")
    assert u.source == "litellm-passthrough"
    assert json.loads(u.body) == RATE
    assert u.body == jsoncodec.dumps(RATE)


@pytest.mark.parametrize("quote", ["'", '"'])
def test_shape2_bytes_repr(quote):
    inner = compact(UNICODE).encode()
    literal = repr(inner)
    if quote == '"':  # the form Python picks when the text holds a ' but no " (built by hand here)
        literal = 'b"' + literal[2:-1].replace("\\'", "'").replace('"', '\\"') + '"'
    u = unwrap_response(400, "application/json", litellm_body(literal, 400))
    assert "\\x" in literal  # non-ASCII as \xNN
    assert u.source == "litellm-bytes-repr"
    assert json.loads(u.body) == UNICODE
    assert u.request_id == "req_u"


def test_shape2_bytes_repr_529_keeps_status():
    u = unwrap_response(529, "application/json", litellm_body(repr(compact(OVERLOADED).encode()), 529))
    assert (u.status, u.error_type, u.source) == (529, "overloaded_error", "litellm-bytes-repr")


def test_shape3_native_passes_byte_for_byte():
    for err in (RATE, OVERLOADED, UNICODE, native("some_future_error", "x")):
        status = protocol_errors.status_for_error_type(err["error"]["type"])
        assert unwrap_response(status, "application/json", jsoncodec.dumps(err)) is None
    # even with odd whitespace, and on a status that does not match its type
    body = b'  {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n'
    assert unwrap_response(500, "application/json", body) is None


def test_shape4_routed_old_suffix():
    message = compact(RATE) + ". Received Model Group=claude-sonnet\nAvailable Model Group Fallbacks=None"
    u = unwrap_response(429, "application/json", litellm_body(message, 429))
    assert (u.status, u.error_type, u.request_id) == (429, "rate_limit_error", "req_011FAKE429")
    assert u.source == "litellm-routed"
    assert json.loads(u.body) == RATE


def test_shape5_routed_new_500_becomes_529():
    body = compact(
        native(
            "api_error",
            "litellm.InternalServerError: AnthropicError - "
            + compact(OVERLOADED)
            + "\n\nLiteLLM: model group 'claude' failed with the error above. No fallback was attempted.",
        )
    ).encode()
    u = unwrap_response(500, "application/json", body)
    assert (u.status, u.error_type, u.request_id, u.source, u.original_status) == (
        529,
        "overloaded_error",
        "req_011FAKE529",
        "litellm-wrapped-anthropic",
        500,
    )
    assert json.loads(u.body) == OVERLOADED


def test_shape6_chat_completions():
    suffix = ". Received Model Group=claude\nAvailable Model Group Fallbacks=None"
    message = "litellm.RateLimitError: AnthropicException - " + compact(RATE) + suffix
    body = litellm_body(message, 429, "throttling_error", None)
    u = unwrap_response(429, "application/json", body)
    assert (u.status, u.error_type, u.request_id) == (429, "rate_limit_error", "req_011FAKE429")
    assert u.source == "litellm-chat"
    message = "litellm.InternalServerError: AnthropicError - " + compact(OVERLOADED) + suffix
    u = unwrap_response(500, "application/json", litellm_body(message, 500, "internal_server_error", None))
    assert (u.status, u.error_type) == (529, "overloaded_error")
    headers = {"llm_provider-retry-after": "30", "content-type": "application/json"}
    assert header_fixes(headers) == {"retry-after": "30"}


CONNECT = "Cannot connect to host api.anthropic.com:443 ssl:default [Connect call failed]"
BAD_TOKEN = "Authentication Error, Invalid proxy server token passed. Received API Key = sk-...abcd"


@pytest.mark.parametrize(
    ("status", "body", "error_type", "message"),
    [
        (
            400,
            b'{"error":{"message":"No connected db.","type":"no_db_connection","param":null,"code":"400"}}',
            "invalid_request_error",
            "No connected db.",
        ),
        (500, litellm_body(CONNECT, 500), "api_error", CONNECT),
        (401, litellm_body(BAD_TOKEN, 401, "auth_error"), "authentication_error", BAD_TOKEN),
        (400, litellm_body("Violated guardrail policy", 400), "invalid_request_error", "Violated guardrail policy"),
        (418, litellm_body("teapot", 418), "invalid_request_error", "teapot"),
        (503, b'{"detail":"Service Unavailable"}', "api_error", "Service Unavailable"),
    ],
)
def test_shape7_litellm_own_errors(status, body, error_type, message):
    u = unwrap_response(status, "application/json", body)
    assert (u.status, u.original_status, u.error_type, u.request_id) == (status, status, error_type, None)
    assert u.source == "proxy-error"
    assert json.loads(u.body) == native(error_type, message)


def test_shape8_envoy_text():
    text = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"
    u = unwrap_response(503, "text/plain", text)
    assert (u.status, u.error_type, u.source) == (503, "api_error", "non-json")
    assert json.loads(u.body)["error"]["message"] == text.decode()


def test_shape8_html_page():
    page = (
        b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
        b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )
    u = unwrap_response(502, "text/html", page)
    assert (u.status, u.error_type, u.source) == (502, "api_error", "non-json")
    assert json.loads(u.body)["error"]["message"] == "502 Bad Gateway: nginx"


@pytest.mark.parametrize("body", [b"", b"   \r\n", None])
def test_empty_body(body):
    u = unwrap_response(529, None, body)
    assert (u.status, u.error_type, u.source) == (529, "overloaded_error", "empty")
    assert json.loads(u.body)["error"]["message"] == "HTTP 529 Overloaded (empty body)"
    u = unwrap_response(504, "application/json", b"")
    assert u.error_type == "timeout_error"


@pytest.mark.parametrize("status", [100, 200, 201, 204, 301, 304, 399])
def test_success_is_never_touched(status):
    assert unwrap_response(status, "application/json", litellm_body(compact(RATE), 429)) is None
    assert unwrap_response(status, "text/html", b"<html>") is None


# --------------------------------------------------------------------------- variations to tolerate


def test_nested_twice():
    """LiteLLM behind LiteLLM: the envelope's message is itself an envelope."""
    once = litellm_body("litellm.InternalServerError: AnthropicError - " + repr(compact(OVERLOADED).encode()), 500)
    twice = litellm_body(once.decode(), 500)
    thrice = compact(native("api_error", "litellm.APIError: APIError - " + twice.decode())).encode()
    for body in (once, twice, thrice):
        u = unwrap_response(500, "application/json", body)
        assert (u.status, u.error_type, u.request_id) == (529, "overloaded_error", "req_011FAKE529")
        assert json.loads(u.body) == OVERLOADED


@pytest.mark.parametrize("outer", ["chat", "ascii-escaped", "passthrough", "detail", "text", "chat-bytes"])
@pytest.mark.parametrize("inner", ["chat-bytes", "bytes-repr", "dict-repr"])
@pytest.mark.parametrize("message", ["\x1f", "a\\b", 'say "hi"\n', "\\u001f"])
def test_python_literal_quoted_inside_another_envelope(inner, outer, message):
    """An envelope holding a bytes (or dict) repr, quoted as a JSON string in another envelope: the Python
    literal is valid at the quoted level too, and read there it loses one level of backslashes."""
    n = native("api_error", message, "req_q")
    if inner == "dict-repr":
        wrapped = litellm_body(_prefix(repr(n)), 400)
    else:
        wrapped = ENVELOPES[inner](n, 400)
    body = ENVELOPES[outer](wrapped.decode(), 400)
    u = unwrap_response(400, "application/json", body)
    assert u.body == jsoncodec.dumps(n)


def test_quoted_text_before_the_error():
    bytes_repr = repr(compact(UNICODE).encode())
    for message in (
        'model "claude" said: ' + compact(UNICODE),
        'path "C:\\tmp\\{x}" then ' + bytes_repr,  # a JSON string with an escape and a `{`, no error
        'odd " quote then ' + bytes_repr,
        '"unterminated \\" ' + bytes_repr,
    ):
        u = unwrap_response(400, "application/json", litellm_body(message, 400))
        assert json.loads(u.body) == UNICODE, message


def test_other_prefixes_and_suffixes():
    for message in (
        "Error code: 429 - " + compact(RATE),
        "litellm.RateLimitError: AnthropicException - " + compact(RATE) + " (and then {some} text {",
        "{not json} then " + compact(RATE),
        "{}" + compact(RATE) + "{}",
        "upstream said: b'" + compact(RATE) + "' at 12:00",
    ):
        u = unwrap_response(429, "application/json", litellm_body(message, 429))
        assert json.loads(u.body) == RATE, message


def test_python_dict_repr():
    message = "litellm.RateLimitError: AnthropicException - " + repr(RATE)
    u = unwrap_response(429, "application/json", litellm_body(message, 429))
    assert json.loads(u.body) == RATE


def test_escaped_once_more():
    message = "error: " + json.dumps(compact(UNICODE))[1:-1]  # `{\"type\":\"error\"…`
    u = unwrap_response(400, "application/json", litellm_body(message, 400))
    assert json.loads(u.body) == UNICODE


def test_message_as_object():
    body = compact({"error": {"message": OVERLOADED, "type": "None", "code": "500"}}).encode()
    u = unwrap_response(500, "application/json", body)
    assert (u.status, json.loads(u.body)) == (529, OVERLOADED)


def test_detail_and_text_bodies():
    body = compact({"detail": "proxy error: " + compact(OVERLOADED)}).encode()
    u = unwrap_response(500, "application/json", body)
    assert (u.status, u.source, json.loads(u.body)) == (529, "embedded-json", OVERLOADED)
    u = unwrap_response(502, "text/plain", b"Bad gateway: " + jsoncodec.dumps(OVERLOADED))
    assert (u.status, u.source, json.loads(u.body)) == (529, "embedded-text", OVERLOADED)


def test_untyped_native_shape_is_rebuilt():
    body = b'{"type":"error","error":{"type":"None","message":"litellm.APIConnectionError: boom"}}'
    u = unwrap_response(500, "application/json", body)
    assert (u.status, u.error_type, u.source) == (500, "api_error", "untyped-error")
    assert json.loads(u.body)["error"]["message"] == "litellm.APIConnectionError: boom"


def test_inner_unknown_type_keeps_outer_status():
    inner = native("brand_new_error", "?", "req_x")
    u = unwrap_response(503, "application/json", litellm_body(compact(inner), 503))
    assert (u.status, u.error_type, u.request_id) == (503, "brand_new_error", "req_x")


def test_inner_without_request_id_uses_outer():
    outer = native("api_error", "wrapped: " + compact(native("overloaded_error", "Overloaded")), "req_outer")
    u = unwrap_response(500, "application/json", compact(outer).encode())
    assert (u.status, u.request_id) == (529, "req_outer")


def test_first_native_wins():
    message = compact(RATE) + " then " + compact(OVERLOADED)
    u = unwrap_response(500, "application/json", litellm_body(message, 500))
    assert u.error_type == "rate_limit_error"


# --------------------------------------------------------------------------------- bounds and abuse


def test_message_bounded():
    text = "x" * 5000
    u = unwrap_response(503, "text/plain", text.encode(), max_message=100)
    message = json.loads(u.body)["error"]["message"]
    assert len(message) == 100
    assert message.endswith(envelopes.TRUNCATION_MARK)
    u = unwrap_response(400, "application/json", litellm_body(text, 400), max_message=100)
    assert len(json.loads(u.body)["error"]["message"]) == 100
    u = unwrap_response(400, "text/plain", text.encode(), max_message=5)
    assert json.loads(u.body)["error"]["message"] == "xxxxx"
    u = unwrap_response(400, "text/plain", b"short", max_message=5)
    assert json.loads(u.body)["error"]["message"] == "short"
    u = unwrap_response(400, "text/plain", b"short", max_message=-3)
    assert json.loads(u.body)["error"]["message"] == ""


def test_inner_native_is_never_truncated():
    big = native("invalid_request_error", "y" * 10_000, "req_big")
    u = unwrap_response(400, "application/json", litellm_body(compact(big), 400), max_message=50)
    assert json.loads(u.body) == big


def test_huge_body_is_not_parsed():
    body = b'{"error":{"message":"' + b"z" * (envelopes.MAX_PARSE_BYTES + 10) + b'"}}'
    started = time.perf_counter()
    u = unwrap_response(500, "application/json", body, max_message=200)
    assert time.perf_counter() - started < 1
    assert (u.status, u.source) == (500, "non-json")
    message = json.loads(u.body)["error"]["message"]
    assert len(message) == 200 and message.endswith(envelopes.TRUNCATION_MARK)


@pytest.mark.parametrize(
    "body",
    [
        b"{" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"error":{"message":"' + b'{"type' * 100_000 + b'"}}',
        b'{"error":{"message":"' + b"b'{" * 100_000 + b'"}}',
        b'{"error":{"message":"' + b"{'" * 100_000 + b'"}}',
        b'{"error":{"message":"' + b'\\\\\\"{' * 50_000 + b'"}}',
        b"b'" + b"{\\'" * 200_000,
        json.dumps({"error": {"message": "{'a': " * 30_000}}).encode(),
        json.dumps({"error": {"message": "b'" + "\\x00{" * 60_000 + "'"}}).encode(),
    ],
)
def test_pathological_bodies_are_cheap(body):
    started = time.perf_counter()
    u = unwrap_response(500, "application/json", body)
    assert time.perf_counter() - started < 2
    assert u is not None and u.status == 500
    assert_native(u)


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe\x00garbage",
        b'{"error":{"message":"\xff\xff"}}',
        b'{"error":{"message":"\\ud800 lone surrogate"}}',
        b"null",
        b"42",
        b'"str"',
        b"[]",
        b'{"error":5}',
        b'{"error":{"message":5}}',
        b'{"error":{"message":null}}',
        b'{"type":"error","error":{"type":5}}',
        b'{"type":"error","error":{"type":"api_error","message":["a"]}}',
        b"NaN",
        b"1e999999",
        b"9" * 5000,
    ],
)
def test_odd_bodies(body):
    u = unwrap_response(500, "application/json", body)
    assert u is None or assert_native(u)


def test_odd_arguments():
    assert unwrap_response("500", None, b"x") is None  # type: ignore[arg-type]
    assert unwrap_response(None, None, b"x") is None  # type: ignore[arg-type]
    u = unwrap_response(500, None, "text body")  # type: ignore[arg-type]
    assert json.loads(u.body)["error"]["message"] == "text body"
    assert unwrap_response(500, None, 12345).source == "empty"  # type: ignore[arg-type]
    assert unwrap_response(500, None, bytearray(b"x")).source == "non-json"


# ---------------------------------------------------------------------------------- error events


def test_error_event_native_untouched():
    assert unwrap_error_event(OVERLOADED) is None
    assert unwrap_error_event(native("api_error", "litellm.APIConnectionError: boom")) is None


def test_error_event_wrapped():
    wrapped = native("api_error", "litellm.InternalServerError: AnthropicError - " + compact(OVERLOADED))
    assert unwrap_error_event(wrapped) == OVERLOADED
    envelope = json.loads(litellm_body(repr(compact(OVERLOADED).encode()), 500))
    assert unwrap_error_event(envelope) == OVERLOADED


def test_error_event_untyped_native_shape():
    data = {"type": "error", "error": {"type": "None", "message": "boom"}, "request_id": "req_9"}
    assert unwrap_error_event(data) == native("api_error", "boom", "req_9")


def test_error_event_litellm_shape_without_inner():
    data = json.loads(litellm_body("Overloaded", 529))
    assert unwrap_error_event(data) == native("overloaded_error", "Overloaded")
    data = {"error": {"message": "x", "type": "rate_limit_error"}}
    assert unwrap_error_event(data) == native("rate_limit_error", "x")
    data = {"error": {"message": "x", "type": "weird", "code": None}}
    assert unwrap_error_event(data) == native("api_error", "x")


@pytest.mark.parametrize(
    "data", [None, [], "x", {}, {"type": "ping"}, {"error": "x"}, {"error": {"code": 1}}]
)
def test_error_event_unknown(data):
    assert unwrap_error_event(data) is None


def test_error_event_result_is_a_copy():
    data = {"error": {"message": OVERLOADED, "code": "500"}}
    out = unwrap_error_event(data)
    out["error"]["type"] = "changed"
    assert data["error"]["message"]["error"]["type"] == "overloaded_error"


# ---------------------------------------------------------------------------------- header fixes


def test_header_fixes():
    headers = {
        "LLM_Provider-Retry-After": "12",
        "llm_provider-retry-after-ms": "12000",
        "llm_provider-x-should-retry": "true",
        "llm_provider-request-id": "req_1",
        "llm_provider-anthropic-ratelimit-requests-reset": "2030-01-01T00:00:00Z",
        "llm_provider-content-length": "99",
        "llm_provider-date": "yesterday",
        "llm_provider-server": "x",
    }
    assert header_fixes(headers) == {
        "retry-after": "12",
        "retry-after-ms": "12000",
        "x-should-retry": "true",
        "request-id": "req_1",
        "anthropic-ratelimit-requests-reset": "2030-01-01T00:00:00Z",
    }
    assert header_fixes({"llm_provider-retry-after": "12", "Retry-After": "3"}) == {}
    assert header_fixes({"llm_provider-retry-after": " "}) == {}
    assert header_fixes({}, "req_2") == {"request-id": "req_2"}
    assert header_fixes({"Request-Id": "req_1"}, "req_2") == {}
    assert header_fixes({"llm_provider-request-id": "req_1"}, "req_2") == {"request-id": "req_1"}
    assert header_fixes(None) == {}  # type: ignore[arg-type]


def test_header_fixes_with_mitmproxy_headers():
    mitm_http = pytest.importorskip("mitmproxy.http")
    headers = mitm_http.Headers(
        [(b"LLM_Provider-Retry-After", b"7"), (b"content-type", b"application/json")]
    )
    assert header_fixes(headers, "req_3") == {"retry-after": "7", "request-id": "req_3"}


# ---------------------------------------------------------------------------------------- properties

UNTYPED = {"", "None", "none", "null"}
error_types = st.one_of(
    st.sampled_from(sorted(protocol_errors.STATUS_BY_ERROR_TYPE)),
    st.text(min_size=1, max_size=20).filter(lambda t: t.strip() not in UNTYPED),
)
request_ids = st.one_of(st.none(), st.from_regex(r"req_[A-Za-z0-9]{1,24}", fullmatch=True))


@st.composite
def native_errors(draw):
    body = native(draw(error_types), draw(st.text(max_size=200)), draw(request_ids))
    if draw(st.booleans()):
        body["error"]["details"] = draw(st.none() | st.integers() | st.text(max_size=10))
    return body


def _prefix(e):
    return "litellm.RateLimitError: AnthropicException - " + e


OLD_SUFFIX = ". Received Model Group=m\nAvailable Model Group Fallbacks=None"
NEW_SUFFIX = "\n\nLiteLLM: model group 'm' failed with the error above. No fallback was attempted."


ENVELOPES = {
    "passthrough": lambda n, s: litellm_body(compact(n), s),
    "bytes-repr": lambda n, s: litellm_body(repr(compact(n).encode()), s),
    "routed-old": lambda n, s: litellm_body(compact(n) + OLD_SUFFIX, s),
    "routed-new": lambda n, s: jsoncodec.dumps(native(protocol_errors.error_type_for_status(s), _prefix(compact(n)) + NEW_SUFFIX)),
    "chat": lambda n, s: litellm_body(_prefix(compact(n)) + OLD_SUFFIX, s, "throttling_error", None),
    "chat-bytes": lambda n, s: litellm_body(_prefix(repr(compact(n).encode())) + NEW_SUFFIX, s, "x", None),
    "ascii-escaped": lambda n, s: json.dumps({"error": {"message": json.dumps(n), "code": s}}).encode(),
    "detail": lambda n, s: json.dumps({"detail": "upstream: " + compact(n)}).encode(),
    "text": lambda n, s: b"proxy error: " + compact(n).encode() + b" (retry later)",
}

affixes = st.text(max_size=30).filter(lambda t: "{" not in t and "b'" not in t and 'b"' not in t)


@given(
    n=native_errors(),
    status=st.integers(400, 599),
    kinds=st.lists(st.sampled_from(sorted(ENVELOPES)), min_size=1, max_size=3),
    pre=affixes,
    post=affixes,
)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_any_envelope_unwraps_to_exactly_the_native_error(n, status, kinds, pre, post):
    body = ENVELOPES[kinds[0]](n, status)
    for kind in kinds[1:]:  # wrap the previous envelope (as text) again
        body = ENVELOPES[kind](body.decode(), status) if kind not in ("routed-new",) else compact(
            native("api_error", pre + body.decode() + post)
        ).encode()
    u = unwrap_response(status, "application/json", body)
    assert u is not None
    assert json.loads(u.body) == n
    assert u.body == jsoncodec.dumps(n)
    assert u.error_type == n["error"]["type"]
    assert u.status == protocol_errors.status_for_error_type(n["error"]["type"], default=status)
    assert u.request_id == n.get("request_id")
    assert u.original_status == status


@given(n=native_errors(), status=st.integers(400, 599), pre=affixes, post=affixes)
def test_affixes_around_the_inner_error(n, status, pre, post):
    u = unwrap_response(status, "application/json", litellm_body(pre + compact(n) + post, status))
    assert json.loads(u.body) == n


@given(n=native_errors(), status=st.integers(400, 999), spaces=st.sampled_from(["", " ", "\n"]))
def test_native_errors_pass_through(n, status, spaces):
    body = (spaces + compact(n) + spaces).encode()
    assert unwrap_response(status, "application/json", body) is None
    assert unwrap_error_event(n) is None


@given(
    status=st.integers(-5, 1000),
    content_type=st.none() | st.sampled_from(["application/json", "text/html", "text/plain"]) | st.text(max_size=20),
    body=st.binary(max_size=2000),
)
@settings(max_examples=500)
def test_arbitrary_bytes_never_raise(status, content_type, body):
    u = unwrap_response(status, content_type, body)
    if status < 400:
        assert u is None
    elif u is not None:
        assert_native(u)
        assert isinstance(u.status, int)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(
        st.sampled_from(["type", "error", "message", "code", "detail", "request_id", "x"]) | st.text(max_size=5),
        inner,
        max_size=4,
    ),
    max_leaves=20,
)


@given(status=st.integers(400, 599), value=json_values)
@settings(max_examples=500)
def test_arbitrary_json_never_raises(status, value):
    u = unwrap_response(status, "application/json", json.dumps(value).encode())
    if u is not None:
        assert_native(u)
    result = unwrap_error_event(value)
    assert result is None or protocol_errors.is_native_error(result)


@given(data=st.dictionaries(st.text(max_size=40), st.text(max_size=40), max_size=8), rid=request_ids)
def test_header_fixes_never_raise_and_never_overwrite(data, rid):
    fixes = header_fixes(data, rid)
    present = {k.lower() for k in data}
    assert not (set(fixes) & present)
