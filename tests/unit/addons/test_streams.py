"""The stream preference (addons/streams.py): the `stream` flag forced, the rest of the request kept exactly.

BodyLimit reads the request body fast (an integer past 64 bits may read as a float there: jsoncodec's
`exact=False`), so where the flag is forced the body is read again exactly before it is written."""

from __future__ import annotations

import json

from mitmproxy.test import taddons

from gwtest import BASE_RULES, api_flow, read_body, rule_file
from llm_gateway.addons.clients import ClientDetector
from llm_gateway.addons.routing import ApiRouter
from llm_gateway.addons.streams import StreamPreference
from llm_gateway.pipeline import exchange

RULES = BASE_RULES + """\
clients:
  - {name: forced-on, user_agent: ["forced-on/*"], stream: "on"}
"""
BIG = 18446744073709551617  # past 64 bits: orjson alone would read it as a float


def forced(body: bytes, agent: str = "forced-on/1.0"):
    rf = rule_file(RULES)
    router, detector, streams = ApiRouter(rf), ClientDetector(), StreamPreference()
    with taddons.context(router, detector, streams):
        f = api_flow(body, headers={"user-agent": agent})
        router.requestheaders(f)
        router.request(f)
        read_body(f)
        detector.request(f)
        streams.request(f)
        return f, exchange.of(f)


def test_a_forced_stream_flag_keeps_integers_past_64_bits_exactly():
    body = {"model": "claude-x", "max_tokens": 5, "stream": False,
            "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n",
                                                            "input": {"id": BIG, "neg": -BIG, "f": 0.5}}]}]}
    f, ex = forced(json.dumps(body).encode())
    assert ex.stream_requested is False and ex.stream_upstream is True
    sent = f.request.get_content()
    assert str(BIG).encode() in sent and f"-{BIG}".encode() in sent
    assert json.loads(sent) == {**body, "stream": True}


def test_a_body_left_alone_is_not_rewritten():
    raw = json.dumps({"model": "claude-x", "max_tokens": 5, "stream": True, "n": BIG, "messages": []}).encode()
    f, ex = forced(raw)
    assert ex.stream_upstream is True and f.request.raw_content == raw
