"""One request, one log line: values from the traffic are escaped before a person reads them."""

from __future__ import annotations

import unicodedata

from hypothesis import given, strategies as st

from llm_gateway.records import schema
from llm_gateway.util.logsafe import MAX_SHOWN, clean, clean_or_dash

FORGED = "claude-sonnet-4-5\n[12:00:00.000] egress allowed: CONNECT evil.example:443"


def test_line_breaks_and_controls_are_written_out():
    assert clean(FORGED) == "claude-sonnet-4-5\\n[12:00:00.000] egress allowed: CONNECT evil.example:443"
    assert clean("a\rb\tc\x1b[2Jd\x00e\x7f\x85") == "a\\rb\\tc\\x1b[2Jd\\x00e\\x7f\\x85"
    assert clean("x\u2028y\u2029z\u202eevil") == "x\\u2028y\\u2029z\\u202eevil"  # separators, bidi override


def test_a_backslash_is_doubled_so_an_escape_cannot_be_forged():
    assert clean("a\\nb") == "a\\\\nb"
    assert clean("a\\nb") != clean("a\nb")


def test_plain_values_pass_and_long_ones_are_cut():
    assert clean("claude-opus-4-1 café 東京") == "claude-opus-4-1 café 東京"
    assert clean("x" * (MAX_SHOWN + 5)) == "x" * MAX_SHOWN + "…"
    assert clean(404) == "404" and clean_or_dash(None) == "-" and clean_or_dash("") == "-"


@given(st.text())
def test_never_more_than_one_line(text):
    shown = clean(text, limit=10_000)
    assert len(shown.splitlines()) <= 1
    assert not any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in shown)


def test_the_usage_line_escapes_model_client_and_session(caplog):
    record = {"client": "evil\nclient", "session": "s\r\n[x]", "model": FORGED, "status": 200,
              "input_tokens": 1, "output_tokens": 2, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0,
              "cache_hit_share": 0.0, "cost_usd": None, "complete": True}
    line = schema.human_line(record)
    assert "\n" not in line and "\r" not in line
    assert line.startswith("evil\\nclient session=s\\r\\n[x] claude-sonnet-4-5\\n[12:00:00.000] egress allowed")
