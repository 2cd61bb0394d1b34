"""scripts/usage_report on a generated log: exact totals in every format, every filter, bad input."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import subprocess
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from llm_gateway.tools import report

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "usage_report"

CC_A = "8be2e96a-a3ed-42d9-b652-ae345397006b"  # a Claude Code session
CC_B = "c7f0d1a2-9b3e-4c5d-8e6f-1a2b3c4d5e6f"
LITELLM_SESSION = "litellm-sess-1"
AGENT_MAIN, AGENT_SUB = "agent-main-1", "agent-sub-7"  # Claude Code's x-claude-code-agent-id

NOW = datetime.now(timezone.utc)
REQUEST_IDS = itertools.count(1)


def record(age: timedelta, client: str, session: str | None, model: str, *, status: int = 200,
           stream: bool = False, tokens: tuple[int, int, int, int] | None = None, cost: float | None = None,
           saved: float | None = None, error_type: str | None = None, complete: bool = True,
           cache_break: bool = False, principal: str | None = None, agent: str | None = None) -> dict:
    """A usage record as the gateway writes it; tokens are (input, output, cache read, cache write)."""
    inp, out, read, write = tokens if tokens else (None, None, None, None)
    prompt = (inp or 0) + (read or 0) + (write or 0)
    return {
        "kind": "usage", "ts": (NOW - age).isoformat(timespec="milliseconds"), "mode": "reverse",
        "client": client, "principal": principal, "agent_id": agent, "session": session, "api": "anthropic", "method": "POST", "host": "api.anthropic.com",
        "path": "/v1/messages", "upstream": "https://api.anthropic.com:443", "model": model, "status": status,
        "stream_requested": stream, "stream_upstream": stream, "input_tokens": inp, "output_tokens": out,
        "cache_creation_input_tokens": write, "cache_read_input_tokens": read,
        "cache_creation_5m_input_tokens": write, "cache_creation_1h_input_tokens": 0 if write is not None else None,
        "cache_hit_share": round(read / prompt, 4) if prompt else None, "cost_usd": cost, "saved_usd": saved,
        "request_id": f"req_{next(REQUEST_IDS):04d}", "error_type": error_type, "unwrapped": False,
        "unwrapped_from": None, "converted": None, "cache_break": cache_break, "complete": complete,
        "user_agent": None, "ttfb_ms": 120.5, "duration_ms": 900.0,
    }


M, H, D = timedelta(minutes=1), timedelta(hours=1), timedelta(days=1)
SONNET, OPUS, HAIKU = "claude-sonnet-4-5-20250929", "claude-opus-4-1-20250805", "claude-haiku-4-5"
# Costs are what the default pricing gives: Sonnet 3/15 (write 3.75, read 0.3), Opus 4.1 15/75, Haiku 4.5 1/5.
RECORDS = [
    # 0-3: a Claude Code session on Sonnet: writes its cache, reads it, breaks it, then the client abandons a stream
    # (principals: team-a holds sessions A and the SDK's, team-b session B; agents: A's main agent and a subagent)
    record(3 * D, "claude-code", CC_A, SONNET, stream=True, tokens=(2000, 300, 0, 10000), cost=0.048, saved=0.0,
           principal="team-a", agent=AGENT_MAIN),
    record(3 * D - M, "claude-code", CC_A, SONNET, stream=True, tokens=(50, 200, 10000, 500), cost=0.008025,
           saved=0.027, principal="team-a", agent=AGENT_MAIN),
    record(3 * H, "claude-code", CC_A, SONNET, stream=True, tokens=(12000, 400, 0, 0), cost=0.042, saved=0.0,
           cache_break=True, principal="team-a", agent=AGENT_MAIN),
    record(30 * M, "claude-code", CC_A, SONNET, stream=True, tokens=(100, 20, 12000, 0), cost=0.0042, saved=0.0324,
           complete=False, principal="team-a", agent=AGENT_SUB),
    # 4-5: another Claude Code session on Opus, not streaming, then an overload
    record(90 * M, "claude-code", CC_B, OPUS, tokens=(10, 10, 0, 0), cost=0.0009, saved=0.0, principal="team-b"),
    record(60 * M, "claude-code", CC_B, OPUS, status=529, error_type="overloaded_error", principal="team-b"),
    # 6-7: the Python SDK without a session
    record(2 * D, "anthropic-python", None, HAIKU, tokens=(100, 50, 0, 0), cost=0.00035, saved=0.0,
           principal="team-a"),
    record(10 * M, "anthropic-python", None, HAIKU, stream=True, tokens=(5, 5, 0, 0), cost=0.00003, saved=0.0,
           principal="team-a"),
    # 8-9: LiteLLM with a model alias the pricing table does not know, then a bad key
    record(5 * H, "litellm", LITELLM_SESSION, "my-sonnet", tokens=(1000, 100, 500, 0)),
    record(20 * M, "litellm", LITELLM_SESSION, "my-sonnet", status=401, error_type="authentication_error"),
    # 10: an unknown client on an unknown model
    record(1 * D, "unknown", None, "gpt-x", tokens=(7, 3, 0, 0)),
]
EGRESS = {"kind": "egress", "ts": NOW.isoformat(), "host": "github.com", "port": 443, "decision": "deny"}
CORRUPT = '{"kind":"usage","ts":"' + NOW.isoformat()[:10] + '","client":"claude-co'  # cut off mid-write

# The whole log, by hand (see the records above).
TOTAL = {
    "requests": 11, "errors": 3, "input_tokens": 15272, "output_tokens": 1088, "cache_read_input_tokens": 22500,
    "cache_creation_input_tokens": 10500, "cache_hit_share": 0.4661, "cost_usd": 0.103505, "saved_usd": 0.0594,
    "cache_breaks": 1, "unpriced": 2,
}
CLIENTS = {
    "anthropic-python": {"requests": 2, "errors": 0, "input_tokens": 105, "output_tokens": 55,
                         "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "cache_hit_share": 0.0,
                         "cost_usd": 0.00038, "saved_usd": 0.0, "cache_breaks": 0, "unpriced": 0},
    "claude-code": {"requests": 6, "errors": 2, "input_tokens": 14160, "output_tokens": 930,
                    "cache_read_input_tokens": 22000, "cache_creation_input_tokens": 10500, "cache_hit_share": 0.4715,
                    "cost_usd": 0.103125, "saved_usd": 0.0594, "cache_breaks": 1, "unpriced": 0},
    "litellm": {"requests": 2, "errors": 1, "input_tokens": 1000, "output_tokens": 100,
                "cache_read_input_tokens": 500, "cache_creation_input_tokens": 0, "cache_hit_share": 0.3333,
                "cost_usd": None, "saved_usd": None, "cache_breaks": 0, "unpriced": 1},
    "unknown": {"requests": 1, "errors": 0, "input_tokens": 7, "output_tokens": 3, "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0, "cache_hit_share": 0.0, "cost_usd": None, "saved_usd": None,
                "cache_breaks": 0, "unpriced": 1},
}
SESSIONS = {  # (client, session) in order of first appearance in the log
    ("claude-code", CC_A): {"requests": 4, "errors": 1, "input_tokens": 14150, "output_tokens": 920,
                            "cache_read_input_tokens": 22000, "cache_creation_input_tokens": 10500,
                            "cache_hit_share": 0.4716, "cost_usd": 0.102225, "saved_usd": 0.0594, "cache_breaks": 1,
                            "unpriced": 0},
    ("claude-code", CC_B): {"requests": 2, "errors": 1, "input_tokens": 10, "output_tokens": 10,
                            "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "cache_hit_share": 0.0,
                            "cost_usd": 0.0009, "saved_usd": 0.0, "cache_breaks": 0, "unpriced": 0},
    ("anthropic-python", None): CLIENTS["anthropic-python"],
    ("litellm", LITELLM_SESSION): CLIENTS["litellm"],
    ("unknown", None): CLIENTS["unknown"],
}


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> Path:
    """The records in two files, as after a restart, with an egress record, a corrupt line and a blank line."""
    folder = tmp_path_factory.mktemp("usage")
    lines = [json.dumps(r, separators=(",", ":")) for r in RECORDS]
    first, second = folder / "usage.jsonl", folder / "usage.jsonl.1"
    first.write_text("\n".join(lines[:4] + [json.dumps(EGRESS)] + lines[4:7]) + "\n")
    second.write_text("\n".join(lines[7:9] + [CORRUPT, ""] + lines[9:]) + "\n")
    return folder


def files(folder: Path) -> list[str]:
    return [str(folder / "usage.jsonl"), str(folder / "usage.jsonl.1")]


class _FrozenNow(datetime):
    """`datetime` whose now() is the NOW the records were made at: a suite that runs for many minutes must not
    move the report's relative spans (--since 4h) against the records' fixed times."""

    @classmethod
    def now(cls, tz=None):
        return NOW if tz is None else NOW.astimezone(tz)


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "datetime", _FrozenNow)
        code = report.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def as_json(capsys, log: Path, *args: str) -> dict:
    code, out, _ = run(capsys, "--format", "json", *args, *files(log))
    assert code == 0
    return json.loads(out)


def sums(indices: set[int]) -> dict:
    """requests and token totals of the given records, for checking which records a filter kept."""
    chosen = [RECORDS[i] for i in indices]
    return {
        "requests": len(chosen),
        "input_tokens": sum(r["input_tokens"] or 0 for r in chosen),
        "output_tokens": sum(r["output_tokens"] or 0 for r in chosen),
        "cost_usd": float(sum(Decimal(str(r["cost_usd"])) for r in chosen if r["cost_usd"] is not None)) or None,
    }


def kept(doc: dict) -> dict:
    return {k: doc["total"][k] for k in ("requests", "input_tokens", "output_tokens", "cost_usd")}


# ------------------------------------------------------------------------------------------------ formats


def test_json_totals_per_session_and_client(capsys, log):
    doc = as_json(capsys, log)
    assert doc["total"] == TOTAL
    assert {r["client"]: {k: v for k, v in r.items() if k != "client"} for r in doc["clients"]} == CLIENTS
    assert [r["client"] for r in doc["clients"]] == sorted(CLIENTS)
    sessions = {(r["client"], r["session"]): {k: v for k, v in r.items() if k not in ("client", "session")}
                for r in doc["sessions"]}
    assert sessions == SESSIONS
    assert [(r["client"], r["session"]) for r in doc["sessions"]] == list(SESSIONS)
    assert doc["skipped"] == {"other_records": 1, "corrupt_lines": 1}


def test_skipped_lines_are_counted_on_stderr(capsys, log):
    code, _, err = run(capsys, *files(log))
    assert code == 0
    assert "1 record(s) of another kind" in err
    assert f"1 corrupt line(s), first at {log / 'usage.jsonl.1'}:3" in err


def parse_table(text: str) -> dict[str, list[dict[str, str]]]:
    """Sections of the table as rows of {HEADER: cell}; columns are cut where the header line has them."""
    sections: dict[str, list[dict[str, str]]] = {}
    for block in text.strip().split("\n\n"):
        title, header, *rows = block.split("\n")
        names = [h.strip() for h in header.split("  ") if h.strip()]
        widths = [len(seg) for seg in rows[-2].split("  ")]  # the dashes line gives each column's width
        assert len(widths) == len(names)
        ends, pos = [], 0
        for w in widths:
            ends.append(pos + w)
            pos += w + 2
        parsed = []
        for row in rows:
            if set(row) <= {"-", " "}:
                continue
            cells = [row[e - w: e].strip() for e, w in zip(ends, widths)]
            parsed.append(dict(zip(names, cells)))
        sections[title.rstrip(":")] = parsed
    return sections


def table_value(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "cache_hit_share":
        return f"{value * 100:.1f}%"
    if key in ("cost_usd", "saved_usd"):
        return f"{value:,.4f}"
    return f"{value:,}"


COLUMN = {"requests": "REQUESTS", "errors": "ERRORS", "input_tokens": "INPUT", "output_tokens": "OUTPUT",
          "cache_read_input_tokens": "CACHE READ", "cache_creation_input_tokens": "CACHE WRITE",
          "cache_hit_share": "HIT", "cost_usd": "COST $", "saved_usd": "SAVED $", "cache_breaks": "BREAKS",
          "unpriced": "UNPRICED"}


def test_table_is_aligned_with_totals_row_and_dashes_for_unknown_cost(capsys, log):
    code, out, _ = run(capsys, *files(log))
    assert code == 0
    sections = parse_table(out)
    assert list(sections) == ["By session", "By client", "Cache breaks by client and reason"]
    assert sections.pop("Cache breaks by client and reason") == [  # the break recorded without a reason
        {"CLIENT": "claude-code", "REASON": "unknown", "BREAKS": "1", "TOKENS LOST": "0", "LOST $": "-", "UNPRICED": "1"},
        {"CLIENT": "TOTAL", "REASON": "", "BREAKS": "1", "TOKENS LOST": "0", "LOST $": "-", "UNPRICED": "1"},
    ]
    for name, rows in sections.items():
        total = rows[-1]
        first_key = "SESSION" if name == "By session" else "CLIENT"
        assert total[first_key] == "TOTAL"
        assert {COLUMN[k]: total[COLUMN[k]] for k in TOTAL} == {COLUMN[k]: table_value(k, v) for k, v in TOTAL.items()}
    by_client = {row["CLIENT"]: row for row in sections["By client"][:-1]}
    assert list(by_client) == sorted(CLIENTS)
    for client, expected in CLIENTS.items():
        assert {k: by_client[client][COLUMN[k]] for k in expected} == {k: table_value(k, v) for k, v in expected.items()}
    assert by_client["litellm"]["COST $"] == "-" and by_client["litellm"]["SAVED $"] == "-"
    by_session = sections["By session"][:-1]
    assert [(r["CLIENT"], r["SESSION"]) for r in by_session] == [(c, s or "-") for c, s in SESSIONS]
    for row, expected in zip(by_session, SESSIONS.values()):
        assert {k: row[COLUMN[k]] for k in expected} == {k: table_value(k, v) for k, v in expected.items()}
    # aligned: every line of a section has the same length up to trailing spaces of the last column
    for block in out.strip().split("\n\n"):
        lines = block.split("\n")[1:]
        assert len({len(line) for line in lines}) == 1, lines


def test_csv_rows_and_empty_cells_for_unknown_cost(capsys, log):
    code, out, _ = run(capsys, "--format", "csv", *files(log))
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["group", "client", "session", *TOTAL]

    def expected_cells(values: dict) -> dict:
        return {k: "" if v is None else (f"{v:.8f}".rstrip("0").rstrip(".") if k in ("cost_usd", "saved_usd")
                                         else str(v)) for k, v in values.items()}

    total = [r for r in rows if r["group"] == "total"]
    assert len(total) == 1 and rows[-1]["group"] == "total"
    assert {k: total[0][k] for k in TOTAL} == expected_cells(TOTAL)
    assert total[0]["cost_usd"] == "0.103505" and total[0]["saved_usd"] == "0.0594"
    clients = {r["client"]: {k: r[k] for k in TOTAL} for r in rows if r["group"] == "client"}
    assert clients == {c: expected_cells(v) for c, v in CLIENTS.items()}
    assert clients["litellm"]["cost_usd"] == "" and clients["unknown"]["saved_usd"] == ""
    sessions = {(r["client"], r["session"]): {k: r[k] for k in TOTAL} for r in rows if r["group"] == "session"}
    assert sessions == {(c, s or ""): expected_cells(v) for (c, s), v in SESSIONS.items()}


@pytest.mark.parametrize("by, present, absent", [("session", "sessions", "clients"), ("client", "clients", "sessions")])
def test_by_one_grouping(capsys, log, by, present, absent):
    doc = as_json(capsys, log, "--by", by)
    assert present in doc and absent not in doc and doc["total"] == TOTAL
    _, out, _ = run(capsys, "--by", by, *files(log))
    assert out.startswith(f"By {by}:") and out.count("By ") == 1
    _, out, _ = run(capsys, "--format", "csv", "--by", by, *files(log))
    assert {r["group"] for r in csv.DictReader(io.StringIO(out))} == {by, "total"}


BY_KEYS = {  # grouping -> the key of each record (by index), as group_keys gives it
    "principal": lambda i, r: (r["principal"],),
    "model": lambda i, r: (r["model"],),
    "agent": lambda i, r: (r["agent_id"], r.get("parent_agent_id")),
    "day": lambda i, r: (r["ts"][:10],),
    "client": lambda i, r: (r["client"],),
}


@pytest.mark.parametrize("by", sorted(BY_KEYS))
def test_by_charge_back_groupings_sum_to_the_total(capsys, log, by):
    """Each grouping's rows are the sums of exactly its records, add up to the total, and a missing value is
    a group of its own (null), never dropped."""
    doc = as_json(capsys, log, "--by", by)
    assert list(doc) == ["filters", f"{by}s", "total", "cache_breaks_by_reason", "skipped"]
    expected: dict[tuple, set[int]] = {}
    for i, r in enumerate(RECORDS):
        expected.setdefault(BY_KEYS[by](i, r), set()).add(i)
    got = {tuple(row[k] for k in report.GROUPS[by]): {k: row[k] for k in sums(set())} for row in doc[f"{by}s"]}
    assert got == {k: sums(v) for k, v in expected.items()}
    assert sum(row["requests"] for row in doc[f"{by}s"]) == TOTAL["requests"] and doc["total"] == TOTAL
    keys = [tuple(row[k] for k in report.GROUPS[by]) for row in doc[f"{by}s"]]
    assert keys == sorted(keys, key=lambda k: (k[0] is None, k[0] or ""))  # sorted, the unknown last


def test_by_principal_values_by_hand(capsys, log):
    doc = as_json(capsys, log, "--by", "principal")
    rows = {r["principal"]: (r["requests"], r["errors"], r["cost_usd"], r["unpriced"]) for r in doc["principals"]}
    assert rows == {"team-a": (6, 1, 0.102605, 0), "team-b": (2, 1, 0.0009, 0), None: (3, 1, None, 2)}
    assert [r["principal"] for r in doc["principals"]] == ["team-a", "team-b", None]


def test_by_several_groupings_csv_with_totals(capsys, log):
    """A team charges back from the CSV: one row per (grouping, key), the key columns of the groupings asked for,
    and one total row; repeated and comma-separated --by values are the same."""
    _, out, _ = run(capsys, "--format", "csv", "--by", "principal,model", "--by", "day", *files(log))
    _, again, _ = run(capsys, "--format", "csv", "--by", "principal", "--by", "model,day", *files(log))
    assert out == again
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["group", "principal", "model", "day", *TOTAL]
    assert [r["group"] for r in rows][-1] == "total" and {r["group"] for r in rows} == {"principal", "model", "day",
                                                                                          "total"}
    for group in ("principal", "model", "day"):
        part = [r for r in rows if r["group"] == group]
        assert sum(int(r["requests"]) for r in part) == TOTAL["requests"]
        assert sum(Decimal(r["cost_usd"] or "0") for r in part) == Decimal("0.103505")
    team_a = [r for r in rows if r["group"] == "principal" and r["principal"] == "team-a"][0]
    assert (team_a["model"], team_a["day"], team_a["cost_usd"]) == ("", "", "0.102605")
    _, table, _ = run(capsys, "--by", "agent", *files(log))
    parsed = parse_table(table)["By agent"]
    assert [r["AGENT"] for r in parsed] == [AGENT_MAIN, AGENT_SUB, "-", "TOTAL"]


@pytest.mark.parametrize("args, indices", [
    (["--principal", "team-a"], {0, 1, 2, 3, 6, 7}),
    (["--principal", "TEAM-*", "--model", "claude-opus-*"], {4, 5}),
    (["--agent", AGENT_SUB], {3}),
    (["--agent", "agent-*", "--since", "1h"], {3}),
    (["--model", "my-sonnet", "--model", "gpt-x"], {8, 9, 10}),
    (["--principal", "nobody"], set()),
])
def test_charge_back_filters(capsys, log, args, indices):
    doc = as_json(capsys, log, *args)
    assert kept(doc) == sums(indices)


def test_unknown_grouping_is_refused(capsys, log):
    code, out, err = run(capsys, "--by", "team", *files(log))
    assert code == 2 and out == "" and "unknown grouping 'team'" in err


# ------------------------------------------------------------------------------------------------ filters


def iso(t: datetime) -> str:
    return t.isoformat()


@pytest.mark.parametrize("args, indices", [
    (["--since", "2h"], {3, 4, 5, 7, 9}),
    (["--since", "4h", "--until", "45m"], {2, 4, 5}),
    (["--until", "60h"], {0, 1}),
    (["--since", "2.5d", "--until", "1.5d"], {6}),
    (["--since", "1w", "--until", "2000m"], {0, 1, 6}),
    (["--since", "90s"], set()),
    (["--client", "claude-code"], {0, 1, 2, 3, 4, 5}),
    (["--client", "Claude-Code"], {0, 1, 2, 3, 4, 5}),
    (["--client", "litellm", "--client", "unknown"], {8, 9, 10}),
    (["--client", "anthropic-*"], {6, 7}),
    (["--session", CC_A[:8]], {0, 1, 2, 3}),
    (["--session", CC_A, "--session", LITELLM_SESSION], {0, 1, 2, 3, 8, 9}),
    (["--client", "claude-code", "--since", "2h"], {3, 4, 5}),
    (["--session", CC_B, "--client", "litellm"], set()),
])
def test_filters(capsys, log, args, indices):
    doc = as_json(capsys, log, *args)
    assert kept(doc) == sums(indices)
    assert sum(r["requests"] for r in doc["clients"]) == len(indices)
    assert {r["client"] for r in doc["clients"]} == {RECORDS[i]["client"] for i in indices}


def test_iso_times_with_offset_z_and_none(capsys, log):
    since = NOW - timedelta(days=2, hours=12)
    until = NOW - timedelta(hours=12)
    expected = sums({6, 10})
    for s, u in [
        (iso(since), iso(until)),
        (since.strftime("%Y-%m-%dT%H:%M:%SZ"), until.strftime("%Y-%m-%dT%H:%M:%SZ")),
        (since.strftime("%Y-%m-%dT%H:%M:%S"), until.strftime("%Y-%m-%dT%H:%M:%S")),  # no offset: UTC
        (since.astimezone(timezone(timedelta(hours=2))).isoformat(), until.astimezone(timezone(-timedelta(hours=5))).isoformat()),
    ]:
        assert kept(as_json(capsys, log, "--since", s, "--until", u)) == expected, (s, u)
    doc = as_json(capsys, log, "--since", NOW.date().isoformat())  # a date alone is midnight UTC
    midnight = datetime(NOW.year, NOW.month, NOW.day, tzinfo=timezone.utc)
    assert kept(doc) == sums({i for i, r in enumerate(RECORDS) if datetime.fromisoformat(r["ts"]) >= midnight})
    assert doc["filters"]["since"] == midnight.isoformat()


def test_no_match_gives_zero_totals_and_null_costs(capsys, log):
    code, out, err = run(capsys, "--format", "json", "--client", "nobody", *files(log))
    assert code == 0 and "no usage records match" in err
    doc = json.loads(out)
    assert doc["total"]["requests"] == 0 and doc["total"]["cost_usd"] is None and doc["total"]["cache_hit_share"] is None
    assert doc["sessions"] == [] and doc["clients"] == []


@pytest.mark.parametrize("args, message", [
    (["--since", "yesterday"], "not a time: 'yesterday'"),
    (["--until", "5y"], "not a time: '5y'"),
])
def test_bad_times_are_refused(capsys, log, args, message):
    code, out, err = run(capsys, *args, *files(log))
    assert code == 2 and out == "" and message in err


def test_missing_file_is_refused(capsys, tmp_path):
    code, out, err = run(capsys, str(tmp_path / "nope.jsonl"))
    assert code == 2 and out == "" and "cannot read" in err and "nope.jsonl" in err


def test_no_file_and_no_default(capsys, monkeypatch):
    monkeypatch.delenv(report.DEFAULT_LOG_ENV, raising=False)
    code, _, err = run(capsys)
    assert code == 2 and "no FILE given" in err


def test_records_with_junk_fields_do_not_break_the_report(capsys, tmp_path):
    junk = [
        {**RECORDS[0], "input_tokens": "2000", "cost_usd": "0.1", "cache_break": "yes", "client": None},
        {**RECORDS[1], "ts": "not a time"},
        {**RECORDS[2], "ts": None},
        ["a", "list"],
        {**RECORDS[4], "cost_usd": float("nan"), "saved_usd": float("inf")},
    ]
    path = tmp_path / "junk.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in junk) + "\n")
    code, out, err = run(capsys, "--format", "json", str(path))
    assert code == 0
    doc = json.loads(out)
    assert doc["skipped"] == {"other_records": 0, "corrupt_lines": 3}
    assert doc["total"]["requests"] == 2
    # "2000" is not a token count, "0.1" and NaN not costs, "yes" not a cache break; a client None is unknown
    assert doc["total"]["input_tokens"] == RECORDS[4]["input_tokens"]
    assert doc["total"]["cache_breaks"] == 0 and doc["total"]["cost_usd"] is None
    assert {r["client"] for r in doc["clients"]} == {"unknown", "claude-code"}


# ------------------------------------------------------------------------------------------------ the command


def command(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], input=stdin, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_command_reads_files_and_reports_in_every_format(log):
    assert os.access(SCRIPT, os.X_OK)
    done = command("--format", "json", *files(log))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["total"] == TOTAL and "1 corrupt line(s)" in done.stderr
    done = command("--format", "csv", "--by", "client", *files(log))
    assert done.returncode == 0
    total = [r for r in csv.DictReader(io.StringIO(done.stdout)) if r["group"] == "total"][0]
    assert (total["requests"], total["cost_usd"], total["unpriced"]) == ("11", "0.103505", "2")
    done = command(*files(log))
    assert done.returncode == 0
    assert parse_table(done.stdout)["By client"][-1]["COST $"] == "0.1035"


def test_command_filters_and_stdin(log):
    # absolute times: the subprocess reads the real clock, which has moved on since NOW (a slow suite, a moved clock)
    text = "".join(Path(f).read_text() for f in files(log))
    done = command("--format", "json", "--client", "claude-code", "--since", iso(NOW - 2 * H), "-", stdin=text)
    assert done.returncode == 0, done.stderr
    assert kept(json.loads(done.stdout)) == sums({3, 4, 5})
    done = command("--format", "json", "--session", CC_A, "--until", iso(NOW - D), "-", stdin=text)
    assert kept(json.loads(done.stdout)) == sums({0, 1})


def test_command_default_log_and_errors(log, tmp_path):
    done = command("--format", "json", "--by", "client", env={report.DEFAULT_LOG_ENV: str(log / "usage.jsonl")})
    assert done.returncode == 0, done.stderr
    assert kept(json.loads(done.stdout)) == sums(set(range(7)))
    done = command("--since", "whenever", *files(log))
    assert done.returncode == 2 and "not a time" in done.stderr and done.stdout == ""
    done = command("--help")
    assert done.returncode == 0 and "--since" in done.stdout and "--client" in done.stdout


# ------------------------------------------------------------------------------------------------ cache breaks


def explained(rec: dict, reason: str, lost: int, cost: float | None) -> dict:
    return {**rec, "cache_break": True, "cache_break_reason": reason, "cache_break_tokens_lost": lost,
            "cache_break_cost_usd": cost}


def break_rows(doc: dict) -> list[tuple]:
    return [(r["client"], r["reason"], r["breaks"], r["tokens_lost"], r["lost_usd"], r["unpriced"])
            for r in doc["cache_breaks_by_reason"]]


def test_breaks_by_client_and_reason_with_money_lost(capsys, tmp_path):
    records = [
        record(50 * M, "claude-code", "s1", SONNET, tokens=(10, 5, 0, 9000)),
        explained(record(49 * M, "claude-code", "s1", SONNET, tokens=(10, 5, 0, 9000)), "system_changed", 9000, 0.03),
        explained(record(40 * M, "claude-code", "s1", SONNET, tokens=(10, 5, 0, 9000)), "system_changed", 9000, 0.03),
        explained(record(20 * M, "claude-code", "s1", SONNET, tokens=(10, 5, 0, 9000)), "ttl_expired", 9000, 0.03),
        explained(record(10 * M, "litellm", "s2", "my-sonnet", tokens=(10, 5, 100, 0)), "tools_changed", 800, None),
    ]
    (tmp_path / "u.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, _ = run(capsys, "--format", "json", str(tmp_path / "u.jsonl"))
    doc = json.loads(out)
    assert break_rows(doc) == [("claude-code", "system_changed", 2, 18000, 0.06, 0),
                               ("claude-code", "ttl_expired", 1, 9000, 0.03, 0),
                               ("litellm", "tools_changed", 1, 800, None, 1)]
    code, out, _ = run(capsys, str(tmp_path / "u.jsonl"))
    table = parse_table(out)["Cache breaks by client and reason"]
    assert table[0] == {"CLIENT": "claude-code", "REASON": "system_changed", "BREAKS": "2", "TOKENS LOST": "18,000",
                        "LOST $": "0.0600", "UNPRICED": "0"}
    assert table[-1] == {"CLIENT": "TOTAL", "REASON": "", "BREAKS": "4", "TOKENS LOST": "27,800", "LOST $": "0.0900",
                         "UNPRICED": "1"}


def test_breaks_recomputed_from_the_merged_records_of_two_replicas(capsys, tmp_path):
    """A session whose requests alternate between replicas: neither saw the drop, the merged log shows it."""
    s = "sess-split"
    replica_a = [
        record(60 * M, "claude-code", s, SONNET, tokens=(10, 5, 0, 9000)),
        record(58 * M, "claude-code", s, SONNET, tokens=(10, 5, 2000, 7500)),  # a drop: 9000 cached, 2000 read
        explained(record(45 * M, "claude-code", s, SONNET, tokens=(10, 5, 0, 9700)), "system_changed", 9600, 0.03),
    ]
    replica_b = [
        record(59 * M, "claude-code", s, SONNET, tokens=(10, 5, 9000, 100)),
        record(50 * M, "claude-code", s, SONNET, tokens=(10, 5, 0, 9600)),  # 8 min later: the 5m TTL ran out
        record(49 * M, "claude-code", s, SONNET, tokens=(10, 5, 9600, 0)),
        record(29 * M, "claude-code", s, SONNET, status=529, error_type="overloaded_error"),
        record(28 * M, "claude-code", s, HAIKU, tokens=(10, 5, 0, 0)),  # another model: its own cache
    ]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in replica_a))
    b.write_text("".join(json.dumps(r) + "\n" for r in replica_b))
    code, out, _ = run(capsys, "--format", "json", str(a), str(b))
    assert break_rows(json.loads(out)) == [("claude-code", "system_changed", 1, 9600, 0.03, 0)]  # as recorded
    code, out, _ = run(capsys, "--format", "json", "--recompute-breaks", str(a), str(b))
    assert break_rows(json.loads(out)) == [
        ("claude-code", "system_changed", 1, 9600, 0.03, 0),
        ("claude-code", "ttl_expired", 1, 9500, None, 1),
        ("claude-code", "unknown", 1, 7100, None, 1),  # 9100 cached by the request before (on replica b)
    ]


def test_recomputed_breaks_ignore_a_record_shipped_twice(capsys, tmp_path):
    """Log shippers deliver at least once, and rotated files overlap: a record seen twice is one request. Compared
    with itself it would read less than it had cached, a break that never happened."""
    s = "sess-dup"
    records = [
        record(60 * M, "claude-code", s, SONNET, tokens=(10, 5, 0, 9000)),
        record(59 * M, "claude-code", s, SONNET, tokens=(10, 5, 9000, 300)),
        record(58 * M, "claude-code", s, SONNET, tokens=(10, 5, 9300, 300)),
    ]
    once, again = tmp_path / "once.jsonl", tmp_path / "again.jsonl"
    once.write_text("".join(json.dumps(r) + "\n" for r in records))
    again.write_text("".join(json.dumps(r) + "\n" for r in records[1:]))  # an overlapping copy
    code, out, _ = run(capsys, "--format", "json", "--recompute-breaks", str(once), str(again), str(once))
    assert code == 0 and break_rows(json.loads(out)) == []


def test_subagents_are_told_apart_per_agent_and_are_no_break(capsys, tmp_path):
    """Claude Code's subagents share the session id and name themselves in x-claude-code-agent-id: a subagent's
    own (smaller) prompt is not a drop in its main loop's cache, and the report shows each agent."""
    s = "sess-agents"

    def agent(r: dict, agent_id: str | None, parent: str | None = None) -> dict:
        return {**r, "agent_id": agent_id, "parent_agent_id": parent}

    records = [
        agent(record(60 * M, "claude-code", s, SONNET, tokens=(10, 5, 0, 30000)), None),
        agent(record(59 * M, "claude-code", s, SONNET, tokens=(10, 5, 0, 4000)), "agent-explore", "main"),
        agent(record(58 * M, "claude-code", s, SONNET, tokens=(10, 5, 30000, 100)), None),
        agent(record(57 * M, "claude-code", s, SONNET, tokens=(10, 5, 4000, 50)), "agent-explore", "main"),
    ]
    log = tmp_path / "agents.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, _ = run(capsys, "--format", "json", "--recompute-breaks", "--by", "agent", str(log))
    doc = json.loads(out)
    assert code == 0 and break_rows(doc) == []
    agents = {(row["agent"], row["parent_agent"]): row["requests"] for row in doc["agents"]}
    assert agents == {("agent-explore", "main"): 2, (None, None): 2}  # the subagent, and the main loop
    code, out, _ = run(capsys, "--format", "csv", "--by", "agent", str(log))
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["group"], r["agent"], r["parent_agent"], r["requests"]) for r in rows] == [
        ("agent", "agent-explore", "main", "2"), ("agent", "", "", "2"), ("total", "", "", "4")]


def test_the_report_runs_on_the_standard_library_alone(tmp_path):
    """scripts/usage_report on a machine where the log was copied: no mitmproxy, no orjson, no genai-prices.
    A finder refuses every third-party import, and the report still reads the log."""
    import sys

    log = tmp_path / "usage.jsonl"
    log.write_text('{"kind": "usage", "client": "c", "session": "s", "status": 200, "complete": true, '
                   '"input_tokens": 3, "output_tokens": 1, "cost_usd": 0.5, "ts": "2026-01-01T00:00:00Z"}\n')
    addons = Path(__file__).resolve().parents[3] / "addons"
    guard = (
        "import sys, importlib.abc\n"
        "class Refuse(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        top = name.split('.')[0]\n"
        "        if top not in sys.stdlib_module_names and top != 'llm_gateway':\n"
        "            raise ImportError(f'{name} is not installed here')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        f"sys.path.insert(0, {str(addons)!r})\n"
        "from llm_gateway.tools import report\n"
        f"sys.exit(report.main(['--format', 'json', {str(log)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-I", "-c", guard], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert '"requests": 1' in done.stdout and '"errors": 0' in done.stdout
