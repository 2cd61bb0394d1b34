"""The record log every part that writes records shares (usage, egress decisions): the `gateway_log` option.

The path is the `gateway_log` option, else `usage.log` from the rules in force; `-` is standard output.
Observers (the metrics count egress decisions this way) see each record at once; the file gets it from the
batching writer (records/writer.py), a flush interval later, and everything at `done` (a clean stop).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from mitmproxy import ctx

from llm_gateway.policy.rules import Rules
from llm_gateway.records.writer import RecordWriter

logger = logging.getLogger("llm_gateway.records")


class RecordLog(RecordWriter):
    def __init__(self) -> None:
        super().__init__()
        # Called with every record, written or not (metrics count egress decisions this way).
        self.observers: list[Callable[[dict[str, Any]], None]] = []
        self.before_stop: list[Callable[[], None]] = []  # called in done(), before the last records are written

    def load(self, loader) -> None:
        loader.add_option(
            "gateway_log",
            str,
            "",
            "Path of the JSONL usage log (one record per API exchange); overrides usage.log in the rules; "
            "'-' for standard output.",
        )

    def done(self) -> None:
        for flush in self.before_stop:  # records other addons hold back (egress summaries) get written too
            try:
                flush()
            except Exception:
                logger.exception("record flush before stop")
        self.stop()

    def path_for(self, rules: Rules) -> str | None:
        return ctx.options.gateway_log or rules.usage.log

    def write(self, record: dict[str, Any], rules: Rules) -> None:
        """Queue one record (a dict that nobody changes afterwards) for its file; observers see it now."""
        for observe in self.observers:
            try:
                observe(record)
            except Exception:
                logger.exception("record observer")
        path = self.path_for(rules)
        if path:
            self.queue(path, record)
