"""Totals over records: the one sum behind `gateway.stats` (per client, since start) and scripts/usage_report.

Requests, errors (records/schema.outcome), the four token counts, cost and savings in US dollars (a record
whose cost is unknown is counted as unpriced, never as $0), cache breaks. Costs are summed exactly
(`math.fsum` over running partial sums), so memory stays constant however many records are added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from llm_gateway.protocol.tokens import TOKEN_FIELDS, cache_share, integer
from llm_gateway.records.schema import is_error


def dollars(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclass
class Totals:
    requests: int = 0
    errors: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_FIELDS, 0))
    cost: list[float] = field(default_factory=list)  # the known costs, as exact partial sums (see `_add`)
    saved: list[float] = field(default_factory=list)
    cache_breaks: int = 0
    unpriced: int = 0  # requests that used tokens but have no cost (model neither priced by genai-prices nor the rules)
    priced: int = 0  # requests with a known cost

    def add(self, record: dict[str, Any]) -> None:
        self.requests += 1
        self.errors += is_error(record)
        used = False
        for key in TOKEN_FIELDS:
            n = integer(record.get(key)) or 0
            self.tokens[key] += n
            used = used or n > 0
        cost, saved = dollars(record.get("cost_usd")), dollars(record.get("saved_usd"))
        if cost is not None:
            _add(self.cost, cost)
            self.priced += 1
        elif used:
            self.unpriced += 1
        if saved is not None:
            _add(self.saved, saved)
        self.cache_breaks += record.get("cache_break") is True

    def hit_share(self) -> float | None:
        return cache_share(self.tokens)

    def row(self) -> dict[str, Any]:
        """The metrics, with None where nothing is known."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            **self.tokens,
            "cache_hit_share": self.hit_share(),
            "cost_usd": round(math.fsum(self.cost), 8) if self.priced else None,
            "saved_usd": round(math.fsum(self.saved), 8) if self.saved else None,
            "cache_breaks": self.cache_breaks,
            "unpriced": self.unpriced,
        }


def _add(partials: list[float], x: float) -> None:
    """Add `x` to an exact sum kept as non-overlapping partials (Shewchuk's algorithm, as `math.fsum` and the
    Python recipe "msum" use): `math.fsum(partials)` is then the correctly rounded total, in constant memory
    for sums of like magnitude."""
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]
