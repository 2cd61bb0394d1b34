"""The key scrubber's parts (addons/credentials.py): the spellings of a key, the scrub of bytes a stream passes
on unread (a key cut anywhere by two chunks), the answer head, and the log filter. The end-to-end proof is
tests/e2e/test_key_echo.py."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.test import tutils

from gwtest import rule_file
from llm_gateway.addons.credentials import KeyCustody, ScrubTap
from llm_gateway.util import secretmask
from llm_gateway.util.secretmask import MASKED_KEY, KeyLogFilter, key_forms

KEY = "sk-ant-api03-UNITKEY0123456789"
ODD = 'k"e\\y\'x'  # visible ASCII a key may hold: JSON, repr and log lines each spell it otherwise


def test_a_plain_key_has_one_spelling_an_odd_one_several():
    assert key_forms(KEY) == (KEY.encode(),)
    forms = key_forms(ODD)
    assert ODD.encode() in forms and b'k\\"e\\\\y\'x' in forms  # as it is, and JSON-escaped
    assert len(forms[0]) >= len(forms[-1])  # longest first: a longer spelling is masked before its part


@given(st.binary(max_size=40), st.binary(max_size=40), st.lists(st.integers(0, 200), max_size=4))
def test_unread_bytes_lose_the_key_wherever_the_chunks_cut_it(before, after, cuts):
    tap = ScrubTap(KEY)
    data = before + KEY.encode() + after + KEY.encode()
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    out = b"".join(tap.on_unread(p, False) for p in pieces) + tap.on_unread(b"", True)
    assert KEY.encode() not in out
    assert out == data.replace(KEY.encode(), MASKED_KEY)  # nothing lost, nothing added


def test_unread_bytes_without_the_key_pass_unchanged_and_a_held_tail_goes_at_the_end():
    tap = ScrubTap(KEY)
    assert tap.on_unread(b"hello", False) == b"hello"
    assert tap.on_unread(b"x sk-ant", False) == b"x "  # may begin the key: kept back
    assert tap.on_unread(b"", True) == b"sk-ant"


def test_the_head_loses_the_key_in_reason_names_and_values():
    response = tutils.tresp()
    response.reason = f"denied {KEY}"
    response.headers.fields = ((b"x-echo", f"key={KEY}".encode()), (f"x-{KEY}".encode(), b"1"), (b"x-ok", b"fine"))
    KeyCustody._scrub_head(response, key_forms(KEY))
    assert response.reason == "denied " + MASKED_KEY.decode()
    assert response.headers.fields == ((b"x-echo", b"key=" + MASKED_KEY), (b"x-ok", b"fine"))


def test_the_log_filter_masks_messages_arguments_and_tracebacks():
    flt = KeyLogFilter()
    flt.use([KEY])
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "got %s", (KEY,), None)
    assert flt.filter(record) and KEY not in record.getMessage()
    try:
        raise AssertionError(f"upstream bytes b'{KEY}'")
    except AssertionError as e:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "crashed", (), (type(e), e, e.__traceback__))
    assert flt.filter(record)
    shown = logging.Formatter().format(record)
    assert KEY not in shown and "crashed" in shown and "AssertionError" in shown
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "nothing %s", ("here",), None)
    assert flt.filter(plain) and plain.args == ("here",)  # untouched


def test_a_secret_too_short_to_search_for_leaves_the_tap_harmless():
    tap = ScrubTap("short")  # under MIN_SECRET: no spelling is searched for
    assert tap.forms == () and tap.on_unread(b"short data", False) == b"short data"


def test_the_log_filter_is_on_every_handler_while_custody_runs(monkeypatch):
    import asyncio

    handler = logging.Handler()
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    custody = KeyCustody(rule_file())

    async def run():
        custody.running()
        assert secretmask.LOG_FILTER in handler.filters
        custody.done()

    asyncio.run(run())
    assert secretmask.LOG_FILTER not in handler.filters


ESCAPED = "".join(f"\\u{ord(c):04x}" for c in KEY)  # what a JSON reader turns back into KEY


def test_a_key_spelt_in_json_escapes_is_masked_in_a_body_and_an_event():
    forms = key_forms(KEY)
    body = ('{"model":"' + ESCAPED + '","content":[{"text":"a \\u003c ' + ESCAPED + '"}]}').encode()
    masked = secretmask.scrub_json(body, forms)
    assert json.loads(masked) == {"model": MASKED_KEY.decode(), "content": [{"text": "a < " + MASKED_KEY.decode()}]}
    event = b"event: content_block_delta\r\ndata: " + body + b"\r\n\r\n"
    out = secretmask.scrub_event(event, forms)
    assert out.startswith(b"event: content_block_delta\r\ndata: {") and out.endswith(b"}\r\n\r\n")
    assert KEY.encode() not in out and ESCAPED.encode() not in out


@pytest.mark.parametrize("body", [
    b'{"text":"\\u003cb\\u003e plain"}',  # escapes, no key: the same bytes (the same object)
    b'{"text":"' + b"\\u0073" * 3 + b'"',  # not JSON
    b"[" * 100000 + b'"' + ESCAPED.encode() + b'"' + b"]" * 100000,  # the key, nested past the stack: not JSON here
])
def test_bodies_without_an_escaped_key_are_left_as_they_are(body):
    assert secretmask.scrub_json(body, key_forms(KEY)) is body
    event = b"data: " + body + b"\n\n"
    assert secretmask.scrub_event(event, key_forms(KEY)) is event


def test_escapes_without_a_secret_cost_no_parse(monkeypatch):
    body = b'{"text":"' + b"\\u003cb\\u003e " * 10000 + b'"}'
    monkeypatch.setattr(secretmask.json, "loads", lambda *_: pytest.fail("parsed"))
    assert secretmask.scrub_json(body, key_forms(KEY)) is body
