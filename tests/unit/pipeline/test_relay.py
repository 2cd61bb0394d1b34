"""The SSE relay: byte-exact pass-through, taps, decoding, and never raising into mitmproxy."""

from __future__ import annotations

import gzip
import itertools
import zlib

import brotli
import pytest
import zstandard
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from mitmproxy.test import taddons, tflow

from gwtest import api_flow, forward, read_body, rule_file
from unit.protocol.test_sse import _empty, event_blocks
from llm_gateway.addons import credentials
from llm_gateway.pipeline import exchange
from llm_gateway.pipeline import relay
from llm_gateway.protocol import sse
from llm_gateway.protocol import errors
from llm_gateway.protocol import jsoncodec
from llm_gateway.protocol import messages
from llm_gateway.addons.routing import ApiRouter
from llm_gateway.pipeline.streamreader import StreamReader
from llm_gateway.addons.webview import StreamCopyTap

MESSAGE = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
    "content": [{"type": "text", "text": "Hello there, how are you?"}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 7, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 500},
}
STREAM = messages.message_to_sse(MESSAGE)


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
    read_body(f)
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
    assert f.response.stream(b"\x1f\x9d opaque") == b"\x1f\x9d opaque"
    assert f.response.headers["content-encoding"] == "compress" and relay.of(f) is None  # no relay to interrupt


class Unread:
    """A tap that sees the bytes a stream passes on unread, as the key scrub does."""

    def __init__(self):
        self.seen = []

    def on_event(self, event):
        return None

    def on_unread(self, data, end):
        self.seen.append((data, end))
        return data.replace(b"SECRET", b"[masked]")

    def on_end(self):
        return b""


@pytest.mark.parametrize("encoding", ["compress", "gzip"])  # unknown; claimed but false
def test_bytes_passed_on_unread_still_pass_the_taps_on_unread(encoding):
    f, ex = exchange_for()
    tap = Unread()
    ex.add_tap(tap, exchange.SCRUB)
    f.response.headers["content-encoding"] = encoding
    relay.install(f, ex)
    out = b"".join(bytes(f.response.stream(c) or b"") for c in (b"data: SECRET\n\n", b"more SECRET", b""))
    assert out == b"data: [masked]\n\nmore [masked]"
    assert tap.seen[-1][1] is True  # told of the end


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
    native = errors.error_body("overloaded_error", "Overloaded", "req_9")
    wrapped = {"error": {"message": jsoncodec.dumps(native).decode(), "type": "None", "param": "None", "code": "529"}}
    head = STREAM[: STREAM.index(b"event: content_block_start")]
    body = head + sse.encode("error", wrapped)
    out = feed(relay.SSERelay(ex, None), body, [len(head) + 3])
    assert out.startswith(head)
    [event] = sse.SSEParser().feed(out[len(head):])
    assert event.json() == native
    assert ex.unwrapped and ex.error_type == "overloaded_error"


# --- the quick path: a chunk that is one content_block_delta no tap reads -----------------------------------

DELTA = sse.encode("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": "Hi"}})
QUICK = b"event: content_block_delta\ndata: "
KEY = "sk-ant-upstream-key"
KEYED = sse.encode("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": f"your key is {KEY}"}})


class Recorder:
    """A tap that writes down the events it is given; `names` as a tap's `event_names` (absent: every event)."""

    def __init__(self, names=None):
        if names is not None:
            self.event_names = names
        self.seen = []

    def on_event(self, event):
        self.seen.append((event.name, event.raw))

    def on_end(self):
        return b""


def test_one_delta_per_chunk_goes_out_as_the_same_object_and_taps_still_see_the_rest():
    _f, ex = exchange_for()
    reader = Recorder(StreamReader.event_names)
    ex.sse_taps += [StreamReader(ex), reader]
    stream = relay.SSERelay(ex, None)
    head, tail = STREAM.split(b"event: content_block_stop", 1)
    tail = b"event: content_block_stop" + tail
    assert stream(head)  # message_start, content_block_start: read
    for _ in range(3):
        chunk = bytes(DELTA)
        assert stream(chunk) is chunk
    assert forward(stream, [tail]) == tail
    assert ex.complete and ex.usage["output_tokens"] == 7
    assert [name for name, _ in reader.seen] == ["message_start", "content_block_start", "message_delta", "message_stop"]


@pytest.mark.parametrize("chunks, names", [
    # the same first line, but not one plain content_block_delta: each must reach the parser
    ([QUICK + b"x\nevent: message_stop\n\n"], ["message_stop"]),  # a second `event:` renames it
    ([QUICK + b"x\revent: message_stop\n\n"], ["message_stop"]),  # "\r" is a line break too
    ([QUICK + b"x\r\rdata: {}\n\n"], ["content_block_delta", None]),  # "\r\r" is a blank line: two events
    ([QUICK + b"x\n\nevent: message_stop\ndata: {}\n\n"], ["content_block_delta", "message_stop"]),
    ([b"event: content_block_delta\n\n\n"], ["content_block_delta", None]),
    ([QUICK + b"x\ne", b"vent: message_stop\n\n"], ["message_stop"]),  # not ended: the next chunk goes on
])
def test_chunks_that_only_look_like_one_delta_are_parsed(chunks, names):
    _f, ex = exchange_for()
    reader = Recorder(frozenset({"message_stop", None}))
    ex.sse_taps += [reader]
    stream = relay.SSERelay(ex, None)
    assert stream(b"event: ping\ndata: {}\n\n") and stream.quick  # the taps are known: the quick path is open
    assert forward(stream, [DELTA, *chunks]) == DELTA + b"".join(chunks)
    assert [name for name, _ in reader.seen] == [n for n in names if n in reader.event_names]


def test_a_tap_put_on_mid_stream_sees_the_next_deltas():
    _f, ex = exchange_for()
    ex.sse_taps += [Recorder(StreamReader.event_names)]
    stream = relay.SSERelay(ex, None)
    assert stream(DELTA) == DELTA and stream.quick
    everything = Recorder()
    ex.sse_taps.append(everything)
    assert forward(stream, [DELTA, DELTA]) == DELTA * 2
    assert everything.seen == [("content_block_delta", DELTA)] * 2


@st.composite
def api_streams(draw):
    """Blocks of the API's shape (mostly deltas, some usage events) among arbitrary SSE blocks."""
    usage = [sse.encode("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 3}}}),
             sse.encode("message_delta", {"type": "message_delta", "usage": {"output_tokens": 9}})]
    block = st.one_of(
        st.just(DELTA), st.just(DELTA), st.just(KEYED), st.sampled_from(usage),
        st.builds(lambda text, end: QUICK + text.encode() + end, st.text(max_size=8),
                  st.sampled_from([b"\n\n", b"\r\n\n", b"\n\r\n", b"\nevent: message_delta\n\n", b"\n"])),
        event_blocks(),
    )
    return draw(st.lists(block, max_size=12))


def merged(seen: list[tuple]) -> list[tuple]:
    """(name, raw) pairs with each run of empty events joined: where the parser cuts a run depends on the chunks."""
    out: list[tuple] = []
    for name, raw in seen:
        if out and out[-1][0] is None and name is None and _empty(out[-1][1]) and _empty(raw):
            out[-1] = (None, out[-1][1] + raw)
        else:
            out.append((name, raw))
    return out


def as_cut(body: bytes, cuts: list[int]) -> list[sse.Event]:
    """The events a parser gives for the chunks `feed` makes: the relay's parser cuts runs of empty events so."""
    parser, events, last = sse.SSEParser(), [], 0
    for cut in sorted(set(cuts)) + [len(body)]:
        events += parser.feed(body[last:cut])
        last = cut
    return events + parser.flush()


@settings(max_examples=300, deadline=None)
@given(st.data(), api_streams())
def test_quick_path_gives_the_same_bytes_events_and_usage_however_split(data, blocks):
    """Chunks cut at event boundaries (the quick path's case) or anywhere: what goes out, what each tap sees and
    the usage read are those of the whole body parsed at once."""
    body = b"".join(blocks)
    ends = [sum(map(len, blocks[: i + 1])) for i in range(len(blocks))]
    cuts = data.draw(st.lists(st.sampled_from(ends) if ends else st.just(0), max_size=12)) \
        + data.draw(st.lists(st.integers(0, len(body)), max_size=3))
    parser = sse.SSEParser()
    whole = parser.feed(body)
    assume(not parser.held)  # how a stream cut inside an event ends is tested above

    for tap in (Recorder(StreamReader.event_names), Recorder()):  # the quick path open, then closed
        _f, ex = exchange_for()
        ex.sse_taps.append(tap)
        assert feed(relay.SSERelay(ex, None), body, cuts) == body
        assert merged(tap.seen) == merged(
            [(e.name, e.raw) for e in whole if not hasattr(tap, "event_names") or e.name in tap.event_names])
        assert tap.seen == [(e.name, e.raw) for e in as_cut(body, cuts)
                            if not hasattr(tap, "event_names") or e.name in tap.event_names]

    # the mitmweb body copy rides along on the quick path: whole events, a prefix of them up to its limit
    limit = data.draw(st.integers(0, len(body) + 1))
    _f, ex = exchange_for()
    names, copy = Recorder(StreamReader.event_names), StreamCopyTap(limit)
    ex.sse_taps += [names, copy]
    assert feed(relay.SSERelay(ex, None), body, cuts) == body
    cut = as_cut(body, cuts)
    assert names.seen == [(e.name, e.raw) for e in cut if e.name in StreamReader.event_names]
    sizes = itertools.accumulate(len(e.raw) for e in cut)
    kept = sum(1 for size in sizes if size <= limit)
    assert copy.body() == b"".join(e.raw for e in cut[:kept])
    assert copy.summary() == {"kept_bytes": len(copy.body()), "total_bytes": len(body), "truncated": kept < len(cut)}

    # the upstream key's mask: deltas that hold the key are parsed and masked, the others go the quick path
    _f, ex = exchange_for()
    names = Recorder(StreamReader.event_names)
    ex.sse_taps += [credentials.ScrubTap(KEY), names]
    masked = body.replace(KEY.encode(), credentials.mask("upstream key").encode())
    assert feed(relay.SSERelay(ex, None), body, cuts) == masked
    parser = sse.SSEParser()
    assert merged(names.seen) == merged([(e.name, e.raw) for e in parser.feed(masked) if e.name in StreamReader.event_names])

    read = []
    for chunk_cuts in (cuts, []):  # as cut, and the body in one chunk
        _f, ex = exchange_for()
        ex.sse_taps.append(StreamReader(ex))
        read.append((feed(relay.SSERelay(ex, None), body, chunk_cuts), ex.usage, ex.error_type, ex.complete, ex.model))
    assert read[0] == read[1]
