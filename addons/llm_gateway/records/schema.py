"""TODO docstring."""

from __future__ import annotations

from typing import Any

from llm_gateway.protocol.tokens import integer
from llm_gateway.util.logsafe import clean, clean_or_dash


def is_error(record: dict[str, Any]) -> bool:
    """Failed or unfinished: an error type, an error status, no response at all, or cut short."""
    status = integer(record.get("status"))
    return (
        record.get("error_type") is not None
        or status is None
        or status >= 400
        or record.get("complete") is False
    )


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
    if record.get("error_type") or record.get("reason"):
        line += f" error={shown(record.get('error_type'))} request_id={shown(record.get('request_id'))}"
        line += f' reason="{shown(record["reason"])}"' if record.get("reason") else ""
    return (
        line
        + ("" if record["complete"] else " INCOMPLETE")
        + (f" CACHE BREAK {clean(record['cache_break_reason'])}: {clean(record['cache_break_detail'], 400)}"
           if record.get("cache_break_reason") else "")
    )
