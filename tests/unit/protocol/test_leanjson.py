"""The lean reader's container skip (issue 30): windows judged with bytes and regex calls must find the same end
as a JSON parser, wherever a window cuts, and must not walk a large body token by token."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_gateway.protocol import leanjson

# Strings full of what could confuse a bracket count: brackets, quotes, backslashes, escapes.
tricky = st.text(st.sampled_from('[]{}"\\/ ,:ab\n\u00e9'), max_size=12)
values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), tricky),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(tricky, inner, max_size=5)),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(values, max_size=6), st.dictionaries(tricky, values, max_size=6)),
       st.sampled_from([None, 0, 2]), st.integers(1, 40), st.integers(1, 3))
def test_the_container_end_is_a_json_parsers_wherever_the_windows_cut(value, indent, window, passes):
    text = json.dumps(value, indent=indent)  # ASCII (ensure_ascii): offsets in bytes are offsets in chars
    data = b"  " + text.encode() + b' , "tail": [1]'
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(leanjson, "WINDOW", window)  # tiny windows: strings and nesting cut everywhere
        mp.setattr(leanjson, "PASSES", passes)  # and nesting past the passes walked token by token
        assert leanjson._container_end(data, 2) == 2 + len(text)
        with pytest.raises(ValueError):
            leanjson._container_end(data[: 2 + len(text) - 1], 2)  # cut before its last bracket


def test_a_large_body_of_empty_containers_is_not_walked_token_by_token(monkeypatch):
    body = b'{"model":"m","messages":[{"role":"user","content":"x"}],"x":[' + b"{},[]," * 500_000 + b'{}],"stream":true}'
    steps = []
    token = leanjson._TOKEN

    class Counting:
        def finditer(self, data, pos):
            for m in token.finditer(data, pos):
                steps.append(1)
                yield m

    monkeypatch.setattr(leanjson, "_TOKEN", Counting())
    lean = leanjson.parse(body)
    assert dict(lean) == {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    assert lean.omitted == {"x"} and body[slice(*lean.spans["x"])].endswith(b"{}]")
    assert len(steps) < 2 * leanjson.WINDOW  # the last window only, not the 2 million brackets


def test_a_large_body_of_very_many_top_level_fields_is_refused_not_read():
    """Each top-level field is a Python step: past MAX_FIELDS the reader stops and says so (the API refuses
    unknown fields anyway), instead of reading a million of them or calling the body "not JSON"."""
    fields = b",".join(b'"f%d":0' % i for i in range(leanjson.MAX_FIELDS + 1))
    body = b'{"model":"m",' + fields + b',"pad":"' + b"x" * leanjson.LEAN_ABOVE + b'"}'
    with pytest.raises(leanjson.TooManyFields):
        leanjson.parse_request_body(body)
    within = b'{"model":"m",' + fields.rsplit(b",", 3)[0] + b',"pad":"' + b"x" * leanjson.LEAN_ABOVE + b'"}'
    assert leanjson.parse_request_body(within)["model"] == "m"  # MAX_FIELDS fields in all: read
