"""Token counts of an Anthropic `usage` object, read one way everywhere (records, metrics, the report).

input_tokens excludes cache reads and cache writes (Anthropic's API reference, "usage"); cache writes split by
lifetime (5m / 1h) when the answer says so; the cache hit share is cache_read / (input + cache_read + cache_write).
"""

from __future__ import annotations

from typing import Any

# message_delta usage fields that overwrite only when present and not null.
OPTIONAL_DELTA_USAGE = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "server_tool_use",
    "output_tokens_details",
    "iterations",
    "fallback_credit",
)


# The API's two prompt-cache lifetimes, in seconds, by the `ttl` a cache_control block names (Anthropic docs,
# "Prompt caching": 5 minutes by default, 1 hour on request). The rules may shorten them for a test upstream.
CACHE_TTL = {"5m": 300.0, "1h": 3600.0}

# The four token counts of a usage object, in the order records, reports and metrics show them. Cache reads
# and cache writes are not part of input_tokens.
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def token(usage: dict[str, Any] | None, key: str) -> int | None:
    """A token count from a usage object, or None where it is absent or not a count (not an integer, or
    negative: what an upstream or a copied log may hold). The one reader of token counts."""
    return integer(usage.get(key)) if usage else None


def cache_write_split(usage: dict[str, Any] | None) -> tuple[int | None, int | None]:
    """(5-minute, 1-hour) cache-write tokens that add up to the final `cache_creation_input_tokens`.

    A stream's `message_delta` may raise the total without a split (message_start said 556 as 456 + 100,
    the end says 7345): the split is then stale. The 1-hour part is taken as reported (at most the total)
    and the rest is the 5-minute part, the API's default TTL; with no split at all every write is 5-minute.
    (None, None) where there is no total."""
    total = token(usage, "cache_creation_input_tokens")
    if total is None or total < 0:
        return None, None
    breakdown = usage.get("cache_creation") if isinstance(usage.get("cache_creation"), dict) else {}
    hour = min(max(token(breakdown, "ephemeral_1h_input_tokens") or 0, 0), total)
    return total - hour, hour


def full_price_prompt_tokens(usage: dict[str, Any] | None) -> int:
    """Prompt tokens not read from cache: `input_tokens` excludes cache reads and cache writes."""
    return (token(usage, "input_tokens") or 0) + (token(usage, "cache_creation_input_tokens") or 0)


def cache_share(usage: dict[str, Any] | None) -> float | None:
    """The share of prompt tokens read from cache, or None where there were no prompt tokens."""
    read = token(usage, "cache_read_input_tokens") or 0
    total = read + full_price_prompt_tokens(usage)
    return round(read / total, 4) if total else None


def merge_delta_usage(usage: dict[str, Any], delta_usage: dict[str, Any], billed: bool = False) -> None:
    """Apply a message_delta's usage to `usage` in place.

    Its counts are cumulative totals, so they overwrite rather than add. `output_tokens` is always
    taken (the SDK takes it even when missing, as null); the optional ones are left out when not
    applicable, and then the message_start value must survive. That is the SDK's accumulation; with
    `billed` (what the record prices) a count never goes down: a later smaller one (a relay's
    placeholder 0) leaves the earlier count, which was billed.
    """
    for key in ("output_tokens", *OPTIONAL_DELTA_USAGE):
        value = delta_usage.get(key)
        if value is None and key != "output_tokens":
            continue
        before = integer(usage.get(key))
        if billed and before is not None and integer(value) is not None and value < before:
            continue
        usage[key] = value


def integer(value: Any) -> int | None:
    """A count (tokens, a status) as read from JSON: a non-negative integer, else None (booleans are not)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
