"""The SSE relay: byte-exact pass-through, taps, decoding, and never raising into mitmproxy."""

from __future__ import annotations

import gzip
import zlib

import brotli
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.test import taddons, tflow

from gwtest import api_flow, rule_file
from llm_gateway import exchange, relay, sse, wire
from llm_gateway.routing import ApiRouter
from llm_gateway.answer import StreamReader

MESSAGE = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
    "content": [{"type": "text", "text": "Hello there, how are you?"}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 7, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 500},
}
STREAM = wire.message_to_sse(MESSAGE)


@pytest.fixture(autouse=True)
def tctx():
    """mitmproxy's log handler needs a live context for the relay's warnings."""
    with taddons.context() as ctx:
        yield ctx


def exchange_for():
    router = ApiRouter(rule_file())
    f = api_flow(b'{"model":"claude-x","stream":true,"max_tokens":5,"messages":[]}')
    router.requestheaders(f)
    router.request(f)
    f.response = tflow.tresp()
    return f, exchange.of(f)


def feed(stream_fn, data: bytes, cuts: list[int]) -> bytes:
    out, last = [], 0
    for cut in sorted(set(cuts)) + [len(data)]:
        if cut == last:
            continue  # mitmproxy hands over b"" only at the end of the body
        out.append(stream_fn(data[last:cut]))
        last = cut
    out.append(stream_fn(b""))
    assert all(o != b"" for o in out), "b'' would end a chunked body early"
    return b"".join(b"".join(o) if isinstance(o, list) else o for o in out)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_untouched_stream_passes_byte_for_byte_however_split(cuts):
    _f, ex = exchange_for()
    ex.sse_taps.append(StreamReader(ex))
    out = feed(relay.SSERelay(ex, None), STREAM, cuts)
    assert out == STREAM
    assert ex.usage["cache_read_input_tokens"] == 500 and ex.usage["output_tokens"] == 7 and ex.complete


def encoders():
    def deflate(b):
        return zlib.compress(b)
    return {
        "gzip": gzip.compress,
        "deflate": deflate,
        "br": brotli.compress,
        "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
    }


def test_compressed_streams_are_decoded_on_the_fly_and_forwarded_as_identity():
    for name, encode in encoders().items():
        f, ex = exchange_for()
        f.response.headers["content-encoding"] = name
        f.response.headers["content-type"] = "text/event-stream"
        ex.sse_taps.append(StreamReader(ex))
        assert relay.install(f, ex)
        assert "content-encoding" not in f.response.headers
        body = encode(STREAM)
        out = feed(f.response.stream, body, list(range(0, len(body), 7)))
        assert out == STREAM, name
        assert ex.usage["cache_read_input_tokens"] == 500, name


def test_unknown_encoding_streams_untouched():
    f, ex = exchange_for()
    f.response.headers["content-encoding"] = "compress"
    assert relay.install(f, ex) is False
    assert f.response.stream is True


def test_corrupt_compressed_stream_is_forwarded_as_received():
    f, ex = exchange_for()
    f.response.headers["content-encoding"] = "gzip"
    relay.install(f, ex)
    garbage = b"\x1f\x8b this is not gzip at all"
    assert f.response.stream(garbage) == garbage
    assert f.response.stream(b"more") == b"more"


def test_a_failing_tap_does_not_break_the_stream():
    class Broken:
        def on_event(self, event):
            raise RuntimeError("bug")

        def on_end(self):
            raise RuntimeError("bug")

    _f, ex = exchange_for()
    ex.sse_taps += [Broken(), StreamReader(ex)]
    assert feed(relay.SSERelay(ex, None), STREAM, [5, 50]) == STREAM
    assert ex.complete


def test_truncated_stream_gets_a_native_error_event_appended():
    _f, ex = exchange_for()
    ex.sse_taps += [StreamReader(ex)]
    cut = STREAM.index(b"event: message_delta")
    out = feed(relay.SSERelay(ex, None), STREAM[:cut], [])
    assert out.startswith(STREAM[:cut])
    [last] = sse.SSEParser().feed(out[cut:])
    assert last.name == "error" and last.json()["error"]["type"] == "api_error"
    assert ex.complete is False


def test_wrapped_error_event_is_unwrapped_in_place():
    _f, ex = exchange_for()
    ex.sse_taps += [StreamReader(ex)]
    native = wire.error_body("overloaded_error", "Overloaded", "req_9")
    wrapped = {"error": {"message": wire.dumps(native).decode(), "type": "None", "param": "None", "code": "529"}}
    head = STREAM[: STREAM.index(b"event: content_block_start")]
    body = head + sse.encode("error", wrapped)
    out = feed(relay.SSERelay(ex, None), body, [len(head) + 3])
    assert out.startswith(head)
    [event] = sse.SSEParser().feed(out[len(head):])
    assert event.json() == native
    assert ex.unwrapped and ex.error_type == "overloaded_error"
