"""The real key, echoed by an upstream anywhere in its answer, reaches no client, record, log line, metric or
saved flow (issue 30).

One gateway holds the upstream key (key custody: the agent holds a gateway token); a wire-level upstream
(tests/fakes/wire.py) answers every request with the bytes of one case, each putting the key it received
(`x-api-key`) somewhere an answer can carry it: header values and names, many and repeated headers, a header
cut by two TCP writes, reason phrases, 1xx and 101 answers, redirects, `www-authenticate`, trailers; JSON
bodies (success and error, top level and deep, in the model, the ids, `usage`, error types), gzip, br and zstd
bodies, error-in-200 bodies, LiteLLM and OpenRouter envelopes; SSE streams (text deltas cut in the middle of
the key, `message_start`'s model and id, error events, data-only frames, comments, CRLF, gzip, an unknown or
false encoding) and the gateway's conversions (JSON→SSE, SSE→JSON). Every case runs through one gateway
process (with debug logging and a `-w` flow file), then each place is searched for the key.

A case that turned out clean stays in the table: it cannot regress unseen.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import sys
import time

import brotli
import pytest
import zstandard
from mitmproxy import io as mio

from conftest import routed_rules
from e2e.test_e2e_otel import otel_env
from e2e.test_e2e_providers import service_account
from fakes.clouds import FakeCloud
from e2e.test_secrets import metrics_when_recorded, request, send
from fakes.wire import WireUpstream
from harness import ROOT, Gateway
from otlp import Receiver
from llm_gateway.policy.spec import token_hash
from llm_gateway.util.secretmask import MASKED_KEY
from secretvolume import write_secret

pytestmark = pytest.mark.e2e

MARK = secrets.token_hex(6)
KEY = f"sk-ant-api03-ECHOKEY{MARK}"  # the real key the gateway holds
TOKEN = f"llmgw-ECHOTOKEN{MARK}"  # the agent's gateway token
NEEDLES = [f"ECHOKEY{MARK}", f"ECHOTOKEN{MARK}"]
K = KEY.encode()
ASK = {"model": "claude-test-1", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def message(**over) -> dict:
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-test-1",
            "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 2}, **over}


def answer(status: bytes, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None,
           ctype: bytes = b"application/json", before: bytes = b"", split: bool = False) -> list[bytes]:
    """One HTTP/1.1 answer with a content-length; `before`: bytes first (a 1xx); `split`: the bytes cut in
    the middle of the key's first occurrence, as two TCP writes."""
    lines = [b"HTTP/1.1 " + status, b"content-type: " + ctype] if ctype else [b"HTTP/1.1 " + status]
    lines += [name + b": " + value for name, value in headers or []]
    lines += [b"content-length: %d" % len(body), b"connection: close"]
    raw = before + b"\r\n".join(lines) + b"\r\n\r\n" + body
    return cut(raw) if split else [raw]


def cut(raw: bytes) -> list[bytes]:
    at = raw.index(K) + len(K) // 2
    return [raw[:at], raw[at:]]


def chunked(status: bytes, parts: list[bytes], headers: list[tuple[bytes, bytes]] | None = None,
            ctype: bytes = b"text/event-stream", trailer: bytes = b"") -> list[bytes]:
    """A chunked answer: one TCP write for the head, one per part (each its own chunk), one for the end."""
    lines = [b"HTTP/1.1 " + status, b"content-type: " + ctype, b"transfer-encoding: chunked", b"connection: close"]
    lines += [name + b": " + value for name, value in headers or []]
    out = [b"\r\n".join(lines) + b"\r\n\r\n"]
    out += [b"%x\r\n" % len(p) + p + b"\r\n" for p in parts if p]
    return out + [b"0\r\n" + trailer + b"\r\n"]


def closed(status: bytes, body: bytes, headers: list[tuple[bytes, bytes]] | None = None,
           ctype: bytes = b"application/json") -> list[bytes]:
    """An answer whose body ends when the connection closes (no length to keep right: for `{{header}}` echoes)."""
    lines = [b"HTTP/1.1 " + status, b"content-type: " + ctype, b"connection: close"]
    lines += [name + b": " + value for name, value in headers or []]
    return [b"\r\n".join(lines) + b"\r\n\r\n" + body]


def sse(name: str | None, data: dict, eol: bytes = b"\n") -> bytes:
    head = b"event: " + name.encode() + eol if name else b""
    return head + b"data: " + json.dumps(data, separators=(",", ":")).encode() + eol + eol


def events(text: str = "hello", model: str = "claude-test-1", msg_id: str = "msg_01", eol: bytes = b"\n",
           named: bool = True) -> list[bytes]:
    """A whole stream, one event per part."""
    start = message(model=model, id=msg_id, content=[], stop_reason=None)
    seq = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": 2}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return [sse(name if named else None, data, eol) for name, data in seq]


def split_parts(parts: list[bytes]) -> list[bytes]:
    """The first part holding the key, cut in the key's middle into two chunks (two TCP writes)."""
    out = []
    for p in parts:
        if K in p and not any(K in q for q in out):
            out += cut(p)
        else:
            out.append(p)
    return out


J = lambda obj: json.dumps(obj, separators=(",", ":")).encode()  # noqa: E731
ERROR = J({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}})
OK = J(message())
S = KEY  # the key as text
ESCAPED = "".join(f"\\u{ord(c):04x}" for c in KEY)  # JSON's \\u escapes: the same string to a JSON reader


def cases() -> dict[str, tuple[bool, list[bytes]]]:
    """Case name -> (the client asks for a stream, the upstream's TCP writes)."""
    deep = message(id=f"msg_{S}", model=S, stop_reason=S, stop_sequence=S,
                   content=[{"type": "text", "text": f"your key is {S}"},
                            {"type": "tool_use", "id": f"toolu_{S}", "name": "t", "input": {"a": [{"b": S}]}}],
                   usage={"input_tokens": 3, "output_tokens": 2, "service_tier": S, "server_tool_use": {"x": S}})
    error_deep = J({"type": "error", "error": {"type": "invalid_request_error", "message": f"bad key {S}",
                                               "details": {"deep": [S]}}, "request_id": f"req_{S}"})
    return {
        # headers and status lines
        "hdr-values": (False, answer(b"200 OK", OK, [(b"x-echo", K), (b"x-api-key", K), (b"authorization", b"Bearer " + K),
                                                     (b"set-cookie", b"k=" + K), (b"request-id", b"req_" + K)])),
        "hdr-names": (False, answer(b"200 OK", OK, [(b"x-" + K, b"1"), (K, b"yes")])),
        "hdr-many": (False, answer(b"200 OK", OK, [(b"x-echo-%d" % i, K) for i in range(1500)] + [(b"x-echo", K)] * 3)),
        "hdr-split": (False, answer(b"200 OK", OK, [(b"x-echo", b"key=" + K + b"; more")], split=True)),
        "reason-error": (False, answer(b"401 " + K, ERROR)),
        "reason-ok": (False, answer(b"200 " + K, OK)),
        "redirect": (False, answer(b"307 Temporary Redirect", b"", [(b"location", b"https://elsewhere.test/?key=" + K)], ctype=b"")),
        "www-authenticate": (False, answer(b"401 Unauthorized", ERROR, [(b"www-authenticate", b'Bearer realm="' + K + b'"')])),
        "early-hints": (False, answer(b"200 OK", OK, before=b"HTTP/1.1 103 " + K + b"\r\nlink: </x?k=" + K + b">\r\n\r\n")),
        "upgrade-101": (False, [b"HTTP/1.1 101 " + K + b"\r\nupgrade: " + K + b"\r\nconnection: upgrade\r\n\r\n" + K]),
        "bad-header-line": (False, [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-echo " + K + b"\r\n\r\n{}"]),
        "bad-status-line": (False, [b"HTTP/1.1 2xx " + K + b"\r\ncontent-length: 2\r\n\r\n{}"]),
        "bad-chunk-size": (False, [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                                   + K + b"\r\n{}\r\n0\r\n\r\n"]),
        "chunk-extension": (False, [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                                    + b"%x;echo=" % len(OK) + K + b"\r\n" + OK + b"\r\n0\r\n\r\n"]),
        "header-folded": (False, [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-echo: a\r\n " + K
                                  + b"\r\ncontent-length: %d\r\n\r\n" % len(OK) + OK]),
        "trailers": (False, chunked(b"200 OK", [OK], ctype=b"application/json", trailer=b"x-echo: " + K + b"\r\n")),
        # JSON bodies
        "json-deep": (False, answer(b"200 OK", J(deep))),
        "json-deep-split": (False, answer(b"200 OK", J(deep), split=True)),
        "json-error": (False, answer(b"400 Bad Request", error_deep)),
        "json-error-type": (False, answer(b"400 Bad Request", J({"type": "error", "error": {"type": S, "message": S}}))),
        "error-in-200": (False, answer(b"200 OK", J({"type": "error", "error": {"type": "overloaded_error", "message": S}}))),
        "json-gzip": (False, answer(b"200 OK", gzip.compress(J(deep)), [(b"content-encoding", b"gzip")])),
        "json-br": (False, answer(b"200 OK", brotli.compress(J(deep)), [(b"content-encoding", b"br")])),
        "json-zstd": (False, answer(b"200 OK", zstandard.ZstdCompressor().compress(J(deep)), [(b"content-encoding", b"zstd")])),
        "error-gzip": (False, answer(b"401 Unauthorized", gzip.compress(error_deep), [(b"content-encoding", b"gzip")])),
        "json-unknown-encoding": (False, answer(b"200 OK", J(deep), [(b"content-encoding", b"x-custom")])),
        "json-false-gzip": (False, answer(b"200 OK", J(deep), [(b"content-encoding", b"gzip")])),
        "json-unicode-escaped": (False, answer(b"200 OK", J(message(model=ESCAPED, content=[{"type": "text", "text": ESCAPED}])).replace(b"\\\\u", b"\\u"))),
        "text-plain": (False, answer(b"502 Bad Gateway", b"upstream said " + K, ctype=b"text/plain")),
        "html": (False, answer(b"503 Service Unavailable", b"<h1>" + K + b"</h1>", ctype=b"text/html")),
        "litellm": (False, answer(b"401 Unauthorized", J({"error": {"message": f"litellm.AuthenticationError: {S}",
                                                                    "type": "auth_error", "param": S, "code": "401"}}))),
        "openrouter": (False, answer(b"402 Payment Required", J({"error": {"code": 402, "message": S,
                                                                         "metadata": {"raw": S, "provider_name": S}}}))),
        # streams
        "sse-text-split": (True, chunked(b"200 OK", split_parts(events(text=f"key {S} here")))),
        "sse-start": (True, chunked(b"200 OK", events(model=S, msg_id=f"msg_{S}"))),
        "sse-error": (True, chunked(b"200 OK", events()[:2] + [sse("error", {"type": "error", "error": {"type": S, "message": S}})])),
        "sse-data-only": (True, chunked(b"200 OK", events(text=S, model=S, named=False))),
        "sse-comment": (True, chunked(b"200 OK", [b": " + K + b"\n\n"] + events()[:3] + [b"event: " + K + b"\ndata: {}\n\n"] + events()[3:])),
        "sse-unicode-escaped": (True, chunked(b"200 OK", [e.replace(b"\\\\u", b"\\u") for e in events(text=ESCAPED, model=ESCAPED)])),
        "sse-crlf": (True, chunked(b"200 OK", split_parts(events(text=S, model=S, eol=b"\r\n")))),
        "sse-gzip": (True, chunked(b"200 OK", [gzip.compress(b"".join(events(text=S, model=S)))], [(b"content-encoding", b"gzip")])),
        "sse-unknown-encoding": (True, chunked(b"200 OK", events(text=S), [(b"content-encoding", b"x-custom")])),
        "sse-false-gzip": (True, chunked(b"200 OK", events(text=S), [(b"content-encoding", b"gzip")])),
        "sse-bad-chunk": (True, chunked(b"200 OK", events()[:3]) [:-1] + [K + b"\r\n\r\n"]),
        "sse-error-status": (True, chunked(b"529 Overloaded", [sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": S}})])),
        # the gateway's conversions: the client gets the form it asked for
        "sse-to-json": (False, chunked(b"200 OK", split_parts(events(text=S, model=S, msg_id=S)))),
        "json-to-sse": (True, answer(b"200 OK", J(deep))),
    }


@pytest.fixture(scope="module")
def echoed(tmp_path_factory):
    """Every case once through one gateway, then stopped (the flow file flushed); yields (gateway, flows
    file, each case's answer as the client got it, the upstream)."""
    tmp = tmp_path_factory.mktemp("echo")
    key_file = write_secret(tmp / "secret", "api-key", KEY)
    flows = tmp / "flows.mitm"
    table = cases()
    with WireUpstream({name: pieces for name, (_, pieces) in table.items()}) as upstream, Receiver() as receiver:
        rules = routed_rules(upstream.url, extra=f"""\
credentials:
  upstream: [{{name: main, key_file: {key_file}}}]
  tokens: [{{name: team-a, sha256: "{token_hash(TOKEN)}"}}]
otel: {{enabled: true, capture_content: true}}
""")
        args = ("-w", str(flows), "--set", "termlog_verbosity=debug", "--set", "flow_detail=3")
        with Gateway(rules, extra_args=args, env=otel_env(receiver.url)) as gw:
            got = {}
            for name, (stream, _) in table.items():
                body = {**ASK, "stream": True} if stream else ASK
                got[name] = send(gw.reverse_port, request("/v1/messages", "127.0.0.1", body, {
                    "x-api-key": TOKEN, "x-session-id": f"echo-{name}", "x-wire-case": name}))
            got["-/metrics"] = metrics_when_recorded(gw, len(table), {"x-api-key": TOKEN})
            deadline = time.monotonic() + 15
            while len(receiver.spans) < len(table) and time.monotonic() < deadline:  # the exporter's batches
                time.sleep(0.1)
        gw.spans, gw.points = list(receiver.spans), list(receiver.points)
        yield gw, flows, got, upstream


def as_read(text: str) -> str:
    """`text` with JSON's `\\uXXXX` escapes undone: what a client's JSON reader gets from its strings."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m[1], 16)), text)


def found(text: str) -> list[str]:
    text = text + as_read(text)
    return [n for n in NEEDLES if n in text]


def test_every_case_reached_the_upstream_with_the_real_key(echoed):
    _gw, _flows, got, upstream = echoed
    heads = [h for h in upstream.requests if b"x-wire-case" in h]
    assert len(heads) == len(cases())
    assert all(b"x-api-key: " + K in h and TOKEN.encode() not in h for h in heads)
    assert b"event: message_stop" in got["sse-text-split"] and b'"type":"message"' in got["json-deep"]
    assert got["reason-error"].startswith(b"HTTP/1.1 401") and got["hdr-many"].startswith(b"HTTP/1.1 200")
    for name in ("bad-header-line", "bad-status-line", "bad-chunk-size"):  # native errors, not mitmproxy's page
        assert got[name].startswith(b"HTTP/1.1 502") and b'"type":"error"' in got[name], got[name]


@pytest.mark.parametrize("case", sorted(cases()))
def test_the_client_never_gets_the_key(echoed, case):
    answer = echoed[2][case]
    assert answer, f"no answer to {case}"
    assert not found(answer.decode("latin-1")), answer[:2000]


@pytest.mark.parametrize("case", sorted(cases()))
def test_no_record_holds_the_key(echoed, case):
    gw = echoed[0]
    records = [r for r in gw.records(timeout=0, count=0) if r.get("session") == f"echo-{case}"]
    assert len(records) == 1, f"{len(records)} records for {case}"
    assert not found(json.dumps(records[0])), records[0]


def test_no_log_line_holds_the_key(echoed):
    out = echoed[0].output()
    assert "echo-json-deep" in out  # the log does describe the exchanges
    leaks = [line for line in out.splitlines() if found(line)]
    assert not leaks, "\n".join(leaks[:20])


def test_no_metric_holds_the_key(echoed):
    text = echoed[2]["-/metrics"].decode()
    assert "llm_gateway_requests_total" in text
    assert not found(text), [line for line in text.splitlines() if found(line)][:20]


def test_no_opentelemetry_span_event_or_point_holds_the_key(echoed):
    """The GenAI spans with `capture_content` on (the answer's text in span events) and the OTLP metrics."""
    gw = echoed[0]
    assert len(gw.spans) >= len(cases()) - 2  # (a 1xx or 101 answer may end without an exchange span)
    assert any(MASKED_KEY.decode() in json.dumps(s) for s in gw.spans)  # the captured content was masked
    leaks = [s["name"] for s in gw.spans if found(json.dumps(s, default=repr))]
    assert not leaks and not found(json.dumps(gw.points, default=repr))


def test_no_saved_flow_holds_the_key(echoed):
    """What mitmweb shows and `-w` saves: the whole flow, request and answer, metadata, comments, errors."""
    with open(echoed[1], "rb") as f:
        saved = list(mio.FlowReader(f).stream())
    assert len(saved) >= len(cases())
    leaks = [f.metadata.get("gateway", {}).get("session") or f.id for f in saved
             if found(json.dumps(f.get_state(), default=repr))]
    assert not leaks, leaks


def test_the_usage_report_never_holds_the_key(echoed):
    gw = echoed[0]
    done = subprocess.run(
        [sys.executable, "-m", "llm_gateway.tools.report", "--format", "json", str(gw.usage_log)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "addons")}, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert not found(done.stdout + done.stderr)


# --- a translated route: the gateway signs for Bedrock with its AWS credentials --------------------------------------

SESSION = f"gateway-held-aws-session-ECHOSESSION{MARK}"  # the AWS session token the gateway signs with
AWS_SECRET = f"gateway-held-aws-secret-ECHOSECRET{MARK}"  # never sent: an upstream cannot echo it
CLOUD_NEEDLES = [f"ECHOSESSION{MARK}", f"ECHOSECRET{MARK}", f"ECHOTOKEN{MARK}", "ya29.minted-"]  # the Google token
T = SESSION.encode()
BEDROCK_MODEL = "anthropic.claude-test-v1:0"
VERTEX_PATH = "/v1/projects/demo-project/locations/us-east5/publishers/anthropic/models/claude-test"


def eventstream(events_: list[dict], split: bool = False) -> list[bytes]:
    """Bedrock's stream: one event-stream `chunk` frame per Anthropic event (the event base64 inside, so the
    token is not in the wire bytes as it is), the frame holding the token cut in two writes."""
    from fakes.clouds import chunk_frame

    frames = [chunk_frame(e) for e in events_]
    head = [b"HTTP/1.1 200 OK\r\ncontent-type: application/vnd.amazon.eventstream\r\nconnection: close\r\n\r\n"]
    if split:
        at = next(i for i, e in enumerate(events_) if SESSION in json.dumps(e))
        frames[at:at + 1] = [frames[at][: len(frames[at]) // 2], frames[at][len(frames[at]) // 2:]]
    return head + frames


def api_events(text: str = "hello", model: str = "claude-test-1") -> list[dict]:
    return [json.loads(e.split(b"data: ", 1)[1]) for e in events(text=text, model=model)]


def cloud_cases() -> dict[str, tuple[bool | None, list[bytes]]]:
    """As `cases`; None: the cloud's own call (Bedrock's InvokeModel, Vertex's rawPredict) from its own client."""
    from fakes.clouds import exception_frame

    s = SESSION
    google = "{{authorization}}"  # the `Bearer ya29…` the gateway sent, as the wire upstream received it
    vertex_message = J(message(model=google, content=[{"type": "text", "text": f"you sent {google}"}]))
    return {
        # Vertex: the Google access token the gateway fetched and sent
        "vertex-json": (None, closed(b"200 OK", vertex_message, [(b"x-echo", google.encode())])),
        "vertex-stream": (None, closed(b"200 OK", b"".join(events(text=f"you sent {google}", model=google)),
                                       ctype=b"text/event-stream")),
        "vertex-error": (None, closed(b"401 Unauthorized", J({"error": {"code": 401, "status": "UNAUTHENTICATED",
                                                                      "message": f"invalid credentials: {google}"}}))),
        "bedrock-json": (False, answer(b"200 OK", J(message(model=s, id=f"msg_{s}", content=[{"type": "text", "text": s}])),
                                       [(b"x-amzn-requestid", T), (b"x-echo", T)])),
        "bedrock-error": (False, answer(b"403 Forbidden", J({"message": f"The security token included in the request is invalid: {s}"}),
                                        [(b"x-amzn-errortype", b"UnrecognizedClientException:" + T)])),
        "bedrock-reason": (False, answer(b"400 " + T, J({"message": "bad"}), [(b"x-amzn-errortype", b"ValidationException")])),
        "bedrock-stream": (True, eventstream(api_events(text=f"token {s}", model=s), split=True)),
        # a Bedrock client of the base-URL listener (the gateway signs): its own wire format comes back
        "bedrock-native-json": (None, answer(b"200 OK", J(message(model=s, content=[{"type": "text", "text": s}])))),
        "bedrock-native-stream": (None, eventstream(api_events(text=f"token {s}", model=s))),
        "bedrock-native-exception": (None, eventstream(api_events()[:2]) + [exception_frame(s, f"slow down {s}")]),
        "bedrock-exception": (True, eventstream(api_events()[:2]) + [
            exception_frame("throttlingException", f"slow down {s}")]),
    }


@pytest.fixture(scope="module")
def cloud_echoed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cloud-echo")
    key_file = write_secret(tmp / "secret", "api-key", KEY)
    flows = tmp / "flows.mitm"
    table = cloud_cases()
    with WireUpstream({name: pieces for name, (_, pieces) in table.items()}) as upstream, FakeCloud() as google:
        rules = (ROOT / "rules.yaml").read_text().replace("routes: []", f"""routes:
  - match: {{api: anthropic}}
    upstream: {upstream.url}
    provider: bedrock
    region: us-east-1""") + f"""
clouds:
  bedrock: {{region: us-east-1}}
  vertex: {{}}
credentials:
  upstream: [{{name: main, key_file: {key_file}}}]
  tokens: [{{name: team-a, sha256: "{token_hash(TOKEN)}"}}]
"""
        env = {"AWS_ACCESS_KEY_ID": "AKIAECHOTESTKEY00001", "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_SESSION_TOKEN": SESSION,
               "GOOGLE_APPLICATION_CREDENTIALS": str(service_account(tmp, google))}
        args = ("-w", str(flows), "--set", "termlog_verbosity=debug", "--set", "flow_detail=3")
        with Gateway(rules, regular=False, reverse_to=upstream.url, extra_args=args, env=env) as gw:
            got = {}
            for name, (stream, _) in table.items():
                upstream.queue.append(name)
                if stream is None and name.startswith("vertex"):  # Vertex's own call, the gateway token its bearer
                    action = "streamRawPredict" if name.endswith("stream") else "rawPredict"
                    body = {"anthropic_version": "vertex-2023-10-16", **{k: v for k, v in ASK.items() if k != "model"},
                            **({"stream": True} if name.endswith("stream") else {})}
                    got[name] = send(gw.reverse_port, request(f"{VERTEX_PATH}:{action}", "127.0.0.1", body, {
                        "authorization": f"Bearer {TOKEN}", "x-session-id": f"echo-{name}"}))
                    continue
                if stream is None:  # Bedrock's own InvokeModel call, with the gateway token as its bearer token
                    action = "invoke" if name.endswith("json") else "invoke-with-response-stream"
                    body = {"anthropic_version": "bedrock-2023-05-31", **{k: v for k, v in ASK.items() if k != "model"}}
                    got[name] = send(gw.reverse_port, request(f"/model/{BEDROCK_MODEL}/{action}", "127.0.0.1", body, {
                        "authorization": f"Bearer {TOKEN}", "x-session-id": f"echo-{name}"}))
                    continue
                body = {**ASK, "stream": True} if stream else ASK
                got[name] = send(gw.reverse_port, request("/v1/messages", "127.0.0.1", body, {
                    "x-api-key": TOKEN, "x-session-id": f"echo-{name}"}))
            got["-/metrics"] = metrics_when_recorded(gw, len(table), {"x-api-key": TOKEN})
        yield gw, flows, got, upstream


def cloud_found(text: str) -> list[str]:
    return [n for n in CLOUD_NEEDLES if n in text]


def test_the_translated_requests_carried_the_session_token(cloud_echoed):
    gw, _flows, got, upstream = cloud_echoed
    assert len(upstream.requests) == len(cloud_cases())
    bedrock = [h for h in upstream.requests if b"/model/" in h]
    assert len(bedrock) == len([n for n in cloud_cases() if n.startswith("bedrock")])
    assert all(b"x-amz-security-token: " + T in h for h in bedrock)
    vertex = [h for h in upstream.requests if b"/publishers/anthropic/" in h]
    assert len(vertex) == 3 and all(b"authorization: Bearer ya29.minted-" in h for h in vertex)
    assert b'"type":"message"' in got["vertex-json"] and b"event: message_stop" in got["vertex-stream"]
    assert TOKEN.encode() not in b"".join(upstream.requests)
    assert b"eventstream" in got["bedrock-native-stream"].split(b"\r\n\r\n")[0] and b'"bytes"' in got["bedrock-native-stream"]
    assert got["bedrock-json"].startswith(b"HTTP/1.1 200") and b'"type":"message"' in got["bedrock-json"]
    assert b"event: message_stop" in got["bedrock-stream"] and got["bedrock-error"].startswith(b"HTTP/1.1 401")  # a native error for an Anthropic client


def as_bedrock_reads(answer: bytes) -> str:
    """The answer as text, with every base64 `"bytes"` payload of an event stream decoded (what the SDK reads)."""
    text = answer.decode("latin-1")
    decoded = [base64.b64decode(m).decode("latin-1") for m in re.findall(r'"bytes":\s*"([A-Za-z0-9+/=]+)"', text)]
    return "\n".join([text, *decoded])


@pytest.mark.parametrize("case", sorted(cloud_cases()))
def test_the_client_of_a_cloud_route_never_gets_the_cloud_token(cloud_echoed, case):
    answer = cloud_echoed[2][case]
    assert answer and not cloud_found(as_bedrock_reads(answer)), answer[:2000]


def test_no_record_log_metric_or_saved_flow_holds_the_cloud_token(cloud_echoed):
    gw, flows, got, _ = cloud_echoed
    records = gw.records(timeout=0, count=0)
    assert {r["session"] for r in records} >= {f"echo-{name}" for name in cloud_cases()}
    assert not cloud_found(json.dumps(records)), [r for r in records if cloud_found(json.dumps(r))]
    assert not cloud_found(got["-/metrics"].decode())
    leaks = [line for line in gw.output().splitlines() if cloud_found(line)]
    assert not leaks, "\n".join(leaks[:20])
    with open(flows, "rb") as f:
        saved = list(mio.FlowReader(f).stream())
    leaks = [f.id for f in saved if cloud_found(json.dumps(f.get_state(), default=repr))]
    assert not leaks


def test_the_bedrock_client_gets_whole_valid_frames_with_the_token_masked(cloud_echoed):
    """The masked frames are encoded again: botocore's reader (which checks both CRCs) reads every one."""
    from botocore.eventstream import EventStreamBuffer

    head, _, body = cloud_echoed[2]["bedrock-native-stream"].partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        data, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            data, rest = data + rest[:n], rest[n + 2:]
        body = data
    buffer = EventStreamBuffer()
    buffer.add_data(body)
    texts = [base64.b64decode(json.loads(m.payload)["bytes"]).decode() for m in buffer]
    assert len(texts) == len(api_events())
    assert any(MASKED_KEY.decode() in t for t in texts) and not cloud_found("".join(texts))


# --- failover: the first upstream's broken answer, quoted in the reason the record keeps --------------------------------


def test_a_failed_upstream_that_echoes_the_key_is_recorded_without_it(tmp_path):
    """A route with two upstreams: the first answers a status line holding the key (mitmproxy's protocol error
    quotes it), the second answers. The record's `failed_upstreams`, the log and the flow's comment name the
    failure, never the key."""
    key_file = write_secret(tmp_path / "secret", "api-key", KEY)
    flows = tmp_path / "flows.mitm"
    broken = {"broken": [b"HTTP/1.1 2xx " + K + b"\r\ncontent-length: 2\r\n\r\n{}"]}
    fine = {"fine": answer(b"200 OK", OK)}
    with WireUpstream(broken) as first, WireUpstream(fine) as second:
        first.queue.append("broken")
        second.queue.append("fine")
        rules = routed_rules(first.url, extra=f"""\
credentials:
  upstream: [{{name: main, key_file: {key_file}}}]
  tokens: [{{name: team-a, sha256: "{token_hash(TOKEN)}"}}]
""").replace(f"upstream: {first.url}", f"upstream: [{first.url}, {second.url}]")
        with Gateway(rules, extra_args=("-w", str(flows))) as gw:
            got = send(gw.reverse_port, request("/v1/messages", "127.0.0.1", ASK, {
                "x-api-key": TOKEN, "x-session-id": "echo-failover"}))
            [record] = gw.records(count=1)
    assert got.startswith(b"HTTP/1.1 200") and not found(got.decode("latin-1"))
    assert len(record["failed_upstreams"]) == 1 and "closed before answering" in record["failed_upstreams"][0]["reason"]
    assert not found(json.dumps(record)), record["failed_upstreams"]
    leaks = [line for line in gw.output().splitlines() if found(line)]
    assert not leaks, leaks
    with open(flows, "rb") as f:
        assert not [f.id for f in mio.FlowReader(f).stream() if found(json.dumps(f.get_state(), default=repr))]


def h2_exchange(gw: Gateway, host: str, headers: list[tuple[str, str]], body: bytes) -> tuple[dict, bytes, bool]:
    """One HTTP/2 request through the egress listener: CONNECT, TLS with ALPN `h2` (trusting the gateway's CA),
    then h2 frames by the `h2` library (mitmproxy's own). Returns (the answer's headers, its body, whether the
    stream ended by END_STREAM rather than a reset)."""
    import h2.config
    import h2.connection
    import h2.events

    with socket.create_connection(("127.0.0.1", gw.regular_port), timeout=15) as s:
        s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nhost: {host}:443\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(1)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        context = ssl.create_default_context(cafile=str(gw.ca_cert))
        context.set_alpn_protocols(["h2"])
        with context.wrap_socket(s, server_hostname=host) as tls:
            assert tls.selected_alpn_protocol() == "h2"
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", "POST"), (":path", "/v1/messages"), (":scheme", "https"),
                                    (":authority", host), *headers])
            conn.send_data(sid, body, end_stream=True)
            tls.sendall(conn.data_to_send())
            answer: dict = {}
            data, ended = b"", None
            while ended is None and (chunk := tls.recv(65536)):
                for event in conn.receive_data(chunk):
                    if isinstance(event, h2.events.ResponseReceived):
                        answer = {k.decode(): v.decode("latin-1") for k, v in event.headers}
                    elif isinstance(event, h2.events.DataReceived):
                        data += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, sid)
                    elif isinstance(event, h2.events.StreamEnded):
                        ended = True
                    elif isinstance(event, h2.events.StreamReset):
                        ended = False
                tls.sendall(conn.data_to_send())
            return answer, data, bool(ended)


@pytest.mark.parametrize("case", ["bad-status-line", "bad-header-line", "bad-chunk-size"])
def test_an_http2_client_gets_the_native_502_not_a_page_quoting_the_key(tmp_path, case):
    """An answer that does not parse, to a client that speaks HTTP/2 with the gateway (egress mode, ALPN h2):
    mitmproxy's own HTTP/2 error page quotes the upstream's bytes (the key); the gateway writes its native 502 on
    that stream instead, as it does for HTTP/1 clients."""
    key_file = write_secret(tmp_path / "secret", "api-key", KEY)
    _, pieces = cases()[case]
    with WireUpstream({case: pieces}) as upstream:
        rules = routed_rules(upstream.url, extra=f"""\
credentials:
  upstream: [{{name: main, key_file: {key_file}}}]
  tokens: [{{name: team-a, sha256: "{token_hash(TOKEN)}"}}]
""")
        with Gateway(rules) as gw:
            headers, body, ended = h2_exchange(gw, "api.anthropic.com", [
                ("content-type", "application/json"), ("x-api-key", TOKEN), ("x-wire-case", case)],
                json.dumps(ASK).encode())
            record = gw.wait_record(lambda r: r.get("status") == 502)
    assert headers.get(":status") == "502" and ended, (headers, body)
    assert headers.get("content-type") == "application/json" and headers.get("x-should-retry") == "true"
    assert json.loads(body)["type"] == "error", body
    assert not found(json.dumps(headers) + body.decode("latin-1")), (headers, body)
    assert not found(json.dumps(record)), record
