"""records/schema.outcome(): one definition of a failed exchange, so the `llm_gateway_errors` metric,
`gateway.stats` and scripts/usage_report count the same errors on the same exchanges."""

from __future__ import annotations

import json
import re

import pytest
from mitmproxy.test import taddons, tutils

import gwtest
from llm_gateway.addons.metrics import Metrics
from llm_gateway.addons.recordlog import RecordLog
from llm_gateway.addons.usage import Usage
from llm_gateway.pipeline import exchange
from llm_gateway.records import totals
from llm_gateway.records.schema import INCOMPLETE, NO_RESPONSE, Outcome, outcome
from llm_gateway.tools import report

USAGE = {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 0}

# (status the client got, error_type, complete) -> what it is
CASES = [
    ((200, None, True), Outcome(True, False, "ok")),
    ((200, None, False), Outcome(True, True, INCOMPLETE)),  # a stream cut short
    ((None, None, False), Outcome(False, True, NO_RESPONSE)),  # the client went away
    ((429, "rate_limit_error", False), Outcome(False, True, "rate_limit_error")),
    ((502, None, False), Outcome(False, True, "api_error")),  # an error status left as it came
    ((200, "overloaded_error", False), Outcome(False, True, "overloaded_error")),  # an error event mid-stream
    ((529, "overloaded_error", True), Outcome(False, True, "overloaded_error")),
]


@pytest.mark.parametrize("given, expected", CASES)
def test_outcome(given, expected):
    assert outcome(*given) == expected


def test_outcome_reads_what_a_copied_log_may_hold():
    assert outcome("503", None, True) == Outcome(False, True, NO_RESPONSE)  # not a number: no status known
    assert outcome(True, None, True).kind == NO_RESPONSE  # a boolean is no status
    assert outcome(200, "", True) == Outcome(True, False, "ok")


def _exchange(status, error_type, complete, client):
    flow = gwtest.api_flow(mode="reverse")
    ex = exchange.start(flow, exchange.Exchange(rules=gwtest.rule_file().rules, api="anthropic", mode="reverse",
                                                method="POST", host="api.anthropic.com", path="/v1/messages"))
    ex.client, ex.model_answered, ex.session, ex.usage = client, "claude-sonnet-4-5", "sess-1", dict(USAGE)
    ex.status, ex.error_type, ex.complete = status, error_type, complete
    flow.response = tutils.tresp(status_code=status) if status is not None else None
    return flow


def test_metric_stats_and_report_count_the_same_errors(tmp_path, capsys):
    log = tmp_path / "usage.jsonl"
    records = RecordLog()
    usage, metrics = Usage(records), Metrics(records)
    with taddons.context(records, usage, metrics) as tctx:
        tctx.configure(records, gateway_log=str(log))
        for i, ((status, error_type, complete), _) in enumerate(CASES * 2):
            flow = _exchange(status, error_type, complete, client=f"client-{i % 2}")
            if status is None:
                usage.error(flow)
                metrics.error(flow)
            else:
                usage.response(flow)
                metrics.response(flow)
        records.flush()
        stats = usage.stats()
    expected = 2 * sum(e.error for _, e in CASES)
    written = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(written) == 2 * len(CASES)

    from_metric = sum(
        s.value for family in metrics.registry.collect() if family.name == "llm_gateway_errors"
        for s in family.samples if s.name == "llm_gateway_errors_total"
    )
    from_stats = sum(int(n) for n in re.findall(r"errors (\d+)", stats))
    assert report.main(["--format", "json", str(log)]) == 0
    shown = json.loads(capsys.readouterr().out)
    from_report = shown["total"]["errors"]
    t = totals.Totals()
    for record in written:
        t.add(record)
    assert from_metric == from_stats == from_report == t.errors == expected
    # the cache-break recompute reads the same fact: only answered exchanges are compared
    answered = [r for r in written if outcome(r["status"], r["error_type"], r["complete"]).answered]
    assert len(answered) == 2 * sum(e.answered for _, e in CASES)


def test_totals_sum_costs_exactly_in_constant_memory():
    t = totals.Totals()
    for _ in range(10_000):
        t.add({"status": 200, "complete": True, "cost_usd": 0.1, "input_tokens": 1})
    assert t.row()["cost_usd"] == 1000.0 and len(t.cost) <= 2
