"""The record log (records/writer.py, addons/recordlog.py) off the request path: while an event loop runs, records wait (briefly, boundedly) and
go out together; a clean stop (`done`) writes every one of them; without a loop they go out at once."""

from __future__ import annotations

import asyncio
import json
import logging

from mitmproxy.test import taddons

from llm_gateway.records import writer as records_mod
from llm_gateway.policy import spec
from llm_gateway.addons.recordlog import RecordLog


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_records_wait_for_the_flush_and_keep_their_order(tmp_path):
    log = tmp_path / "usage.jsonl"
    records = RecordLog()
    seen = []
    records.observers.append(seen.append)
    with taddons.context(records) as tctx:
        tctx.configure(records, gateway_log=str(log))
        for i in range(5):
            records.write({"n": i}, spec.Rules())
        assert [r["n"] for r in seen] == list(range(5))  # observers (metrics) see each record at once
        assert lines(log) == [] and records.written == 0  # nothing written on the request path
        await asyncio.sleep(records_mod.FLUSH_INTERVAL * 3)
        assert [r["n"] for r in lines(log)] == list(range(5)) and records.written == 5
        records.done()


async def test_a_clean_stop_writes_every_queued_record_and_later_ones_at_once(tmp_path):
    log = tmp_path / "usage.jsonl"
    records = RecordLog()
    with taddons.context(records) as tctx:
        tctx.configure(records, gateway_log=str(log))
        for i in range(3):
            records.write({"n": i}, spec.Rules())
        records.done()  # mitmproxy's done hook on a clean stop
        assert [r["n"] for r in lines(log)] == [0, 1, 2]
        records.write({"n": 3}, spec.Rules())  # e.g. an error hook of a flow cut off by the stop
        assert [r["n"] for r in lines(log)] == [0, 1, 2, 3]


async def test_memory_is_bounded_under_any_load(tmp_path):
    log = tmp_path / "usage.jsonl"
    records = RecordLog()
    with taddons.context(records) as tctx:
        tctx.configure(records, gateway_log=str(log))
        for i in range(records_mod.MAX_PENDING):
            records.write({"n": i}, spec.Rules())
        assert len(lines(log)) == records_mod.MAX_PENDING  # written at once when that many wait
        records.done()


async def test_deferred_log_lines_come_after_their_records_and_a_failure_is_logged(tmp_path, caplog):
    log = tmp_path / "usage.jsonl"
    records = RecordLog()
    order = []
    with taddons.context(records) as tctx:
        tctx.configure(records, gateway_log=str(log))
        records.write({"n": 1}, spec.Rules())
        records.later(lambda: order.append(len(lines(log))))
        records.later(lambda: 1 / 0)
        assert order == []
        caplog.set_level(logging.ERROR)
        await asyncio.sleep(records_mod.FLUSH_INTERVAL * 3)
        assert order == [1] and "deferred work" in caplog.text
        records.done()


async def test_records_for_two_files_go_each_to_its_own(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    records = RecordLog()
    with taddons.context(records) as tctx:
        tctx.configure(records, gateway_log="")
        a = spec.Rules(usage=spec.Usage(log=str(first)))
        b = spec.Rules(usage=spec.Usage(log=str(second)))
        for r, n in ((a, 1), (b, 2), (a, 3)):
            records.write({"n": n}, r)
        records.done()
    assert [r["n"] for r in lines(first)] == [1, 3] and [r["n"] for r in lines(second)] == [2]


async def test_usage_lines_between_two_flushes_share_one_log_record(tmp_path, caplog):
    from unit.addons.test_usage import RULES, Gateway, message, usage_of
    from llm_gateway.addons.usage import Usage

    log = tmp_path / "usage.jsonl"
    records = RecordLog()
    caplog.set_level(logging.INFO, logger="llm_gateway.usage")
    with taddons.context(records, Usage(records)) as tctx:
        tctx.configure(records, gateway_log=str(log))
        gw = Gateway(tctx, log, RULES)
        for n in (10, 20, 30):
            gw.json_exchange(message(usage_of(inp=n, out=1, read=0, write=0)))
        assert [r for r in caplog.records if r.name == "llm_gateway.usage"] == []  # not on the request path
        await asyncio.sleep(records_mod.FLUSH_INTERVAL * 3)
        [record] = [r for r in caplog.records if r.name == "llm_gateway.usage"]
        assert [line.split(" in=")[1].split()[0] for line in record.getMessage().split("\n")] == ["10", "20", "30"]
        assert len(lines(log)) == 3
        records.done()
