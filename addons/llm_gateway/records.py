"""The JSONL record log shared by every part that writes records (usage, egress decisions).

One JSON object per line, written with a single `write` on a file opened for append, so lines from
concurrent writers (or processes sharing the file) never interleave and a restart appends. The path
is the `gateway_log` option, else `usage.log` from the rules in force; `-` is standard output.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable

from mitmproxy import ctx

from .rules import Rules

logger = logging.getLogger("llm_gateway.records")


def standard_output():
    """Where `-` sends records: standard output, also when `llm-gateway-dump` (launch.py) has pointed
    `sys.stdout`, which mitmproxy's own log and flow lines use, at standard error."""
    return sys.__stdout__ if sys.stdout is sys.stderr and sys.__stdout__ is not None else sys.stdout


class RecordLog:
    def __init__(self) -> None:
        self._path: str | None = None
        self._fd: int | None = None
        self.written = 0
        # Called with every record, written or not (metrics count egress decisions this way).
        self.observers: list[Callable[[dict[str, Any]], None]] = []

    def load(self, loader) -> None:
        loader.add_option(
            "gateway_log",
            str,
            "",
            "Path of the JSONL usage log (one record per API exchange); overrides usage.log in the rules; "
            "'-' for standard output.",
        )

    def done(self) -> None:
        self._close()

    def path_for(self, rules: Rules) -> str | None:
        return ctx.options.gateway_log or rules.usage.log

    def write(self, record: dict[str, Any], rules: Rules) -> None:
        for observe in self.observers:
            try:
                observe(record)
            except Exception:
                logger.exception("record observer")
        path = self.path_for(rules)
        if not path:
            return
        try:
            text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
            line = (text + "\n").encode("utf-8", "replace")  # a lone surrogate from a client's JSON
            if path == "-":
                out = standard_output()
                out.buffer.write(line)
                out.flush()
            else:
                os.write(self._open(path), line)
            self.written += 1
        except (OSError, ValueError, TypeError) as e:  # also a closed stdout, a record that is not JSON
            logger.error(f"cannot write record to {path}: {e}")
            self._close()

    def _open(self, path: str) -> int:
        if self._fd is None or path != self._path:
            self._close()
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._path = path
        return self._fd

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._path = None
