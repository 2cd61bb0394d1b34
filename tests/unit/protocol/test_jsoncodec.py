"""Bodies read and records written with orjson, always giving what Python's json would (jsoncodec.parse_json_body,
jsoncodec.encode_line): orjson is strict RFC 8259, and what it refuses goes to json."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from llm_gateway.protocol import jsoncodec
from llm_gateway.protocol.jsoncodec import parse_json_body

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _by_json(content: bytes):
    """parse_json_body before orjson: json.loads, for a body that starts as JSON text can."""
    if not content or content[:1] not in (b"{", b"[", b" ", b"\n", b"\r", b"\t"):
        return None
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return None


def _same(a, b) -> bool:
    """Equal, NaN included (json reads NaN, and NaN != NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) if isinstance(a, (dict, list, float)) else a == b


@settings(max_examples=400, deadline=None)
@given(value=json_values, spaced=st.booleans())
def test_any_json_text_reads_as_json_reads_it(value, spaced):
    """Big integers, NaN and infinities, lone surrogates (escaped by json.dumps) included."""
    content = json.dumps({"v": value}, separators=(", ", ": ") if spaced else (",", ":")).encode()
    assert _same(parse_json_body(content), json.loads(content))


def test_integers_past_64_bits_stay_integers():
    assert parse_json_body(b'{"v":-9223372036854775809,"w":18446744073709551616}') == {
        "v": -9223372036854775809, "w": 18446744073709551616}


@settings(max_examples=300, deadline=None)
@given(content=st.one_of(
    st.binary(max_size=40).map(lambda b: b"{" + b),
    st.sampled_from([b'{"a": 1', b'{"a": NaN}', b'{"a": 1e400}', b'[1,]', b'{"a":"\\ud800"}',
                     b'\xef\xbb\xbf{"a":1}', b'{"a":1}{"b":2}', b'{"a":' + b'[' * 2000 + b']' * 2000 + b'}',
                     b'{"a": 123456789012345678901234567890}', b'{"a":1,"a":2}', b'  {"a":-0.0}']),
))
def test_any_bytes_read_as_json_reads_them_or_none(content):
    assert _same(parse_json_body(content), _by_json(content))


def test_duplicate_keys_keep_the_last_as_json_does():
    assert parse_json_body(b'{"model":"a","model":"b"}') == {"model": "b"}


@settings(max_examples=300, deadline=None)
@given(record=st.dictionaries(st.text(max_size=10), json_values, max_size=8))
def test_a_record_line_reads_back_as_the_record(record):
    line = jsoncodec.encode_line(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    back = json.loads(line)
    text = json.dumps(record, ensure_ascii=False)
    if "NaN" not in text and "Infinity" not in text:  # json would write those as invalid JSON; see below
        assert _same(back, json.loads(text.encode("utf-8", "replace")))


def test_nan_and_infinities_are_written_as_null_valid_json():
    assert json.loads(jsoncodec.encode_line({"a": math.nan, "b": [math.inf]})) == {"a": None, "b": [None]}


def test_a_lone_surrogate_from_a_client_is_replaced_not_lost():
    line = jsoncodec.encode_line({"model": "claude\ud800x", "n": 1})
    assert json.loads(line) == {"model": "claude?x", "n": 1}


def test_unknown_types_are_written_as_their_text():
    class Odd:
        def __str__(self):
            return "odd"

    assert json.loads(jsoncodec.encode_line({"x": Odd()})) == {"x": "odd"}


def test_canonical_is_one_text_per_value_whichever_encoder_writes_it():
    """orjson writes what it can (sorted, compact); what it refuses, json writes: the same value, the same text."""
    a = {"b": [1, 2.5, "é"], "a": {"y": None, "x": True}}
    b = {"a": {"x": True, "y": None}, "b": [1, 2.5, "é"]}
    assert jsoncodec.canonical(a) == jsoncodec.canonical(b) == '{"a":{"x":true,"y":null},"b":[1,2.5,"é"]}'.encode()
    assert jsoncodec.canonical(a) != jsoncodec.canonical({**a, "b": [1, 2.5, "e"]})
    for odd in ({"t": "\ud83d"}, {"n": 2**70}, {1: "x"}, {"when": object}):  # what orjson refuses
        text = jsoncodec.canonical(odd)
        assert text == jsoncodec.canonical(dict(odd)) and json.loads(text.decode("utf-8", "surrogatepass"))
    assert jsoncodec.canonical({"n": 2**70}) != jsoncodec.canonical({"n": 2**70 + 1})
    assert jsoncodec.canonical({"t": "\ud83d"}) != jsoncodec.canonical({"t": "\ud83e"})


def test_a_body_only_looked_at_skips_the_digit_search():
    """exact=False: orjson reads it whatever digits it holds (an integer past 64 bits then reads as a float);
    what orjson refuses still goes to json."""
    assert parse_json_body(b'{"w":18446744073709551616}', exact=False) == {"w": 1.8446744073709552e19}
    assert parse_json_body(b'{"w":18446744073709551615}', exact=False) == {"w": 18446744073709551615}
    assert math.isnan(parse_json_body(b'{"w":NaN}', exact=False)["w"])
    assert parse_json_body(b'{"w":', exact=False) is None
