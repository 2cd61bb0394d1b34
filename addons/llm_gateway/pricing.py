"""What an exchange cost, from the `pricing` table in the rules (US dollars per million tokens).

Unknown models have no cost rather than a guess. "Saved" is what the cache reads would have cost at
the input price, less what they did cost.
"""

from __future__ import annotations

from typing import Any

from .globs import glob_set
from .rules import Price

MILLION = 1_000_000


def price_for(pricing: tuple[Price, ...], model: str | None) -> Price | None:
    if not model:
        return None
    found = glob_set(pricing, _model_glob).first(model)  # one regular expression for the whole table
    return None if found is None else pricing[found]


def _model_glob(price: Price):
    return price.model


def tokens(usage: dict[str, Any], key: str) -> int:
    """A token count from usage as sent; anything but a non-negative integer counts as none."""
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def cost(pricing: tuple[Price, ...], model: str | None, usage: dict[str, Any] | None) -> tuple[float | None, float | None]:
    """(cost_usd, saved_usd) for one exchange's usage, or (None, None) where the price is unknown."""
    price = price_for(pricing, model)
    if price is None or not usage:
        return None, None
    write_total = tokens(usage, "cache_creation_input_tokens")
    breakdown = usage.get("cache_creation") if isinstance(usage.get("cache_creation"), dict) else {}
    write_1h = tokens(breakdown, "ephemeral_1h_input_tokens")
    write_5m = tokens(breakdown, "ephemeral_5m_input_tokens") or max(write_total - write_1h, 0)
    read = tokens(usage, "cache_read_input_tokens")
    dollars = (
        tokens(usage, "input_tokens") * price.input
        + tokens(usage, "output_tokens") * price.output
        + write_5m * price.cache_write_5m
        + write_1h * price.cache_write_1h
        + read * price.cache_read
    ) / MILLION
    saved = read * (price.input - price.cache_read) / MILLION
    return round(dollars, 8), round(saved, 8)


def lost_cost(pricing: tuple[Price, ...], model: str | None, lost: int, usage: dict[str, Any] | None) -> float | None:
    """US dollars a cache break cost: `lost` tokens that a cache read would have served, paid instead at the
    cache-write price (as far as this request wrote cache, 5m price) and the rest at the input price; None where
    the price is unknown."""
    price = price_for(pricing, model)
    if price is None or lost <= 0:
        return None
    written = min(lost, tokens(usage or {}, "cache_creation_input_tokens"))
    paid = written * price.cache_write_5m + (lost - written) * price.input
    return round((paid - lost * price.cache_read) / MILLION, 8)
