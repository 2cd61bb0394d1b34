"""TODO docstring."""

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
    cost: list[float] = field(default_factory=list)  # the known costs
    saved: list[float] = field(default_factory=list)
    cache_breaks: int = 0
    unpriced: int = 0  # requests that used tokens but have no cost (model neither priced by genai-prices nor the rules)

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
            self.cost.append(cost)
        elif used:
            self.unpriced += 1
        if saved is not None:
            self.saved.append(saved)
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
            "cost_usd": round(math.fsum(self.cost), 8) if self.cost else None,
            "saved_usd": round(math.fsum(self.saved), 8) if self.saved else None,
            "cache_breaks": self.cache_breaks,
            "unpriced": self.unpriced,
        }
