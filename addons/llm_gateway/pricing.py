"""What an exchange cost, in US dollars: the rule file's `pricing[]` first, else the maintained price list of
the `genai-prices` library (Anthropic's list prices: cache read and write rates, and the long-context tier
that prices the whole request at higher rates past 200K prompt tokens).

The model priced is the one the answer names (a request for an alias is answered by a dated model). A model
neither knows gets no cost (None) rather than a guess. "Saved" is what the cache reads would have cost at
the input price of the same request, less what they did cost. Each price says where it came from
(`Cost.source`): "rules" or "genai-prices <version>".
"""

from __future__ import annotations

import functools
import re
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, NamedTuple

import genai_prices
from genai_prices import data_snapshot

from .globs import glob_set
from .rules import Price
from .wire import cache_write_split, token

MILLION = 1_000_000
LIBRARY = f"genai-prices {genai_prices.__version__}"
RULES = "rules"
# Provider spellings of an Anthropic model id: Bedrock's `us.anthropic.claude-…-v1:0`, a `provider/` prefix,
# Vertex's `claude-…@20250929`.
_BEDROCK = re.compile(r"^(?:[a-z]{2,4}\.)?anthropic\.|-v\d+(?::\d+)?$")
_PATH_PREFIX = re.compile(r"^.*/")


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
    tokens = counts(usage)
    price = price_for(pricing, model)
    if price is not None:
        return _from_rules(price, *tokens)
    return _from_library(model, *tokens)


def _from_rules(price: Price, inp: int, out: int, five: int, hour: int, read: int) -> Cost:
    dollars = (
        inp * price.input + out * price.output + five * price.cache_write_5m + hour * price.cache_write_1h
        + read * price.cache_read
    ) / MILLION
    saved = read * (price.input - price.cache_read) / MILLION
    return Cost(round(dollars, 8), round(saved, 8), RULES)


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
    writes = {"cache_write_tokens": five + hour, "cache_write_5m_tokens": five, "cache_write_1h_tokens": hour}
    try:
        paid = prices.calc_price(
            genai_prices.Usage(input_tokens=prompt, output_tokens=out, cache_read_tokens=read, **writes)
        )["total_price"]
        uncached = prices.calc_price(genai_prices.Usage(input_tokens=prompt, output_tokens=out, **writes))["total_price"]
    except (LookupError, ValueError, ArithmeticError):
        return UNPRICED
    return Cost(_dollars(paid), _dollars(max(uncached - paid, Decimal(0))), LIBRARY)


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
