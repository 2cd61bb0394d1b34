"""Prices: genai-prices' list, overridden or extended by the rule file; the model the answer names is priced.

The expected figures are Anthropic's price list (platform.claude.com/docs/en/about-claude/pricing), in US
dollars per million tokens, written out here rather than read from the library under test.
"""

from __future__ import annotations

import bisect
import json
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llm_gateway.pipeline import exchange
from llm_gateway.policy import pricing
from llm_gateway.policy import rules
from llm_gateway.policy import spec
from unit.pipeline.test_answer import SSE, Shape, frame, gw, message_start  # noqa: F401 (gw: the addons, as a fixture)

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
        "global.anthropic.claude-sonnet-4-5-20250929-v1:0", "anthropic.claude-haiku-4-5-20251001-v1:0",
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/eu.anthropic.claude-sonnet-4-5-20250929-v1:0",
        "claude-haiku-4-5@20251001",
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
    assert pricing.cost(table, "claude-opus-4-6", usage(inp=100_000)).source == pricing.LIBRARY
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
    assert caplog.records[-1].getMessage().endswith(" unpriced mode=egress path=/v1/messages")


# ------------------------------------------------------------------- the rate card against the library itself

def _anthropic_prices():
    """Every ModelPrice genai-prices holds for an Anthropic model (conditional prices included)."""
    found = []
    for provider in pricing.data_snapshot.get_snapshot().providers:
        if provider.id != "anthropic":
            continue
        for model in provider.models:
            for entry in model.prices if isinstance(model.prices, list) else [model.prices]:
                found.append((model.id, getattr(entry, "prices", entry)))
    return found


ANTHROPIC_PRICES = _anthropic_prices()


def test_the_library_has_anthropic_prices_with_a_long_context_tier():
    assert len(ANTHROPIC_PRICES) > 10
    assert any(pricing.rate_card(p) and pricing.rate_card(p).starts == (200_000,) for _, p in ANTHROPIC_PRICES)


@settings(max_examples=300, deadline=None)
@given(entry=st.sampled_from(ANTHROPIC_PRICES), inp=st.integers(0, 400_000), out=st.integers(0, 100_000),
       read=st.integers(0, 300_000), five=st.integers(0, 100_000), hour=st.integers(0, 100_000))
def test_the_rate_card_prices_every_request_exactly_as_calc_price(entry, inp, out, read, five, hour):
    """The card is only a faster way to the library's own figure: same Decimal, every model, every tier."""
    _, prices = entry
    card = pricing.rate_card(prices)
    assert card is not None, "an Anthropic price the card cannot hold would send every request to calc_price"
    prompt = inp + read + five + hour
    fixed, per_prompt, per_out, per_read, per_five, per_hour = card.rates[bisect.bisect_left(card.starts, prompt)]
    by_card = fixed + prompt * per_prompt + out * per_out + read * per_read + five * per_five + hour * per_hour
    assert by_card == pricing._calc(prices, prompt, out, read, five, hour)


def test_a_price_that_is_not_linear_in_the_tokens_gets_no_card_and_is_priced_by_the_library(monkeypatch):
    """A per-request price the card could hold, a price that grows faster than the tokens it could not: the
    check at a second point of the tier finds it, and the library prices every such request itself."""
    prices = next(p for _, p in ANTHROPIC_PRICES if pricing.rate_card(p))
    real = pricing._calc

    def squared(p, prompt, out, read, five, hour):
        return real(p, prompt, out, read, five, hour) + (Decimal(prompt) ** 2 / 10**12 if p is prices else 0)

    monkeypatch.setattr(pricing, "_calc", squared)
    pricing._cards.clear()
    try:
        assert pricing.rate_card(prices) is None
    finally:
        pricing._cards.clear()
    monkeypatch.setattr(pricing, "_calc", real)
    monkeypatch.setattr(pricing, "rate_card", lambda prices: None)  # no card: each request through calc_price
    tokens = {"inp": 150_000, "out": 1000, "read": 40_000, "write_5m": 10_000, "write_1h": 10_000}
    assert pricing.cost((), SONNET_45, usage(**tokens)).cost_usd == pytest.approx(dollars(SONNET_LONG, **tokens), abs=1e-9)


def test_one_exchange_is_priced_once_for_its_record_line_and_comment(monkeypatch):
    calls = []
    real = pricing.cost
    monkeypatch.setattr(exchange, "cost", lambda *a: calls.append(a) or real(*a))
    ex = exchange.Exchange(spec.Rules(), "anthropic", "reverse", "POST", "gw", "/v1/messages",
                           model_answered=SONNET_45, usage=usage(inp=10, out=5))
    first = ex.cost()
    assert ex.cost() is first and len(calls) == 1
    ex.usage = usage(inp=10, out=6)  # the counts changed (a stream's last usage): priced again
    assert ex.cost().cost_usd > first.cost_usd and len(calls) == 2


# ----------------------------------------------------------------------------- what the answer says was billed


def test_the_price_list_s_missing_long_context_tier_is_added_only_past_it():
    below = pricing.cost((), "claude-opus-4-6", usage(inp=200_000, out=1000))
    above = pricing.cost((), "claude-opus-4-6", usage(inp=200_001, out=1000))
    assert below == (round((200_000 * 5 + 1000 * 25) / 1e6, 8), 0.0, pricing.LIBRARY)
    assert above.cost_usd == round((200_001 * 5 * 2 + 1000 * 25 * 1.5) / 1e6, 8)
    assert above.source == f"{pricing.LIBRARY}; long context above 200000 prompt tokens (gateway)"
    # a model whose tier the list has keeps the list's own
    assert pricing.cost((), SONNET_45, usage(inp=300_000)).source == pricing.LIBRARY


def test_multipliers_apply_only_to_the_models_and_values_they_name():
    fast = {"input_tokens": 1000, "output_tokens": 0, "speed": "fast"}
    assert pricing.cost((), "claude-opus-4-6", fast).cost_usd == round(1000 * 5 / 1e6 * 6, 8)
    assert pricing.cost((), SONNET_45, fast).source == pricing.LIBRARY  # no fast mode: billed standard
    assert pricing.cost((), SONNET_45, {**fast, "speed": "standard", "inference_geo": "us"}).source == pricing.LIBRARY
    assert pricing.cost((), "claude-sonnet-4-6", {"input_tokens": 10, "inference_geo": "global"}).source == pricing.LIBRARY


def test_rule_lines_correct_the_list_with_multipliers_alone():
    table = rules.parse("pricing:\n  - {model: 'claude-opus-4-6*', multipliers: {speed: {fast: 1}, inference_geo: {us: 1.5}}}\n").pricing
    billed = {"input_tokens": 1000, "output_tokens": 0, "speed": "fast", "inference_geo": "us"}
    found = pricing.cost(table, "claude-opus-4-6", billed)
    assert found == (round(1000 * 5 / 1e6 * 1.5, 8), 0.0, f"{pricing.LIBRARY}; inference_geo us x1.5")


@pytest.mark.parametrize("text,reason", [
    ("  - {model: a, input: 1}\n", "gives some rates but not output"),
    ("  - {model: a}\n", "needs the five rates"),
    ("  - {model: a, multipliers: {colour: {x: 1}}}\n", "unknown key 'colour' in pricing[0].multipliers"),
    ("  - {model: a, multipliers: {speed: 6}}\n", "must map the usage value to a factor"),
    ("  - {model: a, multipliers: {speed: {fast: -1}}}\n", "pricing[0].multipliers.speed.fast must be a non-negative"),
    ("  - {model: a, multipliers: {speed: {fast: 2}}, tiers: []}\n", "tiers needs the line's own five rates"),
    ("  - {model: a, input: 1, output: 1, cache_write_5m: 1, cache_write_1h: 1, cache_read: 1,"
     " tiers: [{above: 0, input: 1, output: 1, cache_write_5m: 1, cache_write_1h: 1, cache_read: 1}]}\n",
     "tiers[0].above must be a positive whole number"),
])
def test_bad_price_lines_are_refused_with_line_and_reason(text, reason):
    with pytest.raises(rules.RulesError) as e:
        rules.parse("pricing:\n" + text)
    assert reason in str(e.value) and ":2:" in str(e.value), str(e.value)
