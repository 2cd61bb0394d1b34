"""Fake Amazon Bedrock and Google Vertex AI endpoints for Claude, on 127.0.0.1, over TLS or plain HTTP.

Independent of the gateway: the wire formats come from the clouds' API references and what the Anthropic SDK's
`AnthropicBedrock` / `AnthropicVertex` clients send and parse.

Bedrock (`/model/<id>/invoke`, `/model/<id>/invoke-with-response-stream`): the request must carry a SigV4
`Authorization` (`AWS4-HMAC-SHA256 Credential=<key>/<date>/<region>/bedrock/aws4_request, SignedHeaders=…,
Signature=<64 hex>`) and `x-amz-date`, else 403 as AWS answers it. It answers the Message as JSON, or as AWS
event-stream frames (prelude, string headers, payload, CRC32s: `frame`), one `chunk` per Anthropic event with
the event base64 in `{"bytes": …}`, the last one also carrying `amazon-bedrock-invocationMetrics`.
Errors: `x-amzn-ErrorType` + `{"message": …}`, or an `exception` frame once the stream has begun.

Google's token endpoint (`POST /token`, a JWT-bearer grant as a service account makes it) mints `ya29.minted-…`.

Vertex (`…/publishers/anthropic/models/<model>:rawPredict` / `:streamRawPredict`): `Authorization: Bearer <token>`
required; the Message as JSON or the API's own SSE; errors in Google's shape `{"error": {"code", "message",
"status"}}`.

A request picks a failure with the `x-fake-cloud` header: `throttle` (429 before the answer), `throttle-mid-stream`
(an exception frame after message_start), `overloaded` (Bedrock 503 ServiceUnavailableException); `pause-<seconds>`
makes a Bedrock stream silent that long after its first content_block_start (a model thinking). Bedrock's stream
carries no `ping` events (the API's keep-alives are not Bedrock's).
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import ssl
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

from fakes.upstream import Scenario, build_message, message_to_events, sse_frame

SIGV4 = re.compile(r"^AWS4-HMAC-SHA256 Credential=(\w+)/(\d{8})/([a-z0-9-]+)/bedrock/aws4_request, "
                   r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$")
BEDROCK_PATH = re.compile(r"^/model/([^/]+)/(invoke|invoke-with-response-stream|count-tokens)$")
VERTEX_PATH = re.compile(r"^(?:/v1)?/projects/([^/]+)/locations/([^/]+)/publishers/anthropic/models/([^/:]+):(rawPredict|streamRawPredict)$")
FAKE_HEADER = "x-fake-cloud"
# Bedrock's answers name the model without the provider prefix and version suffix (what the SDK sees)
USAGE = {"input_tokens": 40, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1200, "output_tokens": 9}


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: total length, headers length, prelude CRC32, headers (type 7, string),
    payload, message CRC32 (big-endian throughout)."""
    head = b"".join(
        bytes([len(k)]) + k.encode() + b"\x07" + struct.pack(">H", len(v.encode())) + v.encode() for k, v in headers.items()
    )
    prelude = struct.pack(">II", 12 + len(head) + len(payload) + 4, len(head))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + head + payload
    return message + struct.pack(">I", zlib.crc32(message))


def chunk_frame(event: dict) -> bytes:
    data = json.dumps(event, separators=(",", ":")).encode()
    payload = json.dumps({"bytes": base64.b64encode(data).decode(), "p": "abcdefghij"}).encode()
    return frame({":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}, payload)


def exception_frame(name: str, message: str) -> bytes:
    return frame({":exception-type": name, ":content-type": "application/json", ":message-type": "exception"},
                 json.dumps({"message": message}).encode())


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        fake = self.server.fake
        fake.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
        path = self.path.split("?", 1)[0]
        if path == "/token":  # Google's OAuth token endpoint, as a service account's `token_uri` names it
            self._token(body)
        elif (m := BEDROCK_PATH.match(path)) and m.group(2) == "count-tokens":
            self._bedrock_count(m.group(1), body)
        elif m := BEDROCK_PATH.match(path):
            self._bedrock(m.group(1), m.group(2) == "invoke-with-response-stream", body)
        elif m := VERTEX_PATH.match(path):
            self._vertex(m.group(3), m.group(4) == "streamRawPredict", body)
        else:
            self._send(404, "application/json", json.dumps({"message": f"no route for {path}"}).encode())

    # -- Bedrock
    def _bedrock(self, model: str, stream: bool, body: bytes) -> None:
        auth = self.headers.get("authorization") or ""
        m = SIGV4.match(auth)
        if not m or not self.headers.get("x-amz-date") or "host" not in m.group(4).split(";"):
            self._aws_error(403, "UnrecognizedClientException", "The security token included in the request is invalid.")
            return
        request = json.loads(body)
        if not isinstance(request.get("anthropic_version"), str) or {"model", "stream", "tags"} & set(request):
            self._aws_error(400, "ValidationException", "Malformed input request: #: required key [anthropic_version] "
                            "not found, extraneous key [model] is not permitted")
            return
        how = self.headers.get(FAKE_HEADER)
        if how == "throttle":
            self._aws_error(429, "ThrottlingException", "Too many requests, please wait before trying again.")
            return
        if how == "overloaded":
            self._aws_error(503, "ServiceUnavailableException", "Bedrock is unable to process your request.")
            return
        message = self._message(request, "claude-sonnet-4-5-20250929")
        if not stream:
            self._send(200, "application/json", json.dumps(message).encode())
            return
        self._start(200, "application/vnd.amazon.eventstream")
        events = [data for _, data in message_to_events(message, Scenario(ping=False))]
        pause = float(how[len("pause-"):]) if how and how.startswith("pause-") else 0.0
        for i, event in enumerate(events):
            if i == len(events) - 1:
                u = message["usage"]
                event = {**event, "amazon-bedrock-invocationMetrics": {
                    "inputTokenCount": u["input_tokens"], "outputTokenCount": u["output_tokens"],
                    "invocationLatency": 120, "firstByteLatency": 80,
                    "cacheReadInputTokenCount": u["cache_read_input_tokens"], "cacheWriteInputTokenCount": 0}}
            self._chunk(chunk_frame(event))
            if pause and event.get("type") == "content_block_start":
                time.sleep(pause)
                pause = 0.0
            if how == "throttle-mid-stream" and i == 0:
                self._chunk(exception_frame("throttlingException", "Too many tokens, please wait before trying again."))
                break
        self._chunk(b"")

    def _bedrock_count(self, model: str, body: bytes) -> None:
        """CountTokens: `{"input": {"invokeModel": {"body": base64}}}` of a valid InvokeModel body, a foundation model."""
        if not SIGV4.match(self.headers.get("authorization") or "") or not model.startswith("anthropic."):
            self._aws_error(400, "ValidationException", "The provided model identifier is invalid.")
            return
        invoke = json.loads(base64.b64decode(json.loads(body)["input"]["invokeModel"]["body"]))
        if not isinstance(invoke.get("max_tokens"), int) or "model" in invoke or invoke.get("tools") == []:
            self._aws_error(400, "ValidationException", "Malformed input request")
            return
        self._send(200, "application/json", json.dumps({"inputTokens": USAGE["input_tokens"]}).encode())

    def _aws_error(self, status: int, name: str, message: str) -> None:
        self._send(status, "application/json", json.dumps({"message": message}).encode(),
                   {"x-amzn-ErrorType": f"{name}:http://internal.amazon.com/coral/com.amazon.bedrock/"})

    # -- Vertex
    def _vertex(self, model: str, stream: bool, body: bytes) -> None:
        auth = self.headers.get("authorization") or ""
        if not auth.startswith("Bearer ") or len(auth) < 20:
            self._google_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
            return
        request = json.loads(body)
        if model == "count-tokens":  # the count endpoint takes the model in the body
            if not isinstance(request.get("anthropic_version"), str) or "@" not in str(request.get("model")):
                self._google_error(400, "INVALID_ARGUMENT", "model: a Vertex model id is required")
                return
            self._send(200, "application/json", json.dumps({"input_tokens": USAGE["input_tokens"]}).encode())
            return
        if not isinstance(request.get("anthropic_version"), str) or "model" in request:
            self._google_error(400, "INVALID_ARGUMENT", "anthropic_version: Field required; model: Extra inputs are not permitted")
            return
        if self.headers.get(FAKE_HEADER) == "throttle":
            self._google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model")
            return
        message = self._message(request, model.replace("@", "-"))
        if not stream:
            self._send(200, "application/json", json.dumps(message).encode())
            return
        self._start(200, "text/event-stream; charset=utf-8")
        for name, data in message_to_events(message, Scenario(ping=True)):
            self._chunk(sse_frame(name, data))
        self._chunk(b"")

    def _token(self, body: bytes) -> None:
        form = dict(part.split("=", 1) for part in body.decode().split("&") if "=" in part)
        if form.get("grant_type") != "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer" or form.get("assertion", "").count(".") != 2:
            self._send(400, "application/json", json.dumps({"error": "invalid_grant"}).encode())
            return
        fake = self.server.fake
        fake.tokens_minted += 1
        self._send(200, "application/json", json.dumps({"access_token": f"ya29.minted-{fake.tokens_minted:04d}-secret",
                                                        "expires_in": 3600, "token_type": "Bearer"}).encode())

    def _google_error(self, code: int, status: str, message: str) -> None:
        self._send(code, "application/json", json.dumps({"error": {"code": code, "message": message, "status": status}}).encode())

    # -- writing
    def _message(self, request: dict, model: str) -> dict:
        fake = self.server.fake
        fake.count += 1
        spec = Scenario(model=model, usage=dict(USAGE))
        fake.last_message = build_message(spec, request, f"msg_fake_{fake.count:04d}")
        return fake.last_message

    def _send(self, status: int, content_type: str, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-amzn-requestid", f"req-{self.server.fake.count:04d}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _start(self, status: int, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fake: "FakeCloud") -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", 0), _Handler)

    def get_request(self):
        sock, addr = super().get_request()
        if self.fake.tls is not None:
            sock = self.fake.tls.wrap_socket(sock, server_side=True)
        return sock, addr

    def handle_error(self, request, client_address):
        pass


class FakeCloud:
    """Bedrock and Vertex on one 127.0.0.1 port (the path tells them apart); TLS with `cert`/`key` given."""

    def __init__(self, cert: Path | None = None, key: Path | None = None) -> None:
        self.tls = None
        if cert is not None:
            self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls.load_cert_chain(cert, key)
        self.requests: list[dict] = []
        self.count = 0
        self.tokens_minted = 0
        self.last_message: dict | None = None
        self.server = _Server(self)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> "FakeCloud":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

