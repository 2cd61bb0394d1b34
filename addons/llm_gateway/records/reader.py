"""Reading record logs: JSONL files or standard input (gzip too), lines that are not records counted,
never fatal, each record with its time. Used by scripts/usage_report and the cache-break recompute.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any, Iterable, Iterator

from llm_gateway.protocol import jsoncodec


@dataclass
class Skipped:
    other: int = 0  # records of another kind
    corrupt: int = 0  # not a JSON object, or a usage record without a readable timestamp
    first_corrupt: str | None = None  # "file:line" of the first one

    def corrupt_at(self, where: str) -> None:
        self.corrupt += 1
        self.first_corrupt = self.first_corrupt or where


def iso_time(text: str) -> datetime | None:
    """An ISO 8601 time (UTC when it has no offset), or None."""
    text = text.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def record_time(record: dict[str, Any]) -> datetime | None:
    ts = record.get("ts")
    return iso_time(ts) if isinstance(ts, str) else None


def open_input(name: str) -> IO[bytes]:
    if name == "-":
        return sys.stdin.buffer
    try:
        return open(name, "rb")
    except OSError as e:
        raise ReportError(f"cannot read {name}: {e.strerror or e}") from None


def read_records(names: Iterable[str], skipped: Skipped) -> Iterator[tuple[dict[str, Any], datetime]]:
    """Every usage record with its time, in file order; everything else is counted in `skipped`."""
    for name in names:
        f = open_input(name)
        label = "<stdin>" if name == "-" else name
        try:
            for lineno, raw in enumerate(f, 1):
                line = raw.strip()
                if not line:
                    continue
                record = jsoncodec.loads(line)
                if not isinstance(record, dict):
                    skipped.corrupt_at(f"{label}:{lineno}")
                    continue
                if record.get("kind") != "usage":
                    skipped.other += 1
                    continue
                when = record_time(record)
                if when is None:
                    skipped.corrupt_at(f"{label}:{lineno}")
                    continue
                yield record, when
        except OSError as e:
            raise ReportError(f"cannot read {label}: {e.strerror or e}") from None
        finally:
            if f is not sys.stdin.buffer:
                f.close()


class ReportError(Exception):
    """A problem with the command line or an input file; the message is shown as it is."""
