"""Usage report: totals per session, client, principal, model, agent or day from the gateway's JSONL record log.

Run as `scripts/usage_report [FILE ...]` (or `python -m llm_gateway.tools.report`; `llm_gateway.report` still
works). The standard library and the gateway's records/ and protocol/ layers only (no mitmproxy, no other package: a
test runs it so), so it runs anywhere the log is copied to. Cache breaks are also shown by client and reason (records/breaks.py); `--recompute-breaks` finds them again in the
merged records of every replica.

Only `"kind": "usage"` records count; other records sharing the file (egress decisions, …) are skipped,
and so are lines that are not JSON objects (a line cut short while the gateway was writing it): both are
counted and reported on standard error. `--by principal|model|agent|day` (repeatable, or comma-separated) give the
charge-back views: `principal` is the gateway token's name (key custody), `agent` Claude Code's agent id (the
record's `agent_id`, from `x-claude-code-agent-id`), `day` the record's UTC date; a record without the value
is grouped under null ("-" in the table). Every grouping's rows add up to the same total row. An unknown cost stays unknown: a group whose records have no
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

from llm_gateway.policy import quotas as quota_rules
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
# Groupings: the key columns of each (`--by NAME`), and the order key columns take in CSV.
GROUPS = {
    "session": ("session", "client"),
    "client": ("client",),
    "principal": ("principal",),
    "model": ("model",),
    "agent": ("agent", "parent_agent"),  # Claude Code's x-claude-code-agent-id and its parent's; none: a main loop
    "day": ("day",),
}
KEY_ORDER = ("client", "session", "principal", "model", "agent", "parent_agent", "day")
DEFAULT_BY = ("session", "client")
TABLE_HEADERS = {
    "session": "SESSION",
    "parent_agent": "PARENT AGENT",
    "client": "CLIENT",
    "principal": "PRINCIPAL",
    "model": "MODEL",
    "agent": "AGENT",
    "day": "DAY",
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
    principals: tuple[str, ...] = ()  # globs, case-insensitive, on the record's principal
    models: tuple[str, ...] = ()  # globs on the answering model
    agents: tuple[str, ...] = ()  # globs on agent_id

    def keep(self, record: dict[str, Any], when: datetime) -> bool:
        if self.since is not None and when < self.since:
            return False
        if self.until is not None and when >= self.until:
            return False
        for globs, key in ((self.clients, "client"), (self.principals, "principal"), (self.models, "model"),
                           (self.agents, "agent_id")):
            if globs:
                value = str(record.get(key) or "").lower()
                if not any(fnmatch.fnmatchcase(value, g.lower()) for g in globs):
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
            "principals": list(self.principals),
            "models": list(self.models),
            "agents": list(self.agents),
        }


# ------------------------------------------------------------------------------------------ totals


def groupings(by: str | Iterable[str] | None) -> tuple[str, ...]:
    """The groupings asked for, in order, each once: `--by` values may repeat or hold a comma-separated list;
    `both` is session and client (the default)."""
    if by is None:
        return DEFAULT_BY
    out: list[str] = []
    for value in [by] if isinstance(by, str) else by:
        for name in value.split(","):
            name = name.strip().lower()
            names = DEFAULT_BY if name == "both" else (name,)
            for n in names:
                if n not in GROUPS:
                    raise ReportError(f"--by: unknown grouping {name!r} (choose from {', '.join([*GROUPS, 'both'])})")
                if n not in out:
                    out.append(n)
    return tuple(out) or DEFAULT_BY


def text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def group_keys(record: dict[str, Any], when: datetime) -> dict[str, str | None]:
    """The value of every key column for one record (client "unknown" when missing, others None)."""
    return {
        "client": str(record.get("client") or "unknown"),
        "session": text_or_none(record.get("session")),
        "principal": text_or_none(record.get("principal")),
        "model": text_or_none(record.get("model")),
        "agent": text_or_none(record.get("agent_id")),
        "parent_agent": text_or_none(record.get("parent_agent_id")),
        "day": when.astimezone(timezone.utc).date().isoformat(),
    }


def _sort_key(key: tuple[str | None, ...]) -> tuple:
    return tuple((v is None, v or "") for v in key)


@dataclass
class Report:
    by: tuple[str, ...]  # names from GROUPS
    filters: Filters
    skipped: Skipped
    groups: dict[str, dict[tuple[str | None, ...], Totals]] = field(default_factory=dict)  # name -> key -> totals
    total: Totals = field(default_factory=Totals)
    breaks: cache_breaks.BreakTable = field(default_factory=cache_breaks.BreakTable)  # by client and reason
    caps: CapTable | None = None  # spend against each `quotas` budget (--rules)

    def add(self, record: dict[str, Any], when: datetime) -> None:
        keys = group_keys(record, when)
        for name in self.by:
            key = tuple(keys[k] for k in GROUPS[name])
            self.groups.setdefault(name, {}).setdefault(key, Totals()).add(record)
        self.total.add(record)
        self.breaks.add_recorded(record)

    def rows(self, name: str) -> list[dict[str, Any]]:
        """Sessions in the order first seen; every other grouping sorted by its key (None last)."""
        table = self.groups.get(name, {})
        keys = list(table) if name == "session" else sorted(table, key=_sort_key)
        return [{**dict(zip(GROUPS[name], k)), **table[k].row()} for k in keys]

    def sections(self) -> list[tuple[str, list[str], list[dict[str, Any]]]]:
        """(name, key columns, rows) for each grouping asked for."""
        return [(name, list(GROUPS[name]), self.rows(name)) for name in self.by]


@dataclass
class CapTable:
    """Spend in the records against each budget of a rule file's `quotas` section, in the period in force at `now`
    (UTC calendar periods, policy/quotas.window), per counter: (budget, period, who) -> micro-dollars. The
    records of every replica, merged, give what the shared store holds (less the exchanges still in flight)."""

    q: quota_rules.Quotas
    now: float
    spent: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def add(self, record: dict[str, Any], when: datetime) -> None:
        cost = record.get("cost_usd")
        if not isinstance(cost, (int, float)) or isinstance(cost, bool) or cost <= 0:
            return
        ts = when.timestamp()
        for budget in self.q.budgets:
            if not budget.match.matches(record.get("principal"), record.get("client"), record.get("model")):
                continue
            who = quota_rules.subject(budget.per, record.get("principal"), record.get("client"), record.get("session"))
            if who is None:
                continue
            for period, _ in budget.limits:
                if quota_rules.window(period, ts)[0] == quota_rules.window(period, self.now)[0]:
                    key = (budget.name, period, who)
                    self.spent[key] = self.spent.get(key, 0) + round(cost * quota_rules.MICRO)

    def rows(self) -> list[dict[str, Any]]:
        limits = {(b.name, period): (b.per, cap) for b in self.q.budgets for period, cap in b.limits}
        out = []
        for (name, period, who), micro in sorted(self.spent.items()):
            per, cap = limits[(name, period)]
            reset = quota_rules.window(period, self.now)[1]
            out.append({
                "budget": name, "per": per or "pool", "who": who, "period": period,
                "spent_usd": micro / quota_rules.MICRO, "cap_usd": cap / quota_rules.MICRO,
                "used": round(micro / cap, 4),
                "resets": datetime.fromtimestamp(reset, timezone.utc).isoformat() if reset else None,
            })
        return out


def build(names: Iterable[str], filters: Filters, by: str | Iterable[str] | None = None,
          recompute_breaks: bool = False, caps: CapTable | None = None) -> Report:
    """`by`: groupings (see `groupings`). `recompute_breaks`: find cache breaks again in the merged records (of
    every replica) rather than count the ones each replica recorded (cache_breaks.recompute). `caps`: also sum
    spend against each budget."""
    report = Report(by=groupings(by), filters=filters, skipped=Skipped(), caps=caps)
    kept = []
    for record, when in read_records(names, report.skipped):
        if filters.keep(record, when):
            report.add(record, when)
            if caps is not None:
                caps.add(record, when)
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
    if report.caps is not None:
        doc["budgets"] = report.caps.rows()
    doc["skipped"] = {"other_records": report.skipped.other, "corrupt_lines": report.skipped.corrupt}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def render_csv(report: Report) -> str:
    """One CSV: a `group` column says which grouping a row belongs to (session, client, principal, model, agent,
    day) or total; then the key columns of the groupings asked for; unknown values are empty cells."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    keys = [k for k in KEY_ORDER if any(k in GROUPS[name] for name in report.by)]
    writer.writerow(["group", *keys, *METRICS])

    def cell(key: str, value: Any) -> str:
        if value is None:
            return ""
        if key in ("cost_usd", "saved_usd"):
            return money_text(value)
        return str(value)

    for name, _, rows in report.sections():
        for row in rows:
            writer.writerow([name, *(row.get(k) or "" for k in keys), *(cell(k, row[k]) for k in METRICS)])
    total = report.total.row()
    writer.writerow(["total", *([""] * len(keys)), *(cell(k, total[k]) for k in METRICS)])
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
    if report.caps is not None:
        columns = ["budget", "per", "who", "period", "spent_usd", "cap_usd", "used", "resets"]
        heads = ["BUDGET", "PER", "WHO", "PERIOD", "SPENT $", "CAP $", "USED", "RESETS"]
        rows = report.caps.rows()
        lines = [heads] + [[f"{r[c]:,.4f}" if c.endswith("_usd") else f"{r[c]:.0%}" if c == "used"
                            else str(r[c] or "never") for c in columns] for r in rows]
        lines.append(["", "", "", "", "", "", "", ""])
        text = aligned(columns, ["budget", "per", "who", "period", "resets"], lines).rstrip().rsplit("\n", 1)[0]
        blocks.append("Spend against each budget (quotas, this period):\n" + (text if rows else "no spend yet"))
    return "\n\n".join(blocks) + "\n"


RENDER = {"table": render_table, "csv": render_csv, "json": render_json}


# ------------------------------------------------------------------------------------------ command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Requests, tokens, prompt-cache hit share, cost, savings and cache breaks per session, client, "
        "principal, model, agent or day, from the gateway's JSONL usage log.",
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
    p.add_argument("--principal", action="append", default=[], metavar="NAME",
                   help="only this principal (the gateway token's name; glob); repeat for several")
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="only this answering model (glob); repeat for several")
    p.add_argument("--agent", action="append", default=[], metavar="ID",
                   help="only this agent id (Claude Code's x-claude-code-agent-id; glob); repeat for several")
    p.add_argument("--by", action="append", metavar="GROUPING",
                   help=f"group by {', '.join(GROUPS)}, or both (= session,client, the default); repeat or "
                   "comma-separate for several tables, each ending in the same total")
    p.add_argument("--format", choices=tuple(RENDER), default="table", help="output format (default table)")
    p.add_argument("--rules", metavar="RULES",
                   help="a rule file: also show the spend in the records against each quotas budget, this period")
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
            principals=tuple(args.principal),
            models=tuple(args.model),
            agents=tuple(args.agent),
        )
        caps = None
        if args.rules:
            from llm_gateway.policy import rules as rule_file  # PyYAML: only with --rules (the report runs anywhere)

            try:
                caps = CapTable(rule_file.load(args.rules).quotas, now.timestamp())
            except rule_file.RulesError as e:
                raise ReportError(str(e)) from None
        report = build(files, filters, args.by, args.recompute_breaks, caps)
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
