"""What a usage record means: whether the exchange failed and why, and its one line for people.

A record (pipeline/record.py writes it; docs and README list its fields) says what the client received:
`status` (None: no response at all), `error_type` (the native Anthropic error type it got, if any) and
`complete` (False: the answer was cut short). `outcome()` reads those three once, for everyone who counts:
the `llm_gateway_errors` metric, `gateway.stats`, scripts/usage_report and the cache-break recompute.
No mitmproxy: the report runs wherever the log is copied.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from llm_gateway.protocol.errors import error_type_for_status
from llm_gateway.protocol.tokens import integer
from llm_gateway.util.logsafe import clean, clean_or_dash

NO_RESPONSE = "no_response"  # the client got no response (it went away, or mitmproxy could not answer it)
INCOMPLETE = "incomplete"  # a success status whose answer was cut short (no message_stop)


class Outcome(NamedTuple):
    """`answered`: the client got a success status (2xx/3xx, no error type), so the answer's usage is real (a
    stream cut short still counts: its usage came with message_start). `error`: the exchange failed or is
    unfinished. `kind`: "ok", the native error type, `INCOMPLETE` or `NO_RESPONSE`."""

    answered: bool
    error: bool
    kind: str


def outcome(status: Any, error_type: Any, complete: Any) -> Outcome:
    """The one definition of "did this exchange fail, and how", from what the client received."""
    status = integer(status)
    if isinstance(error_type, str) and error_type:
        return Outcome(False, True, error_type)
    if status is None:
        return Outcome(False, True, NO_RESPONSE)
    if status >= 400:
        return Outcome(False, True, error_type_for_status(status))
    if complete is False:
        return Outcome(True, True, INCOMPLETE)
    return Outcome(True, False, "ok")


def record_outcome(record: dict[str, Any]) -> Outcome:
    return outcome(record.get("status"), record.get("error_type"), record.get("complete"))


def is_error(record: dict[str, Any]) -> bool:
    """Failed or unfinished: an error type, an error status, no response at all, or cut short."""
    return record_outcome(record).error


# The record's `mode` (mitmproxy's listener mode) as the docs name the two ways in.
LISTENER_NAMES = {"regular": "egress", "reverse": "base-url"}


def human_line(record: dict[str, Any]) -> str:
    """One line for people: never Python's None; an error shows its type, request id and reason."""
    shown = clean_or_dash  # escaped: model names and request ids come from requests and answers
    share = record["cache_hit_share"]
    session = clean_or_dash((record["session"] or "")[:12])
    cost = "unpriced" if record["cost_usd"] is None else f"${record['cost_usd']:.4f}"
    line = (
        f"{clean(record['client'])} session={session} {shown(record['model'])} {shown(record['status'])}"
        f" in={shown(record['input_tokens'])} out={shown(record['output_tokens'])}"
        f" cache_read={shown(record['cache_read_input_tokens'])}"
        f" cache_write={shown(record['cache_creation_input_tokens'])}"
        f" hit={'-' if share is None else f'{share:.0%}'} {cost}"
    )
    if record.get("mode") or record.get("path"):  # which way in, and which endpoint (the path has no query)
        line += f" mode={LISTENER_NAMES.get(record.get('mode'), shown(record.get('mode')))} path={shown(record.get('path'))}"
    if record.get("error_type") or record.get("reason"):
        line += f" error={shown(record.get('error_type'))} request_id={shown(record.get('request_id'))}"
        line += f' reason="{shown(record["reason"])}"' if record.get("reason") else ""
    return (
        line
        + ("" if record["complete"] else " INCOMPLETE")
        + (f" CACHE BREAK {clean(record['cache_break_reason'])}: {clean(record['cache_break_detail'], 400)}"
           if record.get("cache_break_reason") else "")
    )
