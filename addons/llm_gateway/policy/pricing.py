"""What an exchange cost, in US dollars: the rule file's `pricing[]` first, else the maintained price list of
the `genai-prices` library (Anthropic's list prices: cache read and write rates, and the long-context tier
that prices the whole request at higher rates past 200K prompt tokens).

The model priced is the one the answer names (a request for an alias is answered by a dated model). A model
neither knows gets no cost (None) rather than a guess. "Saved" is what the cache reads would have cost at
the input price of the same request, less what they did cost. Each price says where it came from
(`Cost.source`): "rules" or "genai-prices <version>".

One price rule, on what the answer says was billed (Anthropic's API reference, "usage"; its pricing page):
- the tokens: the top-level counts plus those of `usage.iterations` entries of type "compaction" (server-side
  compaction steps are billed but left out of the top-level counts);
- the rates: the rule line's (its `tiers` past their prompt size), else the price list's, with the long-context
  tier the list lacks for some current models (`LONG_CONTEXT`);
- then the multipliers of `usage.speed` and `usage.inference_geo` (fast mode, US-only inference): the rule
  line's, else `BILLED_MULTIPLIERS`. Each correction is named in `Cost.source` after a "; ".
"""

from __future__ import annotations

import bisect
import functools
import re
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, NamedTuple

import genai_prices
from genai_prices import data_snapshot
from genai_prices.types import TieredPrices

from llm_gateway.policy.rules import Price
from llm_gateway.policy.spec import BILLED_USAGE_FIELDS
from llm_gateway.protocol.tokens import TOKEN_FIELDS, cache_write_split, token
from llm_gateway.util.globs import Glob, glob_set
from llm_gateway.util.perobject import PerObject

MILLION = 1_000_000
LIBRARY = f"genai-prices {genai_prices.__version__}"
RULES = "rules"
# Provider spellings of an Anthropic model id: Bedrock's `us.anthropic.claude-…-v1:0` (regional and `global.`
# inference profiles), an ARN or `provider/` prefix, Vertex's `claude-…@20250929`.
_BEDROCK = re.compile(r"^(?:[a-z]{2,4}\.|global\.)?anthropic\.|-v\d+(?::\d+)?$")
_PATH_PREFIX = re.compile(r"^.*/")


# What the answer's usage says multiplies every rate (cache rates included), by model, where the rule file
# does not say: fast mode (`speed: "fast"`) costs 6x on Opus 4.6 and 4.7; US-only inference (`inference_geo:
# "us"`) 1.1x on Claude 4.6 and later models (Anthropic's pricing page, "Fast mode" and "Data residency").
BILLED_MULTIPLIERS: tuple[tuple[Glob, str, str, float], ...] = (
    (Glob("*claude-opus-4-6*"), "speed", "fast", 6.0),
    (Glob("*claude-opus-4-7*"), "speed", "fast", 6.0),
    *((Glob(f"*claude-{name}*"), "inference_geo", "us", 1.1)
      for name in ("*-4-6", "*-4-7", "*-4-8", "*-4-9", "opus-5", "sonnet-5", "haiku-5")),
)
# The long-context tier genai-prices lacks for these models: past 200K prompt tokens the whole request costs
# 2x on the prompt side (input, cache reads and writes) and 1.5x on output (Anthropic's pricing page, "Long
# context pricing"; the same tier the list has for Sonnet 4 and 4.5). Used only where the list has no tier.
LONG_CONTEXT: tuple[tuple[Glob, int, float, float], ...] = (
    (Glob("*claude-opus-4-6*"), 200_000, 2.0, 1.5),
    (Glob("*claude-sonnet-4-6*"), 200_000, 2.0, 1.5),
)


class Cost(NamedTuple):
    cost_usd: float | None
    saved_usd: float | None
    source: str | None  # "rules", "genai-prices <version>", or None when unpriced


UNPRICED = Cost(None, None, None)


def price_for(pricing: tuple[Price, ...], model: str | None) -> Price | None:
    if not model:
        return None
    found = glob_set(pricing, _model_glob).first(model)  # one regular expression for the whole table
    return None if found is None else pricing[found]


def _model_glob(price: Price):
    return price.model


def priced_key(usage: dict[str, Any]) -> tuple:
    """What a usage's price depends on besides the model: its billed counts and the fields of its multipliers."""
    return (counts(billed_usage(usage)[0]), *(usage.get(field) for field in BILLED_USAGE_FIELDS))


def counts(usage: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """(input, output, 5-minute cache write, 1-hour cache write, cache read) tokens; anything but a
    non-negative integer counts as none. The write split adds up to the final total (`cache_write_split`)."""
    five, hour = cache_write_split(usage)
    return (
        max(token(usage, "input_tokens") or 0, 0),
        max(token(usage, "output_tokens") or 0, 0),
        five or 0,
        hour or 0,
        max(token(usage, "cache_read_input_tokens") or 0, 0),
    )


def cost(pricing: tuple[Price, ...], model: str | None, usage: dict[str, Any] | None) -> Cost:
    """The cost of one exchange's usage: from `pricing` (the rule file) when a line matches `model`, else
    from genai-prices; `UNPRICED` when neither knows the model or there is no usage."""
    if not usage or not model:
        return UNPRICED
    billed, notes = billed_usage(usage)
    tokens = counts(billed)
    price = price_for(pricing, model)
    found = _from_rules(price, *tokens) if price is not None and price.rated else _from_library(model, *tokens)
    if found.cost_usd is None:
        return found
    factor = 1.0
    for field, value, times in multipliers(price, model, usage):
        factor *= times
        notes.append(f"{field} {value} x{times:g}")
    if not notes:
        return found
    return Cost(round(found.cost_usd * factor, 8), round((found.saved_usd or 0.0) * factor, 8),
                "; ".join([found.source or "", *notes]))


def billed_usage(usage: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The usage to price: the top-level counts plus those of the compaction steps in `usage.iterations`
    (billed, but outside the top-level counts: Anthropic's docs, "Compaction"); and a note when there were any."""
    steps = usage.get("iterations")
    if not isinstance(steps, list):
        return usage, []
    compaction = [s for s in steps if isinstance(s, dict) and s.get("type") == "compaction"]
    if not compaction:
        return usage, []
    billed = dict(usage)
    for key in TOKEN_FIELDS:
        extra = sum(token(step, key) or 0 for step in compaction)
        if extra:
            billed[key] = (token(usage, key) or 0) + extra
    if any(token(step, "cache_creation_input_tokens") for step in compaction):
        billed.pop("cache_creation", None)  # the split no longer adds up: the 5-minute default takes the rest
    return billed, [f"+{len(compaction)} compaction iteration{'s' if len(compaction) > 1 else ''}"]


def multipliers(price: Price | None, model: str, usage: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(usage field, value, factor) that apply to this answer: the rule line's for the value the usage names,
    else `BILLED_MULTIPLIERS`' for the model; a factor of 1 is no correction."""
    found = []
    for field in BILLED_USAGE_FIELDS:
        value = usage.get(field)
        if not isinstance(value, str) or not value:
            continue
        rule = [f for f_field, v, f in (price.multipliers if price else ()) if f_field == field and v == value]
        known = rule or [f for glob, f_field, v, f in BILLED_MULTIPLIERS if f_field == field and v == value
                         and glob.match(model)][:1]
        if known and known[0] != 1.0:
            found.append((field, value, known[0]))
    return found


def _from_rules(price: Price, inp: int, out: int, five: int, hour: int, read: int) -> Cost:
    prompt = inp + five + hour + read
    rates: Any = price
    for tier in price.tiers:  # sorted by `above`: the last one passed prices the whole request
        if prompt > tier.above:
            rates = tier
    dollars = (
        inp * rates.input + out * rates.output + five * rates.cache_write_5m + hour * rates.cache_write_1h
        + read * rates.cache_read
    ) / MILLION
    saved = read * (rates.input - rates.cache_read) / MILLION
    source = RULES if rates is price else f"{RULES}; above {rates.above} prompt tokens"
    return Cost(round(dollars, 8), round(saved, 8), source)


def preload() -> None:
    """Load genai-prices' snapshot now rather than on the first priced exchange (about 0.3 s)."""
    data_snapshot.get_snapshot()
    library_model("claude-sonnet-4-5")


@functools.lru_cache(maxsize=512)
def library_model(model: str):
    """genai-prices' model for an Anthropic model id (provider spellings normalised), or None."""
    ref = _BEDROCK.sub("", _PATH_PREFIX.sub("", model.strip().lower()))
    try:
        _, found = data_snapshot.get_snapshot().find_provider_model(ref, None, "anthropic", None)
    except (LookupError, ValueError):
        return None
    return found


def _from_library(model: str, inp: int, out: int, five: int, hour: int, read: int) -> Cost:
    found = library_model(model)
    if found is None:
        return UNPRICED
    prices = found.get_prices(datetime.now(timezone.utc))
    prompt = inp + five + hour + read  # genai-prices counts cache reads and writes inside input_tokens
    card = rate_card(prices)
    try:
        if card is None:  # not linear in the tokens (or not understood): the library prices every request
            paid = _calc(prices, prompt, out, read, five, hour)
            uncached = _calc(prices, prompt, out, 0, five, hour)
        else:
            fixed, per_prompt, per_out, per_read, per_five, per_hour = card.rates[bisect.bisect_left(card.starts, prompt)]
            uncached = fixed + prompt * per_prompt + out * per_out + five * per_five + hour * per_hour
            paid = uncached + read * per_read
            tier = next(((above, p, o) for glob, above, p, o in LONG_CONTEXT if glob.match(model)), None)
            if not card.starts and tier is not None and prompt > tier[0]:  # the tier the list lacks
                output = out * per_out
                on_prompt, on_out = Decimal(str(tier[1])), Decimal(str(tier[2]))
                paid = (paid - output) * on_prompt + output * on_out
                uncached = (uncached - output) * on_prompt + output * on_out
                return Cost(_dollars(paid), _dollars(max(uncached - paid, Decimal(0))),
                            f"{LIBRARY}; long context above {tier[0]} prompt tokens (gateway)")
    except (LookupError, ValueError, ArithmeticError):
        return UNPRICED
    return Cost(_dollars(paid), _dollars(max(uncached - paid, Decimal(0))), LIBRARY)


def _calc(prices, prompt: int, out: int, read: int, five: int, hour: int) -> Decimal:
    """genai-prices' own price of one request's tokens, in US dollars (`ModelPrice.calc_price`)."""
    usage = genai_prices.Usage(input_tokens=prompt, output_tokens=out, cache_read_tokens=read,
                               cache_write_tokens=five + hour, cache_write_5m_tokens=five, cache_write_1h_tokens=hour)
    return prices.calc_price(usage)["total_price"]


class RateCard(NamedTuple):
    """genai-prices' price of a model as plain numbers, so that a request costs five multiplications instead of
    `calc_price`'s unit registry walk (about 90 µs a call, two calls a request: a quarter of the gateway's CPU
    per request before). `starts`: the tier thresholds in prompt tokens (a prompt of more than `starts[i]`
    tokens is priced at `rates[i + 1]`, Anthropic's long-context "cliff"); `rates[i]`: (fixed, per prompt token,
    per output token, per cache-read token, per 5-minute cache-write token, per 1-hour cache-write token) in
    US dollars, the last four as the difference to a plain prompt token, since the prompt count includes them."""

    starts: tuple[int, ...]
    rates: tuple[tuple[Decimal, Decimal, Decimal, Decimal, Decimal, Decimal], ...]


def _card_of(prices) -> RateCard | None:
    try:
        return _measure(prices)
    except (LookupError, ValueError, ArithmeticError, TypeError):
        return None


_cards: PerObject[RateCard | None] = PerObject(_card_of, 1024)  # per ModelPrice (one per model and date range)


def rate_card(prices) -> RateCard | None:
    """The rate card of a genai-prices `ModelPrice`, measured with its own `calc_price` once: within a tier the
    price of a request is linear in its token counts, so the price of a base request and of one more token of
    each kind gives every rate. The card is checked against `calc_price` at a second point of each tier and is
    None (every request then goes to `calc_price`) when that disagrees or `calc_price` refuses: a price the
    library may grow that is not linear in these counts is never guessed."""
    return _cards(prices)


def _measure(prices) -> RateCard | None:
    starts = sorted({tier.start for value in vars(prices).values() if isinstance(value, TieredPrices)
                     for tier in value.tiers})
    rates = []
    for low, high in zip([-1, *starts], [*starts, None]):  # a tier holds prompts of low+1 … high tokens
        base = low + 3  # room for one cache read and one cache write inside the prompt, and one more token
        if high is not None and base + 1 > high:
            return None
        at = _calc(prices, base, 0, 0, 0, 0)
        per_prompt = _calc(prices, base + 1, 0, 0, 0, 0) - at
        fixed = at - base * per_prompt
        per_out = _calc(prices, base, 1, 0, 0, 0) - at
        per_read = _calc(prices, base, 0, 1, 0, 0) - at
        per_five = _calc(prices, base, 0, 0, 1, 0) - at
        per_hour = _calc(prices, base, 0, 0, 0, 1) - at
        # a second point of the tier, every count at once: the card must price it exactly as the library does
        prompt = base + 2_000 if high is None else min(base + 2_000, high)
        read, five, hour, out = prompt // 4, prompt // 5, prompt // 7, 1_234
        card = fixed + prompt * per_prompt + out * per_out + read * per_read + five * per_five + hour * per_hour
        if card != _calc(prices, prompt, out, read, five, hour):
            return None
        rates.append((fixed, per_prompt, per_out, per_read, per_five, per_hour))
    return RateCard(tuple(starts), tuple(rates))


def _dollars(value: Decimal) -> float:
    return round(float(value), 8)


def lost_cost(pricing: tuple[Price, ...], model: str | None, lost: int, usage: dict[str, Any] | None) -> float | None:
    """US dollars a cache break cost: `lost` tokens that a cache read would have served, paid instead at the
    cache-write price (as far as this request wrote cache, 5m price) and the rest at the input price; None where
    the price is unknown. Priced like `cost` (the rules, else genai-prices)."""
    if not model or not isinstance(lost, int) or lost <= 0:
        return None
    written = min(lost, max(token(usage, "cache_creation_input_tokens") or 0, 0))
    paid = cost(pricing, model, {"input_tokens": lost - written, "cache_creation_input_tokens": written})
    read = cost(pricing, model, {"cache_read_input_tokens": lost})
    if paid.cost_usd is None or read.cost_usd is None:
        return None
    return round(paid.cost_usd - read.cost_usd, 8)
