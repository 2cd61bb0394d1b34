"""The batching JSONL writer behind the record log (addons/recordlog.py): no mitmproxy, no rules.

One JSON object per line, appended with whole lines per write on a file opened for append, so lines
from concurrent writers (or processes sharing the file) never interleave and a restart appends. `-` is
standard output.

Off the request path: while an asyncio event loop runs, `queue` only holds the record; the records are
turned into JSON and written together `FLUSH_INTERVAL` seconds later, or as soon as `MAX_PENDING` wait,
and at `stop` (a clean stop), so none is lost on a clean stop. Work queued with `later` (the usage log
line) runs at the same flush, after the records. Without a running loop (tools, unit tests) everything is
written at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any, Callable

from llm_gateway.protocol.jsoncodec import encode_line

logger = logging.getLogger("llm_gateway.records")

FLUSH_INTERVAL = 0.1  # seconds a record may wait in memory before it is written
MAX_PENDING = 1000  # records; more than this are written at once (memory stays bounded under any load)


def standard_output():
    """Where `-` sends records: standard output, also when `llm-gateway-dump` (tools/launch.py) has pointed
    `sys.stdout`, which mitmproxy's own log and flow lines use, at standard error."""
    return sys.__stdout__ if sys.stdout is sys.stderr and sys.__stdout__ is not None else sys.stdout


class RecordWriter:
    """Records queued per file, written in batches; `written` counts the lines written (records)."""

    def __init__(self) -> None:
        self._path: str | None = None
        self._fd: int | None = None
        self.written = 0
        self._pending: list[tuple[str, dict[str, Any]]] = []  # (path, record), in the order written
        self._later: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False

    def running(self) -> None:
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True  # what comes after the last flush is written at once
        self.flush()
        self._close()

    def queue(self, path: str, record: dict[str, Any]) -> None:
        """Queue one record (a dict that nobody changes afterwards) for the file at `path`."""
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
        lines = []
        for record in records:
            try:
                lines.append(encode_line(record))
            except (ValueError, TypeError) as e:  # lose this record, not the others
                logger.error(f"cannot write record to {path}: {e}")
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
