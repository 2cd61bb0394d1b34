"""Prices: genai-prices' list, overridden or extended by the rule file; the model the answer names is priced.

The expected figures are Anthropic's price list (platform.claude.com/docs/en/about-claude/pricing), in US
dollars per million tokens, written out here rather than read from the library under test.
"""

from __future__ import annotations

import json

import pytest
from llm_gateway import pricing, rules
from test_answer import SSE, Shape, frame, gw, message_start  # noqa: F401 (gw: the addons, as a fixture)

SONNET_45 = "claude-sonnet-4-5-20250929"
# Sonnet 4.5: standard, and past 200K prompt tokens (input + cache reads + cache writes) for the whole request
SONNET = {"input": 3, "output": 15, "write_5m": 3.75, "write_1h": 6, "read": 0.30}
SONNET_LONG = {"input": 6, "output": 22.50, "write_5m": 7.50, "write_1h": 12, "read": 0.60}


def usage(inp=0, out=0, read=0, write_5m=0, write_1h=0) -> dict:
    return {"input_tokens": inp, "output_tokens": out, "cache_read_input_tokens": read,
            "cache_creation_input_tokens": write_5m + write_1h,
            "cache_creation": {"ephemeral_5m_input_tokens": write_5m, "ephemeral_1h_input_tokens": write_1h}}


def dollars(price: dict, inp=0, out=0, read=0, write_5m=0, write_1h=0) -> float:
    return round((inp * price["input"] + out * price["output"] + read * price["read"] + write_5m * price["write_5m"]
                  + write_1h * price["write_1h"]) / 1e6, 8)


@pytest.mark.parametrize(
    "tokens, price",
    [
        ({"inp": 1000, "out": 200, "read": 4000, "write_5m": 1500, "write_1h": 500}, SONNET),
        ({"inp": 200_000, "out": 1000, "read": 77_000}, SONNET_LONG),  # the 277K-token prompt
        ({"inp": 150_000, "out": 1000, "read": 40_000, "write_5m": 10_000, "write_1h": 10_000}, SONNET_LONG),
        ({"inp": 100_000, "out": 1000, "read": 100_000}, SONNET),  # exactly 200K: standard rates
    ],
    ids=["standard", "277k-prompt", "210k-with-writes", "200k-exactly"],
)
def test_sonnet_as_the_price_list_says(tokens, price):
    cost = pricing.cost((), SONNET_45, usage(**tokens))
    assert cost.source == pricing.LIBRARY == f"genai-prices {pricing.genai_prices.__version__}"
    assert cost.cost_usd == pytest.approx(dollars(price, **tokens), abs=1e-9)
    assert cost.saved_usd == pytest.approx(tokens.get("read", 0) * (price["input"] - price["read"]) / 1e6, abs=1e-9)


@pytest.mark.parametrize(
    "model",
    [
        "claude-opus-5-5", "claude-sonnet-5-5", "claude-haiku-5-5",  # what Claude Code asks for by default
        "claude-opus-4-7", "claude-opus-4-6", "claude-opus-4-1", "claude-haiku-4-5-20251001",
        "claude-3-opus-20240229", "claude-3-haiku-20240307",
        "us.anthropic.claude-sonnet-4-5-20250929-v1:0", "anthropic/claude-opus-4-6", "claude-sonnet-4-5@20250929",
    ],
)
def test_models_claude_code_and_providers_name_are_priced(model):
    cost = pricing.cost((), model, usage(inp=1000, out=100))
    assert cost.cost_usd and cost.cost_usd > 0 and cost.source == pricing.LIBRARY


def test_the_rule_file_overrides_and_adds():
    table = rules.parse(
        "pricing:\n"
        "  - {model: 'claude-sonnet-4-5*', input: 1, output: 1, cache_write_5m: 1, cache_write_1h: 1, cache_read: 1}\n"
        "  - {model: 'my-alias', input: 2, output: 2, cache_write_5m: 2, cache_write_1h: 2, cache_read: 2}\n"
    ).pricing
    assert pricing.cost(table, SONNET_45, usage(inp=1_000_000)) == (1.0, 0.0, "rules")
    assert pricing.cost(table, "my-alias", usage(out=1_000_000)) == (2.0, 0.0, "rules")
    assert pricing.cost(table, "claude-opus-4-6", usage(inp=1_000_000)).source == pricing.LIBRARY
    assert pricing.cost(table, "claude-test-1", usage(inp=1)) == pricing.UNPRICED


def answer_json(model: str, tokens: dict) -> Shape:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
               "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
               "usage": tokens}
    return Shape(200, {"content-type": "application/json"}, json.dumps(message).encode())


def answer_sse(model: str, tokens: dict) -> Shape:
    return Shape(200, {"content-type": SSE}, message_start(tokens, model) + frame(
        "message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 100}}
    ) + frame("message_stop", {"type": "message_stop"}))


@pytest.mark.parametrize("path", ["json", "sse", "forced-on", "forced-off"])
def test_an_aliased_request_is_priced_and_recorded_by_the_model_that_answered(gw, path):
    """The request says `claude-sonnet-4-5` (an alias); the answer names the dated model: record and price that."""
    tokens = usage(inp=200_000, out=100, read=77_000)
    shape = answer_sse(SONNET_45, tokens) if path in ("sse", "forced-on") else answer_json(SONNET_45, tokens)
    _, _, record = gw.exchange(shape, path, "reverse")
    assert record["model"] == SONNET_45
    assert record["price_source"] == pricing.LIBRARY
    assert record["cost_usd"] == pytest.approx(dollars(SONNET_LONG, inp=200_000, out=100, read=77_000), abs=1e-9)


def test_an_unknown_model_is_unpriced_in_the_record_and_the_line(gw, caplog):
    caplog.set_level("INFO", logger="llm_gateway.usage")
    _, _, record = gw.exchange(answer_json("claude-test-1", usage(inp=5, out=5)), "json", "regular")
    assert record["cost_usd"] is None and record["price_source"] is None
    assert caplog.records[-1].getMessage().endswith(" unpriced")
