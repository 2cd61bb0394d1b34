"""Anthropic's native errors: the table of error types and HTTP statuses (Anthropic's API reference,
"Errors"), and the bodies the API sends: `{"type": "error", "error": {"type", "message"}, "request_id"}`.
"""

from __future__ import annotations

from typing import Any

from llm_gateway.protocol.jsoncodec import dumps

# Native error types and the HTTP status the API sends with each.
STATUS_BY_ERROR_TYPE: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "conflict_error": 409,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
    # Claude Code's gateway protocol ("Errors"): what a backend cannot do; not retried.
    "not_supported": 501,
}


ERROR_TYPE_BY_STATUS: dict[int, str] = {s: t for t, s in STATUS_BY_ERROR_TYPE.items()}


def status_for_error_type(error_type: str, default: int = 500) -> int:
    """The status the API sends with `error_type` (unknown types get `default`)."""
    return STATUS_BY_ERROR_TYPE.get(error_type, default)


# What the gateway answers for an error type that is not Anthropic's (a relay's or a proxy's own, e.g. a
# policy refusal): a client error, so the SDK does not retry what will be refused again.
FOREIGN_ERROR_STATUS = 400


def status_of(error_type: str) -> int:
    """The status to answer an error of this type with: the API's own, FOREIGN_ERROR_STATUS for another's."""
    return STATUS_BY_ERROR_TYPE.get(error_type, FOREIGN_ERROR_STATUS)


def should_retry(status: int) -> bool:
    """Whether a client should retry this status: the Anthropic SDKs' rule (`_should_retry`: 408, 409, 429
    and 5xx) except 501, which says the backend cannot do it (Claude Code's gateway protocol, "Errors")."""
    return status in (408, 409, 429) or (status >= 500 and status != 501)


def error_type_for_status(status: int) -> str:
    """The native error type for an HTTP status; the closest family where there is no exact one."""
    if status in ERROR_TYPE_BY_STATUS:
        return ERROR_TYPE_BY_STATUS[status]
    if status == 408:
        return "timeout_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "api_error"


def error_body(error_type: str, message: str, request_id: str | None = None,
               details: dict[str, Any] | None = None) -> dict[str, Any]:
    """A native error body: `{"type":"error","error":{"type":…,"message":…},"request_id":…}`; `details` goes
    inside `error` (a spend limit's `{"error_code": "spend_limit_reached"}`, Claude Code's gateway protocol)."""
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type, "message": message}}
    if details:
        body["error"]["details"] = details
    if request_id:
        body["request_id"] = request_id
    return body


def error_json(error_type: str, message: str, request_id: str | None = None,
               details: dict[str, Any] | None = None) -> bytes:
    """`error_body` serialised as the API does (compact JSON, UTF-8)."""
    return dumps(error_body(error_type, message, request_id, details))


def request_id_of(body: Any) -> str | None:
    """The `request_id` an error body carries (the API puts it beside `error`), or None."""
    rid = body.get("request_id") if isinstance(body, dict) else None
    return rid if isinstance(rid, str) and rid else None


def is_native_error(body: Any) -> bool:
    """True for a dict shaped like a native error body."""
    return (
        isinstance(body, dict)
        and body.get("type") == "error"
        and isinstance(body.get("error"), dict)
        and isinstance(body["error"].get("type"), str)
    )
