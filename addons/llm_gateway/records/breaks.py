"""Cache breaks in the usage report: how many, why, and the money lost, by client and reason.

Standard library only (the report runs wherever the log is copied to). Two sources:

- the breaks the gateway recorded (`cache_break`, `cache_break_reason`, `cache_break_tokens_lost`,
  `cache_break_cost_usd`): exact, but a replica sees only the requests that reached it;
- `recompute`: the merged records of every replica, in time order, each distinct record once. A successful
  request that read fewer cache tokens than the previous request of its session and model had cached (read +
  write) is a break. Its reason is
  the one a replica recorded for it, else `ttl_expired` when the pause exceeded the cache TTL (5 minutes, or an
  hour when the previous request wrote 1h cache), else `unknown` (the prompt's fingerprints live only in the
  replica that saw the request, never in records). Its cost is the recorded one; a break no replica saw has none.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Iterator

from llm_gateway.protocol import jsoncodec
from llm_gateway.protocol.tokens import CACHE_TTL, integer
from llm_gateway.records.schema import record_outcome
from llm_gateway.records.totals import dollars

COLUMNS = ("client", "reason", "breaks", "tokens_lost", "lost_usd", "unpriced")
TABLE_HEADERS = {"client": "CLIENT", "reason": "REASON", "breaks": "BREAKS", "tokens_lost": "TOKENS LOST",
                 "lost_usd": "LOST $", "unpriced": "UNPRICED"}


@dataclass
class _Row:
    breaks: int = 0
    tokens_lost: int = 0
    lost: list[float] = field(default_factory=list)
    unpriced: int = 0  # breaks without a known cost


@dataclass
class BreakTable:
    rows: dict[tuple[str, str], _Row] = field(default_factory=dict)

    def add(self, client: str, reason: str, tokens_lost: int | None, lost_usd: float | None) -> None:
        row = self.rows.setdefault((client, reason), _Row())
        row.breaks += 1
        row.tokens_lost += tokens_lost or 0
        if lost_usd is None:
            row.unpriced += 1
        else:
            row.lost.append(lost_usd)

    def add_recorded(self, record: dict[str, Any]) -> None:
        """Count a record's own break, as the gateway found it."""
        if record.get("cache_break") is True:
            self.add(_client(record), _reason(record) or "unknown", integer(record.get("cache_break_tokens_lost")),
                     dollars(record.get("cache_break_cost_usd")))

    def result(self) -> list[dict[str, Any]]:
        """One row per (client, reason), most money lost first; None where no cost is known."""
        out = [
            {"client": c, "reason": r, "breaks": row.breaks, "tokens_lost": row.tokens_lost,
             "lost_usd": round(math.fsum(row.lost), 8) if row.lost else None, "unpriced": row.unpriced}
            for (c, r), row in self.rows.items()
        ]
        return sorted(out, key=lambda row: (-(row["lost_usd"] or 0), -row["tokens_lost"], row["client"], row["reason"]))


def _client(record: dict[str, Any]) -> str:
    return str(record.get("client") or "unknown")


def _reason(record: dict[str, Any]) -> str | None:
    reason = record.get("cache_break_reason")
    return reason if isinstance(reason, str) and reason else None


Found = tuple[dict[str, Any], str, int, float | None]  # (record, reason, tokens lost, US dollars lost or None)


def recompute(records: Iterable[tuple[dict[str, Any], datetime]]) -> Iterator[Found]:
    """(record, reason, tokens lost, lost US dollars or None) for every break in merged records, whatever replica
    wrote them; `records` are (record, time) pairs in any order. Breaks a replica recorded across models (a model
    switch) are kept as recorded."""
    # (session, agent, model) -> (time, cached, wrote 1h): a subagent's prompt is its own, not its main loop's
    last: dict[tuple[str, Any, Any], tuple[datetime, int, bool]] = {}
    seen: set[bytes] = set()  # records already counted: shippers deliver at least once, rotated logs overlap
    for record, when in sorted(records, key=lambda pair: pair[1]):
        same = hashlib.blake2b(jsoncodec.canonical(record), digest_size=16).digest()
        if same in seen:  # compared with itself, a copy reads less than it cached: a break that never was
            continue
        seen.add(same)
        session, read = record.get("session"), integer(record.get("cache_read_input_tokens"))
        if not isinstance(session, str) or read is None or not record_outcome(record).answered:
            continue
        key = (session, record.get("agent_id"), record.get("model"))
        prev = last.get(key)
        last[key] = (when, read + (integer(record.get("cache_creation_input_tokens")) or 0),
                     bool(integer(record.get("cache_creation_1h_input_tokens"))))
        recorded = _reason(record) if record.get("cache_break") is True else None
        if prev is None or read >= prev[1]:
            if recorded:  # found by the replica against another model's request: a model switch
                lost = integer(record.get("cache_break_tokens_lost")) or 0
                yield record, recorded, lost, dollars(record.get("cache_break_cost_usd"))
            continue
        lost = prev[1] - read
        if recorded:
            yield record, recorded, lost, dollars(record.get("cache_break_cost_usd"))
            continue
        pause = (when - prev[0]).total_seconds()
        yield record, "ttl_expired" if pause > CACHE_TTL["1h" if prev[2] else "5m"] else "unknown", lost, None


def table_from_merged(records: Iterable[tuple[dict[str, Any], datetime]]) -> BreakTable:
    table = BreakTable()
    for record, reason, lost, cost in recompute(records):
        table.add(_client(record), reason, lost, cost)
    return table
