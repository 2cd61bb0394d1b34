"""The JSONL record log shared by every part that writes records (usage, egress decisions).

One JSON object per line, appended with whole lines per `write` on a file opened for append, so lines
from concurrent writers (or processes sharing the file) never interleave and a restart appends. The
path is the `gateway_log` option, else `usage.log` from the rules in force; `-` is standard output.

Off the request path: while mitmproxy's event loop runs, `write` only queues the record (observers
still see it at once); the records are turned into JSON and written together `FLUSH_INTERVAL` seconds
later, or as soon as `MAX_PENDING` wait, and at `done` (a clean stop), so none is lost on a clean stop.
Work queued with `later` (the usage log line) runs at the same flush, after the records. Without a
running loop (tools, unit tests) everything is written at once, as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any, Callable

import orjson
from mitmproxy import ctx

from .rules import Rules

logger = logging.getLogger("llm_gateway.records")

FLUSH_INTERVAL = 0.1  # seconds a record may wait in memory before it is written
MAX_PENDING = 1000  # records; more than this are written at once (memory stays bounded under any load)


def standard_output():
    """Where `-` sends records: standard output, also when `llm-gateway-dump` (launch.py) has pointed
    `sys.stdout`, which mitmproxy's own log and flow lines use, at standard error."""
    return sys.__stdout__ if sys.stdout is sys.stderr and sys.__stdout__ is not None else sys.stdout


def encode(record: dict[str, Any], path: str = "") -> bytes | None:
    """One JSON line (UTF-8, compact, unknown types as their str()), or None for a record that is not JSON
    (logged: lose it, not the others). orjson writes it (about ten times faster than json; NaN and infinities
    as null, where json would write invalid JSON); what orjson refuses (a lone surrogate from a client's JSON,
    an integer past 64 bits) goes to json, a lone surrogate replaced."""
    try:
        return orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        pass
    try:
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
    except (ValueError, TypeError) as e:
        logger.error(f"cannot write record to {path}: {e}")
        return None
    return (text + "\n").encode("utf-8", "replace")


class RecordLog:
    def __init__(self) -> None:
        self._path: str | None = None
        self._fd: int | None = None
        self.written = 0
        # Called with every record, written or not (metrics count egress decisions this way).
        self.observers: list[Callable[[dict[str, Any]], None]] = []
        self._pending: list[tuple[str, dict[str, Any]]] = []  # (path, record), in the order written
        self._later: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False

    def load(self, loader) -> None:
        loader.add_option(
            "gateway_log",
            str,
            "",
            "Path of the JSONL usage log (one record per API exchange); overrides usage.log in the rules; "
            "'-' for standard output.",
        )

    def running(self) -> None:
        self._stopped = False

    def done(self) -> None:
        self._stopped = True  # what comes after the last flush is written at once
        self.flush()
        self._close()

    def path_for(self, rules: Rules) -> str | None:
        return ctx.options.gateway_log or rules.usage.log

    def write(self, record: dict[str, Any], rules: Rules) -> None:
        """Queue one record (a dict that nobody changes afterwards) for its file; see the module docstring."""
        for observe in self.observers:
            try:
                observe(record)
            except Exception:
                logger.exception("record observer")
        path = self.path_for(rules)
        if path:
            self._pending.append((path, record))
            self._schedule()

    def later(self, work: Callable[[], None]) -> None:
        """Run `work` (e.g. a log line) at the next flush, after the records queued before it."""
        self._later.append(work)
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None and len(self._pending) < MAX_PENDING:
            return
        if not self._stopped and len(self._pending) < MAX_PENDING:
            try:
                self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)
                return
            except RuntimeError:  # no running event loop: nothing would ever flush later
                pass
        self.flush()

    def flush(self) -> None:
        """Write what is queued: one write per file per flush, then the queued work. Never raises."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        start = 0
        for i in range(1, len(pending) + 1):  # consecutive records for the same file go in one write
            if i == len(pending) or pending[i][0] != pending[start][0]:
                self._write(pending[start][0], [record for _, record in pending[start:i]])
                start = i
        later, self._later = self._later, []
        for work in later:
            try:
                work()
            except Exception:
                logger.exception("record log: deferred work")

    def _write(self, path: str, records: list[dict[str, Any]]) -> None:
        lines = [line for record in records if (line := encode(record, path)) is not None]
        data = b"".join(lines)
        if not data:
            return
        try:
            if path == "-":
                out = standard_output()
                out.buffer.write(data)
                out.flush()
            else:
                fd = self._open(path)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            self.written += len(lines)
        except (OSError, ValueError) as e:  # also a closed stdout
            logger.error(f"cannot write record to {path} ({len(lines)} lost): {e}")
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
