"""The SSE parser: hand cases, split-anywhere properties, and the Anthropic SDK's own decoder as oracle."""

from __future__ import annotations

import re
import time

import pytest

from anthropic._streaming import SSEDecoder
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_gateway.protocol import sse

SETTINGS = settings(max_examples=200, deadline=None)


def parse(*chunks: bytes, flush: bool = True) -> tuple[list[sse.Event], sse.SSEParser]:
    parser = sse.SSEParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    if flush:
        events += parser.flush()
    return events, parser


def fields(events: list[sse.Event]) -> list[tuple[str | None, str]]:
    return [(event.name, event.data) for event in events]


# --- hand cases ---------------------------------------------------------------------------------


def test_api_shaped_events():
    body = b'event: message_start\ndata: {"type":"message_start"}\n\nevent: ping\ndata: {"type": "ping"}\n\n'
    events, parser = parse(body, flush=False)
    assert fields(events) == [("message_start", '{"type":"message_start"}'), ("ping", '{"type": "ping"}')]
    assert [e.raw for e in events] == [
        b'event: message_start\ndata: {"type":"message_start"}\n\n',
        b'event: ping\ndata: {"type": "ping"}\n\n',
    ]
    assert events[0].json() == {"type": "message_start"}
    assert parser.pending == b""


def test_line_endings_crlf_cr_and_mixed():
    for nl in (b"\r\n", b"\r", b"\n"):
        body = b"event: a" + nl + b"data: 1" + nl + nl + b"event: b" + nl + b"data: 2" + nl + nl
        events, _ = parse(body)  # with "\r" line breaks, the final one is held until flush
        assert fields(events) == [("a", "1"), ("b", "2")], nl
        assert b"".join(e.raw for e in events) == body
    events, _ = parse(b"event: a\r\ndata: 1\n\revent: b\rdata: 2\r\n\r\n", flush=False)
    assert fields(events) == [("a", "1"), ("b", "2")]


def test_crlf_split_across_chunks_is_one_line_break():
    # "\r" then "\n" in the next chunk must not count as two line breaks (that would end the event).
    events, parser = parse(b"event: a\r", b"\ndata: 1\r", b"\n\r", b"\n", flush=False)
    assert fields(events) == [("a", "1")]
    assert events[0].raw == b"event: a\r\ndata: 1\r\n\r\n"
    assert parser.pending == b""


def test_final_lone_cr_is_held_until_the_next_byte():
    parser = sse.SSEParser()
    assert parser.feed(b"event: a\ndata: 1\n\r") == []  # the "\r" may be the start of "\r\n"
    assert parser.pending == b"event: a\ndata: 1\n\r"
    [event] = parser.feed(b"event: b\n")
    assert event.raw == b"event: a\ndata: 1\n\r" and event.name == "a"
    assert parser.pending == b"event: b\n"
    # At the end of the stream the held event comes out of flush, bytes intact.
    parser = sse.SSEParser()
    assert parser.feed(b"event: a\n\r") == []
    [event] = parser.flush()
    assert (event.raw, event.name) == (b"event: a\n\r", "a")


def test_data_lines_fields_and_comments():
    body = (
        b": keep-alive comment\n"
        b"event:  two-spaces\n"  # exactly one leading space is stripped
        b"id: 7\n"
        b"retry: 100\n"
        b"data:first\n"
        b"data\n"  # a field with no colon: empty value
        b"data: third\n"
        b"unknown: x\n"
        b"\n"
    )
    [event], _ = parse(body)
    assert event.name == " two-spaces"
    assert event.data == "first\n\nthird"
    assert event.json() is None


def test_last_event_field_wins_and_empty_name_is_none():
    [event], _ = parse(b"event: a\ndata: 1\nevent: b\n\n")
    assert event.name == "b"
    [event], _ = parse(b"data: 1\nevent: a\n\n")
    assert (event.name, event.data) == ("a", "1")
    [event], _ = parse(b"event:\ndata: 1\n\n")
    assert event.name is None  # the SDK reads an empty event type as none and skips the event
    [event], _ = parse(b"data: 1\n\n")
    assert (event.name, event.data) == (None, "1")


def test_comment_only_blocks_and_extra_blank_lines_keep_their_bytes():
    body = b"\n: ping\n\nevent: a\ndata: 1\n\n\r\n"
    events, parser = parse(body)
    # A run of empty events (blank lines, comment-only blocks) is one event: they dispatch nothing.
    assert [e.raw for e in events] == [b"\n: ping\n\n", b"event: a\ndata: 1\n\n", b"\r\n"]
    assert fields(events) == [(None, ""), ("a", "1"), (None, "")]
    assert parser.pending == b""
    # One chunk at a time, each is its own event; the bytes are the same.
    events, _ = parse(b"\n", b": ping\n\n", b"event: a\ndata: 1\n\n", b"\r\n")
    assert [e.raw for e in events] == [b"\n", b": ping\n\n", b"event: a\ndata: 1\n\n", b"\r\n"]


@pytest.mark.parametrize("filler", [b"\n", b"\r\n", b"\r", b":\n\n", b": keep-alive\r\n\r\n", b":x\r\r"])
def test_a_run_of_empty_events_is_one_event(filler):
    """Millions of blank lines or comment-only events cost one regex match per chunk, not a Python object
    each (issue 30): a run is one event, whatever line breaks it uses, and the event after it is intact."""
    run = filler * 200_000
    tail = b"event: a\r\ndata: 1\r\n\r\n" if b"\r" in filler else b"event: a\ndata: 1\n\n"
    parser = sse.SSEParser()
    events = parser.feed(run + tail)
    assert [e.raw for e in events] == [run, tail]
    assert fields(events) == [(None, ""), ("a", "1")]
    assert events[0].kind is None
    # Split inside the run and cut after its last byte: the bytes are the same; the run may come in pieces.
    chunks = [run[:len(run) // 2 + 1], run[len(run) // 2 + 1:], tail]
    events, _ = parse(*chunks)
    assert b"".join(e.raw for e in events) == run + tail
    assert len(events) <= 4 and fields(events)[-1] == ("a", "1")
    assert all(fields([e]) == [(None, "")] for e in events[:-1])


def test_a_run_that_ends_in_a_lone_cr_waits_for_the_next_byte():
    parser = sse.SSEParser()
    assert [e.raw for e in parser.feed(b"\n\n\r")] == [b"\n\n"]  # the "\r" may be the start of "\r\n"
    assert parser.pending == b"\r"
    assert [e.raw for e in parser.feed(b"\nevent: a\n\n")] == [b"\r\n", b"event: a\n\n"]
    parser = sse.SSEParser()
    assert parser.feed(b":x\r\r") == [] and parser.pending == b":x\r\r"
    assert [e.raw for e in parser.feed(b"\n")] == [b":x\r\r\n"]


def test_a_comment_before_fields_is_not_an_empty_event():
    events, _ = parse(b":\n\n: note\nevent: a\ndata: 1\n\n\n")
    assert [e.raw for e in events] == [b":\n\n", b": note\nevent: a\ndata: 1\n\n", b"\n"]
    assert fields(events) == [(None, ""), ("a", "1"), (None, "")]


def test_flush_returns_a_trailing_event_once():
    parser = sse.SSEParser()
    assert parser.feed(b'event: message_stop\ndata: {"type":"message_stop"}') == []
    assert parser.pending == b'event: message_stop\ndata: {"type":"message_stop"}'
    [event] = parser.flush()
    assert event.raw == b'event: message_stop\ndata: {"type":"message_stop"}'
    assert event.json() == {"type": "message_stop"}
    assert parser.flush() == [] and parser.pending == b""
    assert sse.SSEParser().flush() == []
    # A trailing event ending in a single line break.
    events, _ = parse(b"event: a\ndata: 1\n")
    assert [(e.raw, e.name, e.data) for e in events] == [(b"event: a\ndata: 1\n", "a", "1")]


def test_invalid_utf8_nul_and_utf8_split_across_chunks():
    [event], _ = parse(b"event: \xff\xfeodd\ndata: a\x00b \xe2\x82\n\n")
    assert event.name == "\ufffd\ufffdodd"
    assert event.data == "a\x00b \ufffd"
    euro = "data: 1€\n\n".encode()
    events, _ = parse(euro[:8], euro[8:], flush=False)  # split inside the three bytes of "€"
    assert events[0].data == "1€"


def test_json_is_parsed_once_and_never_raises():
    [event], _ = parse(b'data: {"a": [1, 2]}\n\n')
    first = event.json()
    assert first == {"a": [1, 2]} and event.json() is first
    for body in (b"data: {\n\n", b"data: \n\n", b"data: " + b"[" * 100_000 + b"\n\n", b"data: null\n\n"):
        [event], _ = parse(body)
        assert event.json() is None


def test_feed_accepts_memoryview_and_bytearray():
    parser = sse.SSEParser()
    events = parser.feed(memoryview(b"event: a\n")) + parser.feed(bytearray(b"data: 1\n\n"))
    assert fields(events) == [("a", "1")]
    assert isinstance(events[0].raw, bytes)


def test_encode():
    stop = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    assert sse.encode("message_stop", {"type": "message_stop"}) == stop
    assert sse.encode("x", {"t": "é"}) == 'event: x\ndata: {"t":"é"}\n\n'.encode()
    assert sse.encode("ping", "as is") == b"event: ping\ndata: as is\n\n"
    # Text with line breaks must become several data lines to stay one event.
    [event], _ = parse(sse.encode("x", "a\nb\r\nc"))
    assert (event.name, event.data) == ("x", "a\nb\nc")


def test_many_events_are_cheap():
    event = sse.encode("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": "Hello"}})
    body = event * 20_000
    chunks = [body[i : i + 1400] for i in range(0, len(body), 1400)]  # network-sized pieces, split anywhere
    started = time.perf_counter()
    parser = sse.SSEParser()
    count = 0
    for chunk in chunks:
        for ev in parser.feed(chunk):
            count += ev.name == "content_block_delta"
    elapsed = time.perf_counter() - started
    assert count == 20_000
    assert elapsed < 2.0, f"20,000 events took {elapsed:.2f}s"  # about 0.05 s on a laptop
    # "\r\n" line breaks take the slower full rule, but stay linear even when a whole body comes at once.
    started = time.perf_counter()
    assert len(sse.SSEParser().feed(body.replace(b"\n", b"\r\n"))) == 20_000
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, f"20,000 CRLF events took {elapsed:.2f}s"


# --- properties ---------------------------------------------------------------------------------

line_breaks = st.sampled_from([b"\n", b"\r\n", b"\r"])
field_text = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=20)


@st.composite
def event_blocks(draw) -> bytes:
    """One event's lines (event, data, comments, id, retry, unknown fields) and its blank line."""
    lines = draw(
        st.lists(
            st.one_of(
                st.builds(lambda v: "event: " + v, field_text),
                st.builds(lambda v: "data: " + v, field_text),
                st.builds(lambda v: "data:" + v, field_text),
                st.builds(lambda v: ":" + v, field_text),
                st.sampled_from(["id: 1", "retry: 5", "data", "other: x"]),
            ),
            max_size=5,
        )
    )
    body = b"".join(line.encode() + draw(line_breaks) for line in lines)
    blank = draw(line_breaks)
    if body.endswith(b"\r") and blank == b"\n":  # "\r" + "\n" would be one line break, not a blank line
        blank = b"\r"
    return body + blank


streams = st.lists(event_blocks(), max_size=8).map(b"".join)


@st.composite
def split(draw, body: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=12)))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]


def _empty(raw: bytes) -> bool:
    """Only blank lines and comments, ending in a blank line: an event that dispatches nothing (WHATWG)."""
    lines = re.split(rb"\r\n|\r|\n", raw)
    return raw[-1:] in (b"\n", b"\r") and all(not line or line[:1] == b":" for line in lines)


def merged(events: list[sse.Event]) -> list[bytes]:
    """The events' bytes with each run of empty events joined: where a run is cut depends on the split."""
    out: list[bytes] = []
    for event in events:
        if out and _empty(out[-1]) and _empty(event.raw):
            out[-1] += event.raw
        else:
            out.append(event.raw)
    return out


@SETTINGS
@given(st.data(), streams)
def test_any_split_gives_the_same_events_and_bytes(data, body):
    whole, _ = parse(body)
    chunks = data.draw(split(body))
    pieces, parser = parse(*chunks, flush=False)
    pieces += parser.flush()
    assert merged(pieces) == merged(whole)
    # A run found in one chunk is one event (but for a lone final "\r", held until the end).
    assert not any(_empty(a.raw) and _empty(b.raw) for a, b in zip(whole, whole[1:-1]))
    assert [f for f in fields(pieces) if f != (None, "")] == [f for f in fields(whole) if f != (None, "")]
    assert b"".join(e.raw for e in pieces) == body
    for event in pieces:  # the name's fast path (first line only) agrees with a full parse
        slow = sse.Event(event.raw)
        slow.data
        assert slow.name == event.name


@SETTINGS
@given(st.data(), streams)
def test_same_events_as_the_sdk_decoder(data, body):
    """The SDK's decoder (given the same chunks) dispatches the same named events; it drops the rest."""
    chunks = data.draw(split(body))
    ours, _ = parse(*chunks)
    theirs = [(s.event, s.data) for s in SSEDecoder().iter_bytes(iter(chunks)) if s.event is not None]
    # The bodies end in a blank line, so flush() only releases a final event whose blank line is a
    # lone "\r" (it waited to see whether "\n" followed); the SDK dispatches that one at the end too.
    assert [(name, data) for name, data in fields(ours) if name is not None] == theirs


@SETTINGS
@given(st.data(), st.lists(st.binary(max_size=40), max_size=10).map(b"".join))
def test_arbitrary_bytes_never_raise_and_no_byte_is_lost(data, body):
    chunks = data.draw(split(body))
    parser = sse.SSEParser()
    events = [e for chunk in chunks for e in parser.feed(chunk)]
    held = parser.pending
    events += parser.flush()
    for event in events:
        assert isinstance(event.data, str)
        assert event.name is None or isinstance(event.name, str)
        event.json()
    assert b"".join(e.raw for e in events) == body
    assert held == (events[-1].raw if held else b"")


def test_an_event_without_a_name_is_what_its_data_says():
    """WHATWG HTML, "Server-sent events": `event:` is optional; relays send data-only frames."""
    named, data_only, comment, done = sse.SSEParser().feed(
        b'event: ping\ndata: {"type":"ping"}\n\ndata: {"type":"message_delta","usage":{}}\n\n: keep-alive\n\n'
        b"data: [DONE]\n\n")
    assert (named.kind, data_only.kind, comment.kind, done.kind) == ("ping", "message_delta", None, None)
    assert data_only.name is None  # the name stays what was sent


def test_billed_usage_never_goes_down_but_the_sdks_accumulation_does():
    from llm_gateway.protocol import tokens

    start = {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 12000}
    late_zero = {"output_tokens": 30, "input_tokens": 0, "cache_read_input_tokens": 0}
    billed, sdk = dict(start), dict(start)
    tokens.merge_delta_usage(billed, late_zero, billed=True)
    tokens.merge_delta_usage(sdk, late_zero)
    assert billed == {"input_tokens": 10, "output_tokens": 30, "cache_read_input_tokens": 12000}
    assert sdk == {"input_tokens": 0, "output_tokens": 30, "cache_read_input_tokens": 0}
