"""Usage report: totals per session and per client from the gateway's JSONL record log.

Run as `scripts/usage_report [FILE ...]` (or `python -m llm_gateway.tools.report`; `llm_gateway.report` still
works). The standard library and the gateway's records/ and protocol/ layers only (no mitmproxy, no other package: a
test runs it so), so it runs anywhere the log is copied to. Cache breaks are also shown by client and reason (records/breaks.py); `--recompute-breaks` finds them again in the
merged records of every replica.

Only `"kind": "usage"` records count; other records sharing the file (egress decisions, …) are skipped,
and so are lines that are not JSON objects (a line cut short while the gateway was writing it): both are
counted and reported on standard error. An unknown cost stays unknown: a group whose records have no
price shows "-" (table), an empty cell (CSV) or null (JSON), never $0; where only some records had a
price, the known part is shown and `unpriced` counts the requests left out.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

from llm_gateway.protocol.tokens import TOKEN_FIELDS
from llm_gateway.records import breaks as cache_breaks
from llm_gateway.records.reader import ReportError, Skipped, iso_time, read_records
from llm_gateway.records.totals import Totals

PROG = "usage_report"
DEFAULT_LOG_ENV = "LLM_GATEWAY_USAGE_LOG"

# Output columns after the group keys, in order; CSV headers and JSON keys use these names.
METRICS = (
    "requests",
    "errors",
    *TOKEN_FIELDS,
    "cache_hit_share",
    "cost_usd",
    "saved_usd",
    "cache_breaks",
    "unpriced",
)
TABLE_HEADERS = {
    "session": "SESSION",
    "agent": "AGENT",
    "parent_agent": "PARENT AGENT",
    "client": "CLIENT",
    "requests": "REQUESTS",
    "errors": "ERRORS",
    "input_tokens": "INPUT",
    "output_tokens": "OUTPUT",
    "cache_read_input_tokens": "CACHE READ",
    "cache_creation_input_tokens": "CACHE WRITE",
    "cache_hit_share": "HIT",
    "cost_usd": "COST $",
    "saved_usd": "SAVED $",
    "cache_breaks": "BREAKS",
    "unpriced": "UNPRICED",
}
SESSION_WIDTH = 40  # longer session ids are shortened in the table (a prefix works for --session)
RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.I)
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


# ------------------------------------------------------------------------------------------ reading


def parse_time(value: str, now: datetime) -> datetime:
    """A time from the command line: ISO 8601, or a span back from now (45s, 30m, 2h, 7d, 1w)."""
    m = RELATIVE.match(value)
    if m:
        return now - timedelta(**{UNITS[m.group(2).lower()]: float(m.group(1))})
    t = iso_time(value)
    if t is None:
        raise ReportError(f"not a time: {value!r} (use ISO 8601 like 2025-06-01T12:00:00Z, or 30m, 2h, 7d)")
    return t


# ------------------------------------------------------------------------------------------ filtering


@dataclass(frozen=True)
class Filters:
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive
    clients: tuple[str, ...] = ()  # globs, case-insensitive
    sessions: tuple[str, ...] = ()  # session id prefixes

    def keep(self, record: dict[str, Any], when: datetime) -> bool:
        if self.since is not None and when < self.since:
            return False
        if self.until is not None and when >= self.until:
            return False
        if self.clients:
            client = str(record.get("client") or "").lower()
            if not any(fnmatch.fnmatchcase(client, c.lower()) for c in self.clients):
                return False
        if self.sessions:
            session = record.get("session")
            if not isinstance(session, str) or not any(session.startswith(s) for s in self.sessions):
                return False
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "clients": list(self.clients),
            "sessions": list(self.sessions),
        }


# ------------------------------------------------------------------------------------------ totals


@dataclass
class Report:
    by: str  # "session" | "agent" | "client" | "both" (with agents when any record names one)
    filters: Filters
    skipped: Skipped
    sessions: dict[tuple[str, str | None], Totals] = field(default_factory=dict)  # (client, session), first seen first
    # (client, session, agent id, parent agent id) of records naming an agent (Claude Code's subagents)
    agents: dict[tuple[str, str | None, str, str | None], Totals] = field(default_factory=dict)
    clients: dict[str, Totals] = field(default_factory=dict)
    total: Totals = field(default_factory=Totals)
    breaks: cache_breaks.BreakTable = field(default_factory=cache_breaks.BreakTable)  # by client and reason

    def add(self, record: dict[str, Any]) -> None:
        client = str(record.get("client") or "unknown")
        session = record.get("session") if isinstance(record.get("session"), str) else None
        self.sessions.setdefault((client, session), Totals()).add(record)
        agent = record.get("agent_id")
        if isinstance(agent, str) and agent:
            parent = record.get("parent_agent_id") if isinstance(record.get("parent_agent_id"), str) else None
            self.agents.setdefault((client, session, agent, parent), Totals()).add(record)
        self.clients.setdefault(client, Totals()).add(record)
        self.total.add(record)
        self.breaks.add_recorded(record)

    def session_rows(self) -> list[dict[str, Any]]:
        return [{"session": s, "client": c, **t.row()} for (c, s), t in self.sessions.items()]

    def agent_rows(self) -> list[dict[str, Any]]:
        return [{"session": s, "agent": a, "parent_agent": p, "client": c, **t.row()}
                for (c, s, a, p), t in self.agents.items()]

    def client_rows(self) -> list[dict[str, Any]]:
        return [{"client": c, **self.clients[c].row()} for c in sorted(self.clients)]

    def sections(self) -> list[tuple[str, list[str], list[dict[str, Any]]]]:
        """(name, key columns, rows) for each grouping asked for."""
        out = []
        if self.by in ("session", "both"):
            out.append(("session", ["session", "client"], self.session_rows()))
        if self.by == "agent" or (self.by == "both" and self.agents):
            out.append(("agent", ["session", "agent", "parent_agent", "client"], self.agent_rows()))
        if self.by in ("client", "both"):
            out.append(("client", ["client"], self.client_rows()))
        return out


def build(names: Iterable[str], filters: Filters, by: str, recompute_breaks: bool = False) -> Report:
    """`recompute_breaks`: find cache breaks again in the merged records (of every replica) rather than count the
    ones each replica recorded (cache_breaks.recompute)."""
    report = Report(by=by, filters=filters, skipped=Skipped())
    kept = []
    for record, when in read_records(names, report.skipped):
        if filters.keep(record, when):
            report.add(record)
            if recompute_breaks:
                kept.append((record, when))
    if recompute_breaks:
        report.breaks = cache_breaks.table_from_merged(kept)
    return report


# ------------------------------------------------------------------------------------------ output


def money_text(value: float) -> str:
    text = f"{value:.8f}".rstrip("0").rstrip(".")
    return text if text != "-0" else "0"


def render_json(report: Report) -> str:
    doc: dict[str, Any] = {"filters": report.filters.describe()}
    for name, _, rows in report.sections():
        doc[f"{name}s"] = rows
    doc["total"] = report.total.row()
    doc["cache_breaks_by_reason"] = report.breaks.result()
    doc["skipped"] = {"other_records": report.skipped.other, "corrupt_lines": report.skipped.corrupt}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def render_csv(report: Report) -> str:
    """One CSV: a `group` column says session, client or total; unknown values are empty cells."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    agents = any(name == "agent" for name, _, _ in report.sections())
    writer.writerow(["group", "client", "session", *(["agent", "parent_agent"] if agents else []), *METRICS])

    def cell(key: str, value: Any) -> str:
        if value is None:
            return ""
        if key in ("cost_usd", "saved_usd"):
            return money_text(value)
        return str(value)

    for name, _, rows in report.sections():
        for row in rows:
            ids = [row.get("agent") or "", row.get("parent_agent") or ""] if agents else []
            writer.writerow([name, row["client"], row.get("session") or "", *ids, *(cell(k, row[k]) for k in METRICS)])
    total = report.total.row()
    writer.writerow(["total", "", "", *([""] * 2 if agents else []), *(cell(k, total[k]) for k in METRICS)])
    return out.getvalue()


def table_cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "cache_hit_share":
        return f"{value:.1%}"
    if key in ("cost_usd", "saved_usd"):
        return f"{value:,.4f}"
    if key in ("session", "agent", "parent_agent") and len(value) > SESSION_WIDTH:
        return value[: SESSION_WIDTH - 1] + "…"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def aligned(columns: list[str], keys: list[str], lines: list[list[str]]) -> str:
    """Table lines in columns: keys left-aligned, numbers right-aligned, a rule above the last line."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    text = []
    for n, line in enumerate(lines):
        if n == len(lines) - 1:
            text.append("  ".join("-" * w for w in widths))
        cells = [v.ljust(w) if c in keys else v.rjust(w) for c, v, w in zip(columns, line, widths)]
        text.append("  ".join(cells).rstrip())
    return "\n".join(text)


def render_table(report: Report) -> str:
    blocks = []
    total = report.total.row()
    for name, keys, rows in report.sections():
        columns = [*keys, *METRICS]
        lines = [[TABLE_HEADERS[c] for c in columns]]
        lines += [[table_cell(c, row[c]) for c in columns] for row in rows]
        lines.append(["TOTAL", *([""] * (len(keys) - 1)), *(table_cell(c, total[c]) for c in METRICS)])
        blocks.append(f"By {name}:\n" + aligned(columns, keys, lines))
    breaks = report.breaks.result()
    if breaks:
        columns, keys = list(cache_breaks.COLUMNS), ["client", "reason"]
        lines = [[cache_breaks.TABLE_HEADERS[c] for c in columns]]
        lines += [[table_cell("cost_usd" if c == "lost_usd" else c, row[c]) for c in columns] for row in breaks]
        lost = [row["lost_usd"] for row in breaks if row["lost_usd"] is not None]
        lines.append(["TOTAL", "", *(table_cell(c, sum(row[c] for row in breaks)) for c in ("breaks", "tokens_lost")),
                      table_cell("cost_usd", round(math.fsum(lost), 8) if lost else None),
                      table_cell("unpriced", sum(row["unpriced"] for row in breaks))])
        blocks.append("Cache breaks by client and reason:\n" + aligned(columns, keys, lines))
    return "\n\n".join(blocks) + "\n"


RENDER = {"table": render_table, "csv": render_csv, "json": render_json}


# ------------------------------------------------------------------------------------------ command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Requests, tokens, prompt-cache hit share, cost, savings and cache breaks per session and "
        "per client, from the gateway's JSONL usage log.",
        epilog=f"With no FILE, reads ${DEFAULT_LOG_ENV} (scripts/usage_report sets it to usage.jsonl at the "
        "project root). Times are ISO 8601 (UTC when no offset is given: 2025-06-01, 2025-06-01T12:00:00+02:00) "
        "or a span back from now: 45s, 30m, 2h, 7d, 1w. Errors are requests with an error type or status, no "
        "response, or cut short. Unknown costs are shown as '-' (table), empty (CSV) or null (JSON); "
        "UNPRICED counts requests with tokens but no price, left out of the cost.",
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="JSONL record logs; '-' for standard input")
    p.add_argument("--since", metavar="TIME", help="only records at or after TIME")
    p.add_argument("--until", metavar="TIME", help="only records before TIME")
    p.add_argument("--client", action="append", default=[], metavar="NAME",
                   help="only this client (glob, case-insensitive); repeat for several")
    p.add_argument("--session", action="append", default=[], metavar="ID",
                   help="only sessions whose id starts with ID; repeat for several")
    p.add_argument("--by", choices=("session", "agent", "client", "both"), default="both", help="grouping (default both: by session, by client, and by agent where "
                   "records name Claude Code's agents)")
    p.add_argument("--format", choices=tuple(RENDER), default="table", help="output format (default table)")
    p.add_argument("--recompute-breaks", action="store_true",
                   help="find cache breaks again in the merged records of every replica (table and JSON: breaks by "
                   "client and reason), instead of counting those each replica recorded")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    now = datetime.now(timezone.utc)
    try:
        files = args.files or ([os.environ[DEFAULT_LOG_ENV]] if os.environ.get(DEFAULT_LOG_ENV) else [])
        if not files:
            raise ReportError("no FILE given (use '-' for standard input)")
        filters = Filters(
            since=parse_time(args.since, now) if args.since else None,
            until=parse_time(args.until, now) if args.until else None,
            clients=tuple(args.client),
            sessions=tuple(args.session),
        )
        report = build(files, filters, args.by, args.recompute_breaks)
    except ReportError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    skipped = report.skipped
    if skipped.other or skipped.corrupt:
        parts = []
        if skipped.other:
            parts.append(f"{skipped.other} record(s) of another kind")
        if skipped.corrupt:
            parts.append(f"{skipped.corrupt} corrupt line(s), first at {skipped.first_corrupt}")
        print(f"{PROG}: skipped {' and '.join(parts)}", file=sys.stderr)
    if not report.total.requests:
        print(f"{PROG}: no usage records match", file=sys.stderr)
    try:
        sys.stdout.write(RENDER[args.format](report))
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: stop quietly, and keep Python from failing again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
