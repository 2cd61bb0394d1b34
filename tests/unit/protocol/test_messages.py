"""Messages as SSE streams, with the real Anthropic SDK as the oracle.

The oracle is the SDK end to end: an `anthropic.Anthropic` client whose HTTP transport answers with the
SSE body under test, read with `client.messages.stream(...).get_final_message()` (or
`client.beta.messages…`). That covers the SDK's SSE decoder, its event filtering (ping, unnamed events)
and its accumulator (`accumulate_event`).

The comparison is `final_message.to_dict(mode="json")` against our plain dict, as dicts and as JSON with
sorted keys (which also tells 1 from 1.0). It is exact because `to_dict` leaves out fields that were
never set (`exclude_unset`): it holds exactly the keys that arrived on the wire or that the accumulator
assigned, keeps unknown fields, and keeps explicit nulls. The one lossy step is JSON mode re-formatting
datetimes (`container.expires_at`); the generated timestamps are already in pydantic's format, so they
survive unchanged.
"""

from __future__ import annotations

import copy
import json
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jiter import from_json

from llm_gateway.protocol import sse
from llm_gateway.protocol import errors
from llm_gateway.protocol import messages as protocol_messages
from llm_gateway.protocol import partialjson
from llm_gateway.protocol import tokens as protocol_usage

SETTINGS = settings(max_examples=200, deadline=None)
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "sse"
BETA_ONLY_FIXTURES = {"compaction_response", "fallback_response", "context_management_response"}


# --- the oracle ---------------------------------------------------------------------------------

_body: list[bytes] = [b""]
_client = anthropic.Anthropic(
    api_key="test",
    base_url="http://sdk-oracle.invalid",
    max_retries=0,
    http_client=httpx2.Client(
        transport=httpx2.MockTransport(
            lambda request: httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=_body[0])
        )
    ),
)


def sdk_message(body: bytes, beta: bool = False) -> dict[str, Any]:
    """The Message the real SDK accumulates from an SSE body."""
    _body[0] = body
    api = _client.beta.messages if beta else _client.messages
    with api.stream(model="claude-test", max_tokens=1, messages=[{"role": "user", "content": "hi"}]) as stream:
        message = stream.get_final_message()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic warns about unknown block types; the dump is still exact
        return message.to_dict(mode="json", warnings=False)


def assert_same(ours: Any, theirs: Any) -> None:
    assert ours == theirs
    assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)


def encode(events: list[tuple[str, Any]]) -> bytes:
    return b"".join(sse.encode(name, data) for name, data in events)


def accumulate(chunks: list[bytes]) -> protocol_messages.MessageAccumulator:
    parser, acc = sse.SSEParser(), protocol_messages.MessageAccumulator()
    for chunk in chunks:
        for event in parser.feed(chunk):
            acc.feed_event(event)
    for event in parser.flush():
        acc.feed_event(event)
    return acc


def with_stop_details(message: dict[str, Any]) -> dict[str, Any]:
    """The SDK always assigns stop_details from message_delta, so a round trip adds it (null) when absent."""
    return {**message, "stop_details": message.get("stop_details")}


# --- hand-written streams -----------------------------------------------------------------------

USAGE = {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 30, "output_tokens": 1}


def start(**fields: Any) -> tuple[str, dict]:
    message = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": dict(USAGE), **fields,
    }
    return "message_start", {"type": "message_start", "message": message}


def block(index: int, content_block: dict) -> tuple[str, dict]:
    return "content_block_start", {"type": "content_block_start", "index": index, "content_block": content_block}


def delta(index: int, **fields: Any) -> tuple[str, dict]:
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": fields}


def stop(index: int) -> tuple[str, dict]:
    return "content_block_stop", {"type": "content_block_stop", "index": index}


def message_delta(stop_reason: str = "end_turn", usage: dict | None = None, **fields: Any) -> tuple[str, dict]:
    d = {"stop_reason": stop_reason, "stop_sequence": None, **fields.pop("delta", {})}
    return "message_delta", {"type": "message_delta", "delta": d, "usage": usage or {"output_tokens": 9}, **fields}


def text(index: int, piece: str) -> tuple[str, dict]:
    return delta(index, type="text_delta", text=piece)


def json_part(index: int, piece: str) -> tuple[str, dict]:
    return delta(index, type="input_json_delta", partial_json=piece)


PING = ("ping", {"type": "ping"})
END = ("message_stop", {"type": "message_stop"})
CITATION = {
    "type": "char_location", "cited_text": "the sky is blue", "document_index": 0, "document_title": "Sky",
    "start_char_index": 0, "end_char_index": 15,
}
WEB_RESULT = {
    "type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
    "content": [
        {"type": "web_search_result", "url": "https://x.test", "title": "X", "encrypted_content": "e", "page_age": None}
    ],
}
TOOL = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
SERVER_TOOL = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}
THINKING = {"type": "thinking", "thinking": "", "signature": ""}
TEXT = {"type": "text", "text": ""}
EVERY_USAGE_FIELD = {
    "output_tokens": 20, "input_tokens": 40, "cache_creation_input_tokens": 12, "cache_read_input_tokens": 7,
    "server_tool_use": {"web_search_requests": 1}, "output_tokens_details": {"thinking_tokens": 3},
}
REFUSAL = {"type": "refusal", "category": "cyber", "explanation": None}
CONTAINER = {"id": "container_1", "expires_at": "2026-07-23T16:16:14.426901Z"}

STREAMS: dict[str, list[tuple[str, Any]]] = {
    "text": [start(), PING, block(0, TEXT), text(0, "Hel"), PING, text(0, "lo"), stop(0), message_delta(), END],
    "text with citations": [
        start(), block(0, {**TEXT, "citations": []}), delta(0, type="citations_delta", citation=CITATION),
        text(0, "Blue."), delta(0, type="citations_delta", citation={**CITATION, "start_char_index": 4}), stop(0),
        message_delta(), END],
    "tool_use in chunks": [
        start(), block(0, TOOL), json_part(0, ""), json_part(0, '{"loc'), json_part(0, 'ation": "Par'),
        json_part(0, 'is", "n": [1, 2.5]}'), stop(0), message_delta("tool_use"), END],
    "tool_use without deltas": [
        start(), block(0, TOOL), stop(0), block(1, {**TOOL, "id": "toolu_2"}), json_part(1, ""), stop(1),
        message_delta("tool_use"), END],
    "thinking and signature": [
        start(), block(0, THINKING), delta(0, type="thinking_delta", thinking="Let me "),
        delta(0, type="thinking_delta", thinking="think."), delta(0, type="signature_delta", signature="sig-A"),
        delta(0, type="signature_delta", signature="sig-B"), stop(0), block(1, TEXT), text(1, "Done."), stop(1),
        message_delta(), END],
    "redacted_thinking": [
        start(), block(0, {"type": "redacted_thinking", "data": "EmwKAhgB"}), stop(0), message_delta(), END],
    "server tool use and result": [
        start(), block(0, SERVER_TOOL), json_part(0, '{"query": '), json_part(0, '"sky"}'), stop(0),
        block(1, WEB_RESULT), stop(1),
        message_delta(usage={"output_tokens": 9, "server_tool_use": {"web_search_requests": 1}}), END],
    "unknown block type": [
        start(), block(0, {"type": "hologram", "payload": {"x": [1, None]}}), text(0, "ignored"), stop(0),
        message_delta(), END],
    "stop_sequence": [
        start(), block(0, TEXT), text(0, "1, 2, "), stop(0),
        message_delta("stop_sequence", delta={"stop_sequence": "3"}), END],
    "message_delta with every optional usage field": [start(), message_delta(usage=EVERY_USAGE_FIELD), END],
    "message_delta with output_tokens only, then nulls": [
        start(), message_delta(usage={"output_tokens": 5}),
        message_delta(usage={"output_tokens": 6, "input_tokens": None, "cache_read_input_tokens": None}), END],
    "stop_details, container and extra fields": [
        start(container=None, private={"a": 1}),
        message_delta("refusal", delta={"stop_details": REFUSAL, "container": CONTAINER}), END],
    "unknown events and deltas are ignored": [
        ("future_event", {"type": "future_event", "x": 1}), start(), ("future_event", {"type": "future_event"}),
        block(0, {"type": "text", "text": "a"}), delta(0, type="future_delta", stuff=1), stop(0), message_delta(), END],
    "no message_stop": [start(), block(0, TEXT), text(0, "cut")],
}
BETA_STREAMS: dict[str, list[tuple[str, Any]]] = {
    "mcp_tool_use": [
        start(), block(0, {"type": "mcp_tool_use", "id": "mcp_1", "name": "echo", "server_name": "s", "input": {}}),
        json_part(0, '{"say": "hi"}'), stop(0), message_delta("tool_use"), END],
    "compaction": [
        start(), block(0, {"type": "compaction", "content": None, "encrypted_content": None}),
        delta(0, type="compaction_delta", content="summary", encrypted_content="enc"),
        delta(0, type="compaction_delta", content="v2"), stop(0), message_delta(), END],
    "fallback and context_management": [
        start(), block(0, {"type": "fallback", "from": {"model": "claude-test"}, "to": {"model": "claude-other"},
                           "trigger": {"type": "refusal", "category": None}}), stop(0),
        message_delta(context_management={"applied_edits": []}), END],
}


@pytest.mark.parametrize("name", STREAMS)
def test_hand_written_streams_match_the_sdk(name):
    events = STREAMS[name]
    body = encode(events)
    acc = protocol_messages.message_from_sse(body)
    assert_same(acc.message, sdk_message(body))
    assert_same(acc.message, sdk_message(body, beta=True))
    assert acc.complete == (events[-1] == END)
    assert not acc.malformed or name == "unknown block type"  # a text_delta into a hologram block


@pytest.mark.parametrize("name", BETA_STREAMS)
def test_hand_written_beta_streams_match_the_beta_sdk(name):
    body = encode(BETA_STREAMS[name])
    acc = protocol_messages.message_from_sse(body)
    assert_same(acc.message, sdk_message(body, beta=True))
    assert acc.complete and not acc.malformed


def test_hand_written_results_are_what_they_should_be():
    """So that agreeing with the SDK is not agreeing on nothing."""
    m = protocol_messages.message_from_sse(encode(STREAMS["tool_use in chunks"])).message
    assert m["content"] == [{**TOOL, "input": {"location": "Paris", "n": [1, 2.5]}}]
    assert m["usage"] == {**USAGE, "output_tokens": 9}
    assert (m["stop_reason"], m["stop_sequence"], m["stop_details"]) == ("tool_use", None, None)
    m = protocol_messages.message_from_sse(encode(STREAMS["thinking and signature"])).message
    assert m["content"][0] == {"type": "thinking", "thinking": "Let me think.", "signature": "sig-B"}
    m = protocol_messages.message_from_sse(encode(STREAMS["text with citations"])).message
    assert m["content"][0]["citations"] == [CITATION, {**CITATION, "start_char_index": 4}]
    m = protocol_messages.message_from_sse(encode(STREAMS["message_delta with output_tokens only, then nulls"])).message
    assert m["usage"] == {**USAGE, "output_tokens": 6}
    m = protocol_messages.message_from_sse(encode(BETA_STREAMS["fallback and context_management"])).message
    assert (m["model"], m["context_management"]) == ("claude-other", {"applied_edits": []})


def test_ping_error_and_events_before_message_start():
    acc = protocol_messages.MessageAccumulator()
    acc.feed("ping", {"type": "ping"})
    acc.feed(*stop(0))  # before message_start: skipped, as the SDK does
    assert acc.message is None and acc.malformed
    acc.feed(*start())
    acc.feed("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert acc.error == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    assert not acc.complete

    acc = protocol_messages.message_from_sse(b"event: error\ndata: upstream fell over\n\n")
    assert acc.error == errors.error_body("api_error", "upstream fell over") and acc.malformed


def test_accumulating_does_not_change_the_events_fed():
    for events in [*STREAMS.values(), *BETA_STREAMS.values()]:
        snapshot = copy.deepcopy(events)
        acc = protocol_messages.MessageAccumulator()
        for name, data in events:
            acc.feed(name, data)
        acc.message
        assert events == snapshot


def test_merge_delta_usage():
    usage = {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1, "service_tier": "standard"}
    protocol_usage.merge_delta_usage(usage, {"output_tokens": 7, "input_tokens": None, "cache_creation_input_tokens": 3})
    assert usage == {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 7, "service_tier": "standard",
                     "cache_creation_input_tokens": 3}
    protocol_usage.merge_delta_usage(usage, {"input_tokens": 11, "server_tool_use": {"web_search_requests": 2}})
    assert usage["input_tokens"] == 11 and usage["server_tool_use"] == {"web_search_requests": 2}
    assert usage["output_tokens"] is None  # like the SDK: output_tokens is always taken


# --- the SDK's own fixtures ---------------------------------------------------------------------

SDK_RAISES = {  # fixture: what we build where SDK 2.12 raises instead
    "usage_omitted_response": {"input_tokens": 12, "output_tokens": 6},
    "usage_omitted_with_optional_fields_response": {
        "input_tokens": 12, "cache_creation_input_tokens": 4, "cache_read_input_tokens": 3, "output_tokens": 6,
        "output_tokens_details": {"thinking_tokens": 2},
        "server_tool_use": {"web_search_requests": 1, "web_fetch_requests": 0}},
    "missing_usage_rich_delta_response": {
        "input_tokens": 11, "output_tokens": 1, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 5,
        "server_tool_use": {"web_search_requests": 2}},
}


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.txt")), ids=lambda p: p.stem)
def test_sdk_fixtures(path):
    body = path.read_bytes()
    acc = protocol_messages.message_from_sse(body)
    name = path.stem
    assert acc.complete
    if name in SDK_RAISES:  # message_start without usage: the delta's totals stand alone
        assert acc.message["usage"] == SDK_RAISES[name] and not acc.malformed
        return
    if name == "tool_use_invalid_json_response":  # `"unit": celsius}`: the SDK raises
        assert acc.malformed and acc.message["content"][1]["input"] == {}
        return
    assert_same(acc.message, sdk_message(body, beta=True))
    if name not in BETA_ONLY_FIXTURES:
        assert_same(acc.message, sdk_message(body))
    assert acc.malformed == (name == "out_of_order_response")


def test_fixture_with_tool_input_cut_by_max_tokens():
    acc = protocol_messages.message_from_sse((FIXTURES / "incomplete_partial_json_response.txt").read_bytes())
    assert acc.message["content"][1]["input"] == {
        "filename": "taxes.txt",
        "lines_of_text": ["# COMPREHENSIVE TAX GUIDE FOR INDIVIDUALS WITH MULTIPLE W-2s", "", "## INTRODUCTION", ""],
    }


# --- generated Messages and streams -------------------------------------------------------------

ints = st.integers(0, 2**31)
ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=10)
texts = st.text(max_size=30)
json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | texts
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
# pydantic's own datetime format, so that to_dict(mode="json") gives the same string back
timestamps = st.datetimes(datetime(2020, 1, 1), datetime(2035, 1, 1)).map(
    lambda d: d.strftime("%Y-%m-%dT%H:%M:%S") + (f".{d.microsecond:06d}" if d.microsecond else "") + "Z"
)


def obj(required: dict, **optional: Any):
    """A dict strategy; plain values in `required` are constants."""
    fixed = {k: v if isinstance(v, st.SearchStrategy) else st.just(v) for k, v in required.items()}
    return st.fixed_dictionaries(fixed, optional=optional)


citations = st.one_of(
    obj({"type": "char_location", "cited_text": texts, "document_index": st.integers(0, 9),
         "document_title": st.none() | texts, "start_char_index": ints, "end_char_index": ints}),
    obj({"type": "web_search_result_location", "cited_text": texts, "url": texts, "title": st.none() | texts,
         "encrypted_index": texts}),
    obj({"type": "future_location", "detail": json_values}),
)
web_search_results = obj(
    {"type": "web_search_result", "url": texts, "title": texts, "encrypted_content": texts,
     "page_age": st.none() | texts}
)
COMMON_BLOCKS = [
    obj({"type": "text", "text": texts}, citations=st.none() | st.lists(citations, max_size=3)),
    obj({"type": "tool_use", "id": ids, "name": ids, "input": json_objects}, caller=st.just({"type": "direct"})),
    obj({"type": "server_tool_use", "id": ids, "name": st.sampled_from(["web_search", "web_fetch", "code_execution"]),
         "input": json_objects}),
    obj({"type": "thinking", "thinking": texts, "signature": texts}),
    obj({"type": "redacted_thinking", "data": texts}),
    obj({"type": "web_search_tool_result", "tool_use_id": ids, "content": st.lists(web_search_results, max_size=2)}),
    obj({"type": st.sampled_from(["hologram", "future_block"]), "payload": json_values}),
]
BETA_BLOCKS = [
    obj({"type": "mcp_tool_use", "id": ids, "name": ids, "server_name": ids, "input": json_objects}),
    obj({"type": "compaction", "content": st.none() | texts, "encrypted_content": st.none() | texts}),
]
usages = obj(
    {"input_tokens": ints, "output_tokens": ints},
    cache_creation_input_tokens=st.none() | ints,
    cache_read_input_tokens=st.none() | ints,
    cache_creation=obj({"ephemeral_5m_input_tokens": ints, "ephemeral_1h_input_tokens": ints}),
    service_tier=st.sampled_from(["standard", "priority", "batch"]),
    server_tool_use=st.none() | obj({"web_search_requests": ints}),
    output_tokens_details=st.none() | obj({"thinking_tokens": ints}),
)
delta_usages = obj(
    {"output_tokens": ints},
    input_tokens=st.none() | ints,
    cache_creation_input_tokens=st.none() | ints,
    cache_read_input_tokens=st.none() | ints,
    server_tool_use=st.none() | obj({"web_search_requests": ints}),
    output_tokens_details=st.none() | obj({"thinking_tokens": ints}),
)
stop_reasons = st.sampled_from([None, "end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal"])
stop_details = st.none() | obj(
    {"type": "refusal", "category": st.none() | st.just("cyber"), "explanation": st.none() | texts}
)
containers = obj({"id": ids, "expires_at": timestamps})


def messages(beta: bool = False):
    extra = {"context_management": st.none() | st.just({"applied_edits": []})} if beta else {}
    return obj(
        {"id": ids, "type": "message", "role": "assistant", "model": st.sampled_from(["claude-test", "claude-other"]),
         "content": st.lists(st.one_of(COMMON_BLOCKS + (BETA_BLOCKS if beta else [])), max_size=5),
         "stop_reason": stop_reasons, "stop_sequence": st.none() | texts, "usage": usages},
        stop_details=stop_details, container=st.none() | containers, private_field=json_values, **extra,
    )


def cut(draw, s):
    """`s` in pieces at random points (empty pieces included)."""
    points = sorted(draw(st.lists(st.integers(0, len(s)), max_size=4)))
    return [s[a:b] for a, b in zip([0, *points], [*points, len(s)])]


SPLITTABLE = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}
NOISE_DELTAS = [  # deltas the SDK ignores silently: an unknown type, or a type that does not fit the block
    {"type": "future_delta", "x": 1}, {"type": "text_delta", "text": "x"}, {"type": "thinking_delta", "thinking": "x"},
    {"type": "signature_delta", "signature": "x"}, {"type": "input_json_delta", "partial_json": "{}"},
    {"type": "citations_delta", "citation": {"type": "char_location"}},
]


@st.composite
def streams(draw, beta: bool = False):
    """A stream as the API could send it: deltas cut anywhere, pings and unknown events anywhere, a random
    message_start usage, one to three message_deltas with random usage, maybe no message_stop; sometimes
    deltas that do not fit their block (the SDK ignores them; we ignore them and set `malformed`)."""
    events, misfits = [], False
    for name, data in protocol_messages.message_to_events(draw(messages(beta))):
        if draw(st.integers(0, 7)) == 0:
            events.append(draw(st.sampled_from([PING, ("future_event", {"type": "future_event", "x": [1]})])))
        if name == "message_start":
            data["message"]["usage"] = draw(usages)
        elif name == "content_block_start" and draw(st.integers(0, 3)) == 0:
            # A start value the deltas build on (text, thinking) or that they replace (tool input).
            first = data["content_block"]
            for field, values in (("text", texts), ("thinking", texts), ("input", json_objects)):
                if field in first:
                    first[field] = draw(values)
        elif name == "content_block_delta" and data["delta"]["type"] in SPLITTABLE:
            field = SPLITTABLE[data["delta"]["type"]]
            for piece in cut(draw, data["delta"][field]):
                events.append((name, {**data, "delta": {**data["delta"], field: piece}}))
            continue
        elif name == "content_block_stop" and draw(st.integers(0, 5)) == 0:
            noise = draw(st.sampled_from(NOISE_DELTAS))
            block_type = next(d["content_block"].get("type") for n, d in events
                              if n == "content_block_start" and d["index"] == data["index"])
            misfits |= noise["type"] != "future_delta" and not _fits(noise["type"], block_type, beta)
            events.append(delta(data["index"], **noise))
        elif name == "message_delta":
            for _ in range(draw(st.integers(0, 2))):
                early = {"stop_reason": draw(stop_reasons), "stop_details": draw(stop_details)}
                events.append((name, {**data, "delta": early, "usage": draw(delta_usages)}))
            data["usage"] = draw(delta_usages)
            if draw(st.booleans()):
                data["delta"]["container"] = draw(st.none() | containers)  # null must not erase it
        elif name == "message_stop" and draw(st.integers(0, 5)) == 0:
            continue
        events.append((name, data))
    return events, misfits


def _fits(delta_type: str, block_type: str, beta: bool) -> bool:
    tool_blocks = {"tool_use", "server_tool_use"} | ({"mcp_tool_use"} if beta else set())
    return {"text_delta": block_type == "text", "citations_delta": block_type == "text",
            "thinking_delta": block_type == "thinking", "signature_delta": block_type == "thinking",
            "input_json_delta": block_type in tool_blocks}[delta_type]


@SETTINGS
@given(st.data(), streams())
def test_generated_streams_match_the_sdk(data, generated):
    events, misfits = generated
    body = encode(events)
    acc = accumulate(cut(data.draw, body))  # the SSE body cut anywhere on its way in
    theirs = sdk_message(body)
    assert_same(acc.message, theirs)
    assert_same(acc.message, sdk_message(body, beta=True))
    assert acc.malformed == misfits
    assert acc.complete == (events[-1][0] == "message_stop")
    # Feeding parsed (name, data) pairs directly gives the same.
    direct = protocol_messages.MessageAccumulator()
    for name, payload in events:
        direct.feed(name, payload)
    assert_same(direct.message, theirs)


@SETTINGS
@given(st.data(), streams(beta=True))
def test_generated_beta_streams_match_the_beta_sdk(data, generated):
    events, misfits = generated
    body = encode(events)
    acc = accumulate(cut(data.draw, body))
    assert_same(acc.message, sdk_message(body, beta=True))
    assert acc.malformed == misfits


ROUND_TRIP_MESSAGES = {
    "every block type": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Blue.", "citations": [CITATION]},
            {"type": "text", "text": "", "citations": None},
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "sky"}},
            WEB_RESULT,
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1, 2.0, "é\n"], "b": {"c": None}}},
            {"type": "tool_use", "id": "toolu_2", "name": "g", "input": {}, "caller": {"type": "direct"}},
            {"type": "hologram", "payload": [1]},
        ],
        "stop_reason": "tool_use", "stop_sequence": None, "stop_details": None,
        "usage": {**USAGE, "output_tokens": 99, "server_tool_use": {"web_search_requests": 1}, "service_tier": "batch"},
    },
    "stop sequence, container, no stop_details key": {
        "id": "msg_2", "type": "message", "role": "assistant", "model": "claude-test", "content": [],
        "stop_reason": "stop_sequence", "stop_sequence": "END",
        "container": {"id": "container_1", "expires_at": "2026-07-23T16:16:14.426901Z"},
        "usage": {"input_tokens": 1, "output_tokens": 2, "cache_creation_input_tokens": None},
    },
}


@pytest.mark.parametrize("name", ROUND_TRIP_MESSAGES)
def test_hand_written_messages_round_trip(name):
    check_round_trip(ROUND_TRIP_MESSAGES[name])


@SETTINGS
@given(messages())
def test_generated_messages_round_trip(message):
    check_round_trip(message)


@SETTINGS
@given(messages(beta=True))
def test_generated_beta_messages_round_trip(message):
    check_round_trip(message, beta_only=True)


def check_round_trip(message: dict, beta_only: bool = False) -> None:
    original = copy.deepcopy(message)
    events = protocol_messages.message_to_events(message)
    body = protocol_messages.message_to_sse(message)
    assert message == original  # not changed on the way
    assert body == encode(events)
    expected = with_stop_details(message)
    assert_same(sdk_message(body, beta=True), expected)
    if not beta_only:
        assert_same(sdk_message(body), expected)
    acc = protocol_messages.message_from_sse(body)
    assert_same(acc.message, expected)
    assert acc.complete and not acc.malformed and acc.error is None
    # The shape the API sends: names match types, message_start is empty, every block opens and closes.
    assert [name for name, _ in events] == [data["type"] for _, data in events]
    first = events[0][1]["message"]
    assert (first["content"], first["stop_reason"], first["stop_sequence"]) == ([], None, None)
    assert first["usage"] == message["usage"]
    assert first.get("stop_details") is None and first.get("container") is None  # they come in message_delta
    assert [name for name, _ in events[-2:]] == ["message_delta", "message_stop"]
    starts = [data for name, data in events if name == "content_block_start"]
    assert [d["index"] for d in starts] == list(range(len(message["content"])))
    for d in starts:
        block_type = d["content_block"]["type"]
        if block_type in ("text", "thinking"):
            assert d["content_block"].get("text", "") == "" and d["content_block"].get("thinking", "") == ""
        if block_type in protocol_messages.TOOL_INPUT_BLOCKS:
            assert d["content_block"]["input"] == {}


# --- never raises -------------------------------------------------------------------------------

EVENT_TYPES = ["message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
               "message_stop", "ping", "error", "future"]
DELTA_TYPES = ["text_delta", "input_json_delta", "thinking_delta", "signature_delta", "citations_delta",
               "compaction_delta", "future_delta"]
odd = json_values | st.sampled_from(["]", '{"a', " ", "[1 2]", ["x"], {"type": ["x"]}])
indexes = st.integers(-1, 3) | odd
junk_blocks = st.one_of(COMMON_BLOCKS + BETA_BLOCKS) | odd | obj(
    {"type": st.sampled_from(["fallback", "text", "thinking", "tool_use", "compaction"]) | odd},
    to=odd, text=odd, thinking=odd, input=odd, citations=odd)
junk_deltas = odd | obj({"type": st.sampled_from(DELTA_TYPES) | odd}, text=odd, partial_json=odd, thinking=odd,
                        signature=odd, citation=odd, content=odd)
junk_events = st.one_of(  # events of the right type with the wrong insides, and plain junk
    st.tuples(st.just("content_block_start"),
              obj({"type": "content_block_start", "index": indexes, "content_block": junk_blocks})),
    st.tuples(st.just("content_block_delta"),
              obj({"type": "content_block_delta", "index": indexes, "delta": junk_deltas})),
    st.tuples(st.just("content_block_stop"), obj({"type": "content_block_stop", "index": indexes})),
    st.tuples(st.just("message_delta"),
              obj({"type": "message_delta"}, delta=odd | obj({}, stop_reason=odd, container=odd),
                                            usage=odd | delta_usages, context_management=odd)),
    st.tuples(st.just("message_start"),
              obj({"type": "message_start", "message": messages() | odd | obj({}, content=odd, usage=odd)})),
    st.tuples(st.sampled_from(EVENT_TYPES + [None]), odd | obj({"type": st.sampled_from(EVENT_TYPES) | odd})),
)


@SETTINGS
@given(st.booleans(), st.lists(junk_events, max_size=12))
def test_malformed_events_never_raise(started, events):
    if started:  # most checks only run once a message has started
        events = [start(content=[{"type": "text", "text": "a"}, {"type": ["odd"]}, TOOL])] + events
    acc = protocol_messages.MessageAccumulator()
    for name, data in events:
        acc.feed(name, data)
    assert acc.message is None or isinstance(acc.message, dict)
    protocol_messages.message_from_sse(encode([(name or "x", data) for name, data in events]))


ODD = [None, 5, 1.5, True, "x", "", [], ["x"], {}, {"type": ["x"]}]
ODD_BLOCKS = ODD + [
    {"type": t, **fields}
    for t in [None, ["x"], "text", "thinking", "tool_use", "compaction", "fallback"]
    for fields in [{}, {"text": None, "thinking": 5, "input": "x", "citations": "x", "to": []}]
]
ODD_DELTAS = ODD + [{"type": t} for t in [None, ["x"], *DELTA_TYPES]] + [
    {"type": t, **dict.fromkeys(("text", "partial_json", "thinking", "signature", "citation", "content"), v)}
    for t in [None, ["x"], *DELTA_TYPES] for v in (None, 5, ["x"], "]", '{"a')
]


def test_every_odd_block_with_every_odd_delta_never_raises():
    """Every delta shape against every block shape, deterministically (random junk rarely lines them up)."""
    for content_block in ODD_BLOCKS:
        acc = protocol_messages.MessageAccumulator()
        acc.feed(*start(content=[content_block]))
        acc.feed("content_block_start", {"type": "content_block_start", "index": 1, "content_block": content_block})
        for index in (1, 0, -1, 2, "1", None, True, 1.5, [1]):
            for d in ODD_DELTAS:
                acc.feed("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
            acc.feed("content_block_stop", {"type": "content_block_stop", "index": index})
        for data in ODD + [{"type": "message_delta", "delta": d, "usage": u} for d in ODD for u in ODD]:
            acc.feed("message_delta", data)
        for data in ODD + [{"type": t} for t in EVENT_TYPES]:
            acc.feed("message_stop", data)
        assert isinstance(acc.message, dict) and acc.malformed
    starts = ODD + [{"content": c, "usage": u} for c in ODD for u in ODD]
    for data in ODD + [{"type": "message_start", "message": m} for m in starts]:
        acc = protocol_messages.MessageAccumulator()
        acc.feed("message_start", data)
        acc.feed(*message_delta())
        acc.feed("error", data)
        acc.message


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bodies_never_raise(body):
    protocol_messages.message_from_sse(body)
    protocol_messages.message_from_sse(b'event: message_start\ndata: {"type":"message_start","message":{"content":[]}}\n\n' + body)


# --- partial JSON, as the SDK reads tool input ---------------------------------------------------


@SETTINGS
@given(st.data(), json_objects | st.lists(json_values, max_size=3))
def test_partial_json_is_what_jiter_makes_of_any_prefix(data, value):
    separators = data.draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    text = json.dumps(value, separators=separators, ensure_ascii=data.draw(st.booleans()))
    assert partialjson.parse_partial_json(text) == value
    prefix = text[: data.draw(st.integers(0, len(text)))]
    try:
        expected = from_json(prefix.encode(), partial_mode=True)
    except ValueError:
        with pytest.raises(ValueError):
            partialjson.parse_partial_json(prefix)
    else:
        assert json.dumps(partialjson.parse_partial_json(prefix)) == json.dumps(expected)
