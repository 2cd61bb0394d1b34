"""pipeline/eventstream.py: Bedrock's event stream read as it passes, bytes unchanged."""

from __future__ import annotations

import pytest

from fakes.clouds import chunk_frame, exception_frame, frame
from fakes.upstream import Scenario, build_message, message_to_events
from gwtest import api_flow, forward, rule_file
from llm_gateway.pipeline import exchange
from llm_gateway.pipeline.eventstream import EventStreamReader
from llm_gateway.pipeline.streamreader import StreamReader

PATH = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke-with-response-stream"
RULES = """\
apis:
  - {name: bedrock, provider: bedrock, hosts: ["bedrock-runtime.*.amazonaws.com"], paths: ["/model/*"]}
"""
USAGE = {"input_tokens": 11, "cache_read_input_tokens": 500, "cache_creation_input_tokens": 0, "output_tokens": 4}


def reader() -> tuple[EventStreamReader, exchange.Exchange]:
    rules = rule_file(RULES).rules
    ex = exchange.Exchange(rules, "bedrock", "regular", "POST", "bedrock-runtime.us-east-1.amazonaws.com", PATH,
                           provider="aws.bedrock")
    exchange.start(api_flow(host=ex.host, path=PATH), ex)
    ex.add_tap(StreamReader(ex), exchange.READ)
    return EventStreamReader(ex), ex


def frames(metrics: bool = True) -> list[bytes]:
    message = build_message(Scenario(model="claude-sonnet-4-5-20250929", usage=USAGE), {}, "msg_bdrk_1")
    events = [data for _, data in message_to_events(message)]
    if metrics:
        events[-1] = {**events[-1], "amazon-bedrock-invocationMetrics": {"inputTokenCount": 11, "outputTokenCount": 4,
                                                                         "cacheReadInputTokenCount": 500}}
    return [chunk_frame(e) for e in events]


@pytest.mark.parametrize("size", [1, 5, 64, 100_000])
def test_usage_model_and_end_read_whatever_the_chunking_and_bytes_unchanged(size):
    stream, ex = reader()
    raw = b"".join(frames())
    chunks = [raw[i:i + size] for i in range(0, len(raw), size)]
    assert forward(stream, chunks) == raw
    assert ex.complete and ex.error_type is None and ex.model_answered == "claude-sonnet-4-5-20250929"
    assert (ex.usage["input_tokens"], ex.usage["output_tokens"], ex.usage["cache_read_input_tokens"]) == (11, 4, 500)


def test_exception_frame_is_a_native_error_type_on_the_exchange():
    stream, ex = reader()
    raw = frames()[0] + exception_frame("throttlingException", "Too many tokens")
    assert forward(stream, [raw]) == raw
    assert ex.error_type == "rate_limit_error" and not ex.complete and ex.reason == "stream error event"
    assert ex.usage["input_tokens"] == 11


def test_a_stream_cut_before_message_stop_is_incomplete():
    stream, ex = reader()
    raw = b"".join(frames()[:3])
    assert forward(stream, [raw]) == raw
    assert not ex.complete and ex.error_type == "api_error" and ex.reason == "upstream stream ended before message_stop"


def test_a_corrupt_frame_stops_the_reading_not_the_stream():
    stream, ex = reader()
    good = frames()[0]
    bad = bytearray(frame({":message-type": "event", ":event-type": "chunk"}, b"{}"))
    bad[-1] ^= 1
    rest = b"".join(frames()[1:])
    assert forward(stream, [good, bytes(bad), rest]) == good + bytes(bad) + rest
    assert not stream.reading and ex.usage["input_tokens"] == 11


def test_translated_stream_becomes_the_apis_sse_and_the_relay_is_found_for_timeouts():
    from llm_gateway.pipeline import relay
    from llm_gateway.pipeline.eventstream import install

    _, ex = reader()
    ex.translated = True
    f = api_flow(host=ex.host, path=PATH, resp=True)
    f.response.headers["content-type"] = "application/vnd.amazon.eventstream"
    install(f, ex)
    assert f.response.headers["content-type"].startswith("text/event-stream")
    found = relay.of(f)
    assert found is not None and found is f.response.stream.__self__.relay
    raw = b"".join(frames())
    out = forward(f.response.stream, [raw[i:i + 10] for i in range(0, len(raw), 10)])
    assert out.startswith(b"event: message_start\ndata: {") and out.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert ex.complete and ex.usage["cache_read_input_tokens"] == 500


def test_translated_stream_cut_short_ends_with_a_native_error_event():
    from llm_gateway.pipeline.eventstream import install

    _, ex = reader()
    ex.translated = True
    f = api_flow(host=ex.host, path=PATH, resp=True)
    f.response.headers["content-type"] = "application/vnd.amazon.eventstream"
    install(f, ex)
    out = forward(f.response.stream, [b"".join(frames()[:2])])
    assert out.endswith(b'"type":"api_error","message":"the upstream stream ended before message_stop; the answer is incomplete"}}\n\n')
    assert not ex.complete and ex.error_type == "api_error"


SECRET = "gateway-held-session-token-0123456789"


def masking_reader() -> tuple[EventStreamReader, exchange.Exchange]:
    """A reader for a stream the gateway signed: the key scrub's tap is on, so frames go on whole and masked."""
    from llm_gateway.addons.credentials import ScrubTap

    _, ex = reader()
    tap = ScrubTap(SECRET)
    ex.add_tap(tap, exchange.SCRUB)
    return EventStreamReader(ex, mask=tap.mask_bytes), ex


def echoing_frames() -> list[bytes]:
    message = build_message(Scenario(model=SECRET, text=f"your token: {SECRET}", usage=USAGE), {}, "msg_bdrk_2")
    return [chunk_frame(data) for _, data in message_to_events(message)]


@pytest.mark.parametrize("size", [1, 7, 100_000])
def test_a_gateway_signed_stream_goes_on_in_whole_frames_the_secret_masked_wherever_chunks_cut(size):
    from botocore.eventstream import EventStreamBuffer

    stream, ex = masking_reader()
    raw = b"".join(echoing_frames()) + exception_frame(f"throttling{SECRET}", f"slow down {SECRET}")
    chunks = [raw[i:i + size] for i in range(0, len(raw), size)]
    out = forward(stream, chunks)
    buffer = EventStreamBuffer()
    buffer.add_data(out)  # botocore checks both CRCs of every frame
    messages = list(buffer)
    assert len(messages) == len(echoing_frames()) + 1
    payloads = b"".join(m.payload for m in messages) + b"".join(
        __import__("base64").b64decode(__import__("json").loads(m.payload)["bytes"]) for m in messages[:-1])
    assert SECRET.encode() not in payloads and b"masked by the gateway" in payloads
    assert SECRET not in str([m.headers for m in messages]) and "masked" in messages[-1].headers[":exception-type"]
    assert ex.model_answered != SECRET and "masked by the gateway" in ex.model_answered  # the reader saw it masked
    assert ex.error_type is not None


def test_a_gateway_signed_stream_without_the_secret_is_forwarded_as_it_came():
    stream, ex = masking_reader()
    raw = b"".join(frames())
    out = []
    original = stream._masked_frame
    stream._masked_frame = lambda frame, headers: out.append(original(frame, headers) is frame) or frame
    assert forward(stream, [raw[:50], raw[50:]]) == raw
    assert out and all(out)  # every frame the very same bytes: nothing encoded again
    assert ex.complete and ex.usage["input_tokens"] == 11


def test_a_gateway_signed_stream_that_is_no_event_stream_still_loses_the_secret():
    stream, ex = masking_reader()
    raw = b"\xff\xff\xff\xff not frames " + SECRET.encode()
    out = forward(stream, [raw])
    assert SECRET.encode() not in out and not stream.reading
