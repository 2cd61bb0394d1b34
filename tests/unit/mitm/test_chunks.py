"""mitm/chunks.py: chunked bodies read in batches give the same bytes, the same end, the same errors, in order,
however the bytes arrive; mitmproxy's HTTP/1 layer gets the wrapped reader once installed."""

from __future__ import annotations

import h11
import pytest
from h11._readers import ChunkedReader
from h11._receivebuffer import ReceiveBuffer
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_gateway.mitm import chunks


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


def read(reader, wire: bytes, cuts: list[int]) -> tuple[list, list[bytes]]:
    """Feed `wire` in the pieces `cuts` makes; (every event the reader returned, data per call)."""
    buf, events, datas = ReceiveBuffer(), [], []
    bounds = sorted({min(c, len(wire)) for c in cuts} | {len(wire)})
    start = 0
    for end in bounds:
        buf += wire[start:end]
        start = end
        try:
            while (event := reader(buf)) is not None:
                events.append(event)
                if type(event) is h11.Data:
                    datas.append(bytes(event.data))
                else:
                    break
        except h11.ProtocolError as e:
            events.append(e)
            break
        if events and type(events[-1]) is not h11.Data:
            break
    return events, datas


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.binary(min_size=0, max_size=40), max_size=30),
       cuts=st.lists(st.integers(0, 2000), max_size=12))
def test_batched_reading_gives_the_same_bytes_and_end_however_they_arrive(pieces, cuts):
    wire = chunked(pieces)
    plain, plain_data = read(ChunkedReader(), wire, cuts)
    batched, batched_data = read(chunks.Batched(ChunkedReader()), wire, cuts)
    assert b"".join(batched_data) == b"".join(plain_data) == b"".join(pieces)
    assert type(plain[-1]) is type(batched[-1]) is h11.EndOfMessage
    assert len(batched_data) <= len(plain_data)


def test_all_chunks_in_the_buffer_come_as_one_piece_and_the_end_after_it():
    reader = chunks.Batched(ChunkedReader())
    buf = ReceiveBuffer()
    buf += chunked([b"event: a\n\n", b"event: b\n\n", b"event: c\n\n"])
    first = reader(buf)
    assert type(first) is h11.Data and bytes(first.data) == b"event: a\n\nevent: b\n\nevent: c\n\n"
    assert first.chunk_start and first.chunk_end
    assert type(reader(buf)) is h11.EndOfMessage


def test_a_chunk_not_all_there_is_not_waited_for():
    reader = chunks.Batched(ChunkedReader())
    buf = ReceiveBuffer()
    buf += b"3\r\nabc\r\n5\r\nde"
    assert bytes(reader(buf).data) == b"abcde"
    assert reader(buf) is None
    buf += b"fgh\r\n0\r\n\r\n"
    assert bytes(reader(buf).data) == b"fgh" and type(reader(buf)) is h11.EndOfMessage


def test_the_data_before_a_protocol_error_goes_on_first():
    reader = chunks.Batched(ChunkedReader())
    buf = ReceiveBuffer()
    buf += b"3\r\nabc\r\nzz\r\n"
    assert bytes(reader(buf).data) == b"abc"
    with pytest.raises(h11.ProtocolError):
        reader(buf)
    plain = ChunkedReader()
    buf = ReceiveBuffer()
    buf += b"3\r\nabc\r\nzz\r\n"
    assert bytes(plain(buf).data) == b"abc"
    with pytest.raises(h11.ProtocolError):
        plain(buf)


def test_install_wraps_mitmproxys_chunked_readers_only_and_uninstall_puts_them_back():
    from mitmproxy.proxy.layers.http import _http1

    chunks.uninstall()  # a test that loaded the gateway script may have left it on (the patch is process-wide)
    original = _http1.make_body_reader
    try:
        assert chunks.install() and chunks.installed()
        assert type(_http1.make_body_reader(None)) is chunks.Batched
        assert type(_http1.make_body_reader(12)) is type(original(12))
        assert type(_http1.make_body_reader(-1)) is type(original(-1))
    finally:
        chunks.uninstall()
    assert _http1.make_body_reader is original and not chunks.installed()
