"""The answer pipeline: one place decides what an upstream answer means for the client and for the record.

An answer reaches the client by one of three paths: a buffered body (JSON, or an error of any content type),
a relayed SSE stream, or a buffered conversion (SSE→JSON or JSON→SSE when a client rule forced the upstream
form). All three read events with the one `StreamReader` (usage, the model that answered, the end of the
message, error frames unwrapped in place), turn error bodies into native errors with the one
`envelopes.unwrap_response`, and leave on the exchange what the client received: `status`, `error_type`,
`request_id`, `complete`, `reason`. The record builder (usage.build_record) reads only that.

    buffered body   ── error_answer ─────────────────────────┐
    relayed stream  ── StreamReader (on the relay) ──────────┤── settle / settle_failure ── the record
    SSE→JSON        ── StreamReader (relay.replay) ── accumulate
    JSON→SSE        ── messages.message_to_sse of the Message ───┘

Modelled on Envoy AI Gateway's per-request translator (it returns changes and token usage; the processor
decides error-or-success once and records usage in one place) and the Anthropic SDK's `accumulate_event`
(a pure accumulator whose caller owns the state): the conversion accumulates what the reader passed on.

Where mitmproxy itself answers (no upstream response: refused, reset, closed before the end of a buffered
body) it writes its own text/html page after the `error` hook, and mitmproxy 12 lets no addon replace it
through its API (see `settle_failure`): addons/answer.py has mitm/layers write a native 502 in its place for
HTTP/1 clients. The record says what the client got: that status, its native error type and a short `reason`.
"""

from __future__ import annotations

import asyncio
import logging
import weakref

from mitmproxy import http

from llm_gateway.pipeline import exchange, relay
from llm_gateway.protocol import decoding, envelopes, errors, jsoncodec, messages, providers, sse
from llm_gateway.protocol.sse import SSE_TYPE
from llm_gateway.util.logsafe import clean

logger = logging.getLogger("llm_gateway.answer")

TRUNCATED_MESSAGE = "the upstream stream ended before message_stop; the answer is incomplete"
# mitmproxy answers with this status when the upstream failed before the client got response headers
# (`ErrorCode.http_status_code()` of CONNECT_FAILED and GENERIC_SERVER_ERROR in proxy/layers/http/_events.py).
MITMPROXY_ERROR_STATUS = 502
CLIENT_GONE = "Client disconnected"  # how mitmproxy's flow.error starts when the client went away
# A buffered answer is never decoded past this (bytes): a Message or an error is a few megabytes at most, and a
# 260 kB gzip error body expands to 256 MiB in mitmproxy's unbounded get_content().
ANSWER_LIMIT = 16 * 1024 * 1024
TOO_LARGE_MESSAGE = f"the upstream's answer decodes to over {ANSWER_LIMIT} bytes; the gateway did not read it"


# Buffered answers decoded off the event loop (`decode_off_loop`): response -> (the raw bytes decoded, the body
# or None past ANSWER_LIMIT). Weak: an entry goes with its response; `forget` drops it once the hooks are done.
_decoded: weakref.WeakKeyDictionary[http.Response, tuple[bytes, bytes | None]] = weakref.WeakKeyDictionary()


def _decode(raw: bytes, encoding: str | None) -> bytes | None:
    try:
        return decoding.decode(raw, encoding, ANSWER_LIMIT)
    except decoding.TooLarge:
        return None


def body_of(response: http.Response) -> bytes | None:
    """A buffered answer's body, decoded (`Content-Encoding`) up to ANSWER_LIMIT bytes; None past it. The
    decoding `decode_off_loop` did is reused while the raw bytes are the same object."""
    raw = response.raw_content or b""
    cached = _decoded.get(response)
    if cached is not None and cached[0] is raw:
        return cached[1]
    return _decode(raw, response.headers.get("content-encoding"))


async def decode_off_loop(response: http.Response) -> None:
    """Decode a compressed buffered answer once, in a worker thread, for `body_of` (the `response` hook, before
    any reader). Up to 16 MiB of output (a 260 kB gzip error body reaches the bound) took 80-200 ms of event
    loop, every stream of the replica stalled meanwhile (issue 30); zlib, brotli and zstandard release the
    interpreter lock while they inflate (each step is one C call), so the loop runs on. An identity body
    costs nothing to read and stays on the loop."""
    raw = response.raw_content
    encoding = response.headers.get("content-encoding")
    if response.stream or not raw:
        return
    try:
        if decoding.decoder_for(encoding) is None:
            return
    except ValueError:  # an encoding nobody decodes: `body_of` gives the bytes as they are
        return
    _decoded[response] = (raw, await asyncio.to_thread(_decode, raw, encoding))


def forget(response: http.Response) -> None:
    """The answer's hooks are done with its decoded body: the memory goes now, not with the flow."""
    _decoded.pop(response, None)


def is_sse(response: http.Response) -> bool:
    return response.headers.get("content-type", "").lower().startswith(SSE_TYPE)


def is_eventstream(response: http.Response) -> bool:
    return response.headers.get("content-type", "").lower().startswith(providers.EVENTSTREAM_TYPE)


def cloud_error(response: http.Response, ex: exchange.Exchange) -> None:
    """A Bedrock or Vertex error answered to the cloud's own (signing) client: passed on as it came, its native
    error type recorded: Bedrock names its exception in `x-amzn-ErrorType` (or the body's `__type`), Vertex
    answers Google's `{"error": {"code", "message", "status"}}`, typed here by its HTTP status."""
    if ex.provider == providers.BEDROCK:
        name = response.headers.get("x-amzn-errortype")
        if not name:
            body = jsoncodec.parse_json_body(response.get_content(strict=False))
            name = body.get("__type") if isinstance(body, dict) and isinstance(body.get("__type"), str) else None
        if name:
            ex.error_type = providers.bedrock_error_type(name.rsplit("#", 1)[-1])
    ex.request_id = response.headers.get("x-amzn-requestid") or ex.request_id
    if ex.error_type is None:
        ex.error_type = errors.error_type_for_status(response.status_code)


def translated_error(response: http.Response, ex: exchange.Exchange) -> None:
    """A cloud's error, for a client that sent an Anthropic request: the native error with the status of its type
    (Google's `error.status`; Bedrock's `x-amzn-ErrorType`, else the body's `__type`; else the HTTP status), its message without account ids and ARNs
    (the original goes to the log) except the ones Claude Code's recovery matches, and `x-should-retry`."""
    body = jsoncodec.parse_json_body(response.get_content(strict=False))
    if errors.is_native_error(body):  # the gateway's own answer (refused, not supported): already native
        ex.error_type = body["error"]["type"]
        return
    google = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), dict) else None
    name = response.headers.get("x-amzn-errortype") or (body.get("__type") if isinstance(body, dict) else None)
    if google is not None and isinstance(google.get("status"), str):  # Vertex: {"error": {"code", "message", "status"}}
        error_type = providers.GOOGLE_ERRORS.get(google["status"]) or errors.error_type_for_status(response.status_code)
        text = google.get("message")
    elif isinstance(name, str) and name:
        error_type = providers.bedrock_error_type(name.rsplit("#", 1)[-1])
        text = body.get("message") or body.get("Message") if isinstance(body, dict) else None
    else:
        error_type = errors.error_type_for_status(response.status_code)
        text = body.get("message") or body.get("Message") if isinstance(body, dict) else None
    text = text if isinstance(text, str) and text else f"{ex.provider} answered HTTP {response.status_code}"
    shown = providers.client_message(text)
    if shown != text:
        logger.info(f"{ex.provider} error for {clean(ex.host + ex.path)}: {clean(text)}")
    status = errors.status_for_error_type(error_type)
    request_id = response.headers.get("x-amzn-requestid")
    send_error(response, ex, envelopes.Unwrapped(status, errors.error_json(error_type, shown, request_id), error_type,
                                                 request_id, ex.provider, response.status_code))
    response.headers["x-should-retry"] = "true" if status in (408, 409, 429) or status >= 500 else "false"
    ex.note(f"{ex.provider} error became a native {error_type} (HTTP {response.status_code} -> {status})")


def translated_count(response: http.Response, ex: exchange.Exchange) -> None:
    """Bedrock CountTokens' `{"inputTokens": N}` as Anthropic's `{"input_tokens": N}` (Vertex answers that already)."""
    body = jsoncodec.parse_json_body(response.get_content(strict=False))
    if isinstance(body, dict) and isinstance(body.get("inputTokens"), int) and "input_tokens" not in body:
        set_body(response, jsoncodec.dumps({"input_tokens": body["inputTokens"]}), "application/json")


def set_body(response: http.Response, content: bytes, content_type: str) -> None:
    """Replace a buffered body with identity-encoded content of another type."""
    response.headers.pop("content-encoding", None)
    response.headers["content-type"] = content_type
    response.content = content


def send_error(response: http.Response, ex: exchange.Exchange, found: envelopes.Unwrapped | None) -> None:
    """Answer with a native error (`found`, when there is one), restoring the headers LiteLLM renamed and
    the `request-id` of the inner error. The one way every path answers with an error. An error that does not
    say whether to retry gets `x-should-retry` from its status (`errors.should_retry`): the SDKs would retry
    a 501 `not_supported` otherwise, and a converted foreign error is not theirs to guess."""
    if found is not None:
        response.status_code = found.status
        response.reason = envelopes.reason_phrase(found.status)
        set_body(response, found.body, "application/json")
        ex.error_type = found.error_type
    fixes = envelopes.header_fixes(response.headers, found.request_id if found else None)
    if fixes:  # only names the answer lacks: appended at once (a setitem each rescans every field)
        response.headers.fields += tuple((k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
                                         for k, v in fixes.items())
    if "x-should-retry" not in response.headers:
        response.headers["x-should-retry"] = "true" if errors.should_retry(response.status_code) else "false"


def error_answer(response: http.Response, ex: exchange.Exchange) -> None:
    """A buffered answer with an error status, JSON or not (also an error sent as an event stream): the
    native error it holds or stands for."""
    body = body_of(response)
    if body is None:
        found = envelopes.Unwrapped(502, errors.error_json("api_error", TOO_LARGE_MESSAGE), "api_error", None,
                                    "answer", response.status_code)
        ex.stop("upstream answer too large")
        send_error(response, ex, found)
        return
    content_type = response.headers.get("content-type")
    if is_sse(response):  # an error answered as a stream (LiteLLM's first-chunk errors): read its frames
        body, content_type = stream_error_payload(body), "application/json"
    found = None
    if ex.rules.errors.unwrap:
        found = envelopes.unwrap_response(response.status_code, content_type, body, ex.rules.errors.max_message)
    if found is not None:
        ex.unwrapped, ex.unwrapped_from = True, f"{found.source} {found.original_status}"
        ex.note(f"error unwrapped from {found.source} (HTTP {found.original_status})")
    send_error(response, ex, found)


def error_in_success(response: http.Response) -> bool:
    """A success status whose JSON body is an error: given the status the error stands for
    (`envelopes.status_of_error_body`), so it is answered and recorded as the error it is, not as an empty
    Message. True when it was."""
    content_type = response.headers.get("content-type", "").lower()
    if "json" not in content_type and content_type:
        return False
    status = envelopes.status_of_error_body(jsoncodec.parse_json_body(body_of(response)))
    if status is None:
        return False
    response.status_code, response.reason = status, envelopes.reason_phrase(status)
    return True


def stream_error_payload(body: bytes) -> bytes:
    """The data of the first frame of an error sent as SSE (named or not; `[DONE]` skipped), else the body."""
    parser = sse.SSEParser()
    for event in parser.feed(body) + parser.flush():
        data = event.data.strip()
        if data and data != "[DONE]":
            return data.encode("utf-8", "surrogatepass")
    return body


def sse_to_json(response: http.Response, ex: exchange.Exchange) -> None:
    """A stream for a client that asked for JSON: the events pass the same reader as a relayed stream
    (`relay.replay`), and what it passes on is accumulated into the Message, or into the native error."""
    passed = relay.replay(ex, body_of(response) or b"")  # past the bound: no message_stop, an error
    acc = messages.message_from_sse(passed)
    ex.converted = "sse->json"
    if acc.error is not None or acc.message is None or not acc.complete:
        error = acc.error if acc.error is not None else errors.error_body("api_error", TRUNCATED_MESSAGE)
        if acc.error is None:
            ex.stop("upstream stream ended before message_stop")
        inner = error.get("error") if isinstance(error.get("error"), dict) else {}
        error_type = inner.get("type") if isinstance(inner.get("type"), str) else "api_error"
        message = inner.get("message") if isinstance(inner.get("message"), str) else "upstream stream failed"
        request_id = errors.request_id_of(error) or response.headers.get("request-id")
        status = errors.status_of(error_type)  # a type not Anthropic's is not a retryable 500
        body = errors.error_json(error_type, message, request_id)
        send_error(response, ex, envelopes.Unwrapped(status, body, error_type, request_id, "stream", response.status_code))
        ex.note("stream error became an HTTP error")
    else:
        ex.message = acc.message
        set_body(response, jsoncodec.dumps(acc.message), "application/json")
        ex.note("SSE converted to JSON")


def json_to_sse(response: http.Response, ex: exchange.Exchange) -> None:
    message = jsoncodec.parse_json_body(body_of(response))
    if not (isinstance(message, dict) and message.get("type") == "message"):
        logger.warning(f"upstream answer is not a Message; passing it on unchanged ({clean(ex.host + ex.path)})")
        return
    ex.message = message
    ex.converted = "json->sse"
    set_body(response, messages.message_to_sse(message), f"{SSE_TYPE}; charset=utf-8")
    ex.note("JSON converted to SSE")


def settle(response: http.Response, ex: exchange.Exchange) -> None:
    """The answer is complete (the `response` hook): what the client received, decided once."""
    ex.status = response.status_code
    ex.request_id = response.headers.get("request-id") or ex.request_id
    if not response.stream:
        if ex.message is None and response.status_code < 400:
            body = jsoncodec.parse_json_body(body_of(response))
            if isinstance(body, dict) and body.get("type") == "message":
                ex.message = body
        if ex.message is not None:
            if isinstance(ex.message.get("usage"), dict) and ex.converted != "sse->json":
                ex.usage = ex.message["usage"]  # a converted stream's usage is the reader's (billed) count
            if isinstance(ex.message.get("model"), str) and ex.message["model"]:
                ex.model_answered = ex.message["model"]
            if isinstance(ex.message.get("id"), str):
                ex.response_id = ex.message["id"][:200]
            if isinstance(ex.message.get("stop_reason"), str):
                ex.stop_reason = ex.message["stop_reason"][:200]
        if ex.converted != "sse->json":  # a converted stream is complete only if it had message_stop
            ex.complete = ex.reason is None  # not when the gateway answered in the upstream's place
    if response.status_code >= 400:
        if ex.error_type is None:  # an error the gateway left as it came (unwrap off, or native already)
            body = jsoncodec.parse_json_body(body_of(response)) if not response.stream else None
            ex.error_type = body["error"]["type"] if errors.is_native_error(body) else errors.error_type_for_status(
                response.status_code
            )
            ex.request_id = ex.request_id or errors.request_id_of(body)


def settle_failure(flow: http.HTTPFlow, ex: exchange.Exchange) -> None:
    """The exchange failed (the `error` hook): what the client got, and why.

    - Response headers already sent (a relayed stream): the client got that status and a body that stops.
    - The client went away first: it got nothing (status None).
    - Otherwise mitmproxy answers itself: `HttpStream.handle_protocol_error` (proxy/layers/http/__init__.py)
      sends a `ResponseProtocolError` to the client right after the `error` hook, whatever the hook set on
      `flow.response`, and `Http1Server` (proxy/layers/http/_http1.py) writes it as `make_error_response`:
      a text/html 502 (`_base.format_error`). mitmproxy 12 offers no supported way to replace it (open
      upstream proposal: mitmproxy pull request 7999, "allow error hook to override 502 responses"); the
      addon has mitm/layers.answer_instead_of_error_page write a native 502 instead. The record says 502
      and `api_error`, the type that native 502 carries."""
    message = flow.error.msg if flow.error else ""
    response = flow.response
    streamed = response is not None and bool(response.stream)
    # A relayed stream whose message_stop came (the reader set `complete`) is a whole answer: only its
    # transfer ended untidily (no last chunk, a reset after the end), which costs the client nothing.
    ex.complete = streamed and ex.complete is True
    if streamed and ex.complete:
        ex.status = response.status_code
        ex.request_id = response.headers.get("request-id") or ex.request_id
        ex.note("transfer ended untidily after message_stop")
        return
    if streamed:
        ex.status = response.status_code
        ex.request_id = response.headers.get("request-id") or ex.request_id
        reason = "client disconnected" if message.startswith(CLIENT_GONE) else "upstream closed the stream"
    elif message.startswith(CLIENT_GONE) or message == "killed" or flow.client_conn.timestamp_end:
        ex.status, reason = None, "client disconnected"
    else:
        ex.status, ex.error_type = MITMPROXY_ERROR_STATUS, "api_error"
        reason = failure_reason(message, response is not None)
    ex.stop(reason)  # a part that ended the exchange itself (a timeout) already said why


def failure_reason(message: str, had_headers: bool) -> str:
    """A short reason for an upstream failure, from mitmproxy's error message."""
    text = message.lower()
    if "answer head is longer than" in text:  # mitm/heads.py: the upstream's head passed gateway_head_size_limit
        return "upstream answer head too long"
    if "refused" in text or "errno 111]" in text:  # ECONNREFUSED: asyncio says "Connect call failed"
        return "upstream refused the connection"
    if "connect call failed" in text or "cannot connect" in text:
        return "could not connect to the upstream"
    if "reset" in text:
        return "upstream reset the connection"
    if had_headers:
        return "upstream closed before the end of its body"
    if "closed" in text or "disconnected" in text:
        return "upstream closed the connection before answering"
    if "certificate" in text or "tls" in text:
        return "upstream TLS failed"
    if "timed out" in text or "timeout" in text:
        return "upstream timed out"
    return "upstream failed"


def native_answer(error_type: str, message: str, headers: dict[str, str] | None = None, *,
                  status: int | None = None, details: dict | None = None) -> http.Response:
    """A native Anthropic error response (JSON body, status from the error type unless `status` is given: a
    spend limit's `billing_error` goes out as 429, as Claude Code's gateway protocol has it), with `x-should-retry`
    saying what the status means (`errors.should_retry`) unless `headers` say otherwise: a 401 for a revoked token
    must say false, or Claude Code retries it for minutes (its gateway protocol, "Errors")."""
    status = status or errors.status_for_error_type(error_type)
    retry = "true" if errors.should_retry(status) else "false"
    return http.Response.make(
        status, errors.error_json(error_type, message, details=details),
        {"content-type": "application/json", "x-should-retry": retry, **(headers or {})},
    )


def error_frame(error_type: str, message: str) -> bytes:
    """One `event: error` SSE frame, as the API sends it mid-stream."""
    return sse.encode("error", errors.error_body(error_type, message))
