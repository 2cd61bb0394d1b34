"""The usage report's `--rules`: spend in the records against each quotas budget, in the period in force."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from llm_gateway.tools import report

RULES = """\
apis:
  - name: anthropic
    hosts: [api.anthropic.com]
    paths: ["/v1/messages"]
quotas:
  budgets:
    - {name: per-session, per: session, usd: {daily: 1}}
    - {name: pool, match: {client: claude-code}, usd: {monthly: 10, total: 100}}
"""


def record(session: str, client: str, cost: float, when: datetime) -> str:
    return json.dumps({"kind": "usage", "ts": when.isoformat(), "client": client, "session": session,
                       "model": "claude-x", "principal": None, "status": 200, "cost_usd": cost})


def test_spend_against_each_budget_this_period(tmp_path, capsys):
    now = datetime.now(timezone.utc)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    log = tmp_path / "usage.jsonl"
    log.write_text("\n".join([
        record("s1", "claude-code", 0.25, now),
        record("s1", "claude-code", 0.5, now),
        record("s2", "other", 0.1, now),
        record("s1", "claude-code", 7.0, now - timedelta(days=40)),  # another day and month; still in total
    ]) + "\n")
    assert report.main([str(log), "--rules", str(rules), "--format", "json"]) == 0
    rows = {(r["budget"], r["period"], r["who"]): r for r in json.loads(capsys.readouterr().out)["budgets"]}
    assert rows[("per-session", "daily", "s1")]["spent_usd"] == 0.75 and rows[("per-session", "daily", "s1")]["used"] == 0.75
    assert rows[("per-session", "daily", "s2")]["spent_usd"] == 0.1
    assert rows[("pool", "monthly", "*")]["spent_usd"] == 0.75
    assert rows[("pool", "total", "*")]["spent_usd"] == 7.75 and rows[("pool", "total", "*")]["resets"] is None
    assert report.main([str(log), "--rules", str(rules)]) == 0
    table = capsys.readouterr().out
    assert "Spend against each budget" in table and "per-session" in table and "75%" in table


def test_a_bad_rule_file_is_named(tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("daily: 1", "daily: -1"))
    log = tmp_path / "usage.jsonl"
    log.write_text("")
    assert report.main([str(log), "--rules", str(rules)]) == 2
    assert "rules.yaml:7: quotas.budgets[0].usd.daily" in capsys.readouterr().err
