"""Usage: one record per API exchange, read from JSON bodies and from SSE streams as they pass.

`cache_read_input_tokens` is the number that matters most: an agent session without prompt caching
costs about ten times more. What the answer means (usage, status, error) is decided once by the answer
pipeline (pipeline/answer.py); this addon writes the record, the human line, and watches for cache breaks.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from mitmproxy import command, http

from llm_gateway.pipeline import exchange
from llm_gateway.pipeline.record import build_record
from llm_gateway.policy.cachewatch import CacheWatch
from llm_gateway.protocol import tokens
from llm_gateway.records.schema import human_line, outcome
from llm_gateway.records.totals import Totals
from llm_gateway.util.logsafe import clean

if TYPE_CHECKING:
    from llm_gateway.addons.recordlog import RecordLog

logger = logging.getLogger("llm_gateway.usage")

MAX_CLIENTS = 256  # client names come from requests (x-gateway-client): past this many, totals go to "other"


class Usage:
    def __init__(self, records: RecordLog) -> None:
        self.records = records
        self.cache = CacheWatch()
        self.totals: dict[str, Totals] = defaultdict(Totals)  # client -> running totals (gateway.stats)
        self._unlogged: list[dict[str, Any]] = []  # records whose human line is still to be logged

    def response(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None:
            return
        if outcome(ex.status, ex.error_type, ex.complete).answered:  # as the report's --recompute-breaks reads it
            ex.explain_break(self.cache)
            if ex.cache_break:
                self.warn_cache_break(ex)
        self.finish(flow, ex)

    def error(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or ex.recorded:
            return
        self.finish(flow, ex)

    def finish(self, flow: http.HTTPFlow, ex: exchange.Exchange) -> None:
        if ex.recorded:
            return
        ex.recorded = True
        record = build_record(flow, ex, time.time())
        self.records.write(record, ex.rules)
        self.count(record)
        self._unlogged.append(record)  # its human line: formatted and logged off the request path
        if len(self._unlogged) == 1:
            self.records.later(self.log_lines)
        exchange.publish(flow, ex)
        # The parsed request and answer are done with (the record holds what was read from them). mitmproxy's
        # flows are freed by the garbage collector, not by reference counts: released here, the few hundred
        # objects of an agent's parsed request go at once instead of riding along through its collections.
        ex.release()

    def log_lines(self) -> None:
        """One log record for the lines of every exchange since the last flush: mitmproxy hands each log
        record to every addon (its deprecated `add_log` event) and wakes its event loop for it, which cost
        more than the line itself when each exchange had a record of its own."""
        done, self._unlogged = self._unlogged, []
        if done:
            logger.info("\n".join(human_line(record) for record in done))

    def warn_cache_break(self, ex: exchange.Exchange) -> None:
        full_price = tokens.full_price_prompt_tokens(ex.usage)
        request_id = ex.request_id or "-"
        logger.warning(
            f"cache break: session {clean(ex.session)} ({clean(ex.client)}) request {clean(request_id)} "
            f"{clean(ex.break_text(), 400)}; {full_price} prompt tokens paid at full price "
            f"(break #{self.cache.sessions[ex.session].breaks} in this session)"
        )

    def count(self, record: dict[str, Any]) -> None:
        client = record["client"]
        if client not in self.totals and len(self.totals) >= MAX_CLIENTS:
            client = "other"
        self.totals[client].add(record)

    @command.command("gateway.stats")
    def stats(self) -> str:
        """Running totals per client since the gateway started: requests, tokens, cache share, cost."""
        lines = []
        for client, totals in sorted(self.totals.items()):
            t = totals.row()
            share = t["cache_hit_share"]
            money = (f"cost ${t['cost_usd']:.4f}, saved ${t['saved_usd'] or 0:.4f}" if t["cost_usd"] is not None
                     else "cost -, saved -")
            if t["unpriced"]:
                money += f" ({t['unpriced']} requests of unknown price not included)"
            lines.append(
                f"{client}: {t['requests']} requests, in {t['input_tokens']}, out {t['output_tokens']}, "
                f"cache read {t['cache_read_input_tokens']}, cache write {t['cache_creation_input_tokens']}, "
                f"hit {'-' if share is None else f'{share:.0%}'}, {money}, "
                f"cache breaks {t['cache_breaks']}, errors {t['errors']}"
            )
        summary = "\n".join(lines) or "no API exchanges yet"
        logger.info(summary)
        return summary
