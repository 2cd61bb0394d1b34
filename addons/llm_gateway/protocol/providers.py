"""Claude on the clouds' wire formats: Amazon Bedrock's InvokeModel paths and AWS event-stream payloads,
Google Vertex AI's rawPredict paths (no I/O, no mitmproxy).

Sources: Bedrock's API reference (InvokeModel, InvokeModelWithResponseStream: each `chunk` event holds
`{"bytes": "<base64 of one Anthropic stream event>"}`, the last one also `amazon-bedrock-invocationMetrics`),
the Anthropic SDK's `lib/bedrock` and `lib/vertex` clients (the paths they build), and Vertex AI's "Use Claude
models" pages (`…/publishers/anthropic/models/<model>:rawPredict` and `:streamRawPredict`, SSE as the API's).

The provider names are OpenTelemetry's `gen_ai.provider.name` values: anthropic, aws.bedrock, gcp.vertex_ai.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any
from urllib.parse import unquote

from llm_gateway.protocol import jsoncodec

ANTHROPIC, BEDROCK, VERTEX = "anthropic", "aws.bedrock", "gcp.vertex_ai"
PROVIDERS = (ANTHROPIC, BEDROCK, VERTEX)
# What a rule file may write for each (the short names the issue and the peers use, and the full ones).
PROVIDER_NAMES = {"anthropic": ANTHROPIC, "bedrock": BEDROCK, "aws.bedrock": BEDROCK,
                  "vertex": VERTEX, "gcp.vertex_ai": VERTEX}

# `POST /model/{modelId}/invoke` and `/invoke-with-response-stream`; the id may be URL-encoded (an ARN's `:`/`/`).
_BEDROCK_PATH = re.compile(r"^/model/([^/?]+)/(invoke|invoke-with-response-stream|count-tokens)(?:\?|$)")
# `[/v1]/projects/{p}/locations/{l}/publishers/anthropic/models/{model}:rawPredict|:streamRawPredict|…`
_VERTEX_PATH = re.compile(r"/publishers/anthropic/models/([^/:?]+):(\w+)(?:\?|$)")

EVENTSTREAM_TYPE = "application/vnd.amazon.eventstream"
METRICS_KEY = "amazon-bedrock-invocationMetrics"


def request_facts(provider: str, path: str) -> tuple[str | None, bool | None]:
    """(model id from the path, whether the answer streams) of a cloud request; (None, None) when the path is
    not one of the Messages paths (Anthropic's own requests name both in the body)."""
    if provider == BEDROCK:
        m = _BEDROCK_PATH.match(path)
        if m:
            action = m.group(2)
            return unquote(m.group(1)), (None if action == "count-tokens" else action == "invoke-with-response-stream")
    elif provider == VERTEX:
        m = _VERTEX_PATH.search(path)
        if m:
            action = m.group(2)
            stream = {"rawPredict": False, "streamRawPredict": True}.get(action)
            return unquote(m.group(1)), stream
    return None, None


def chunk_event(payload: bytes) -> dict[str, Any] | None:
    """The Anthropic stream event inside one Bedrock `chunk` event payload (`{"bytes": base64}`), with the
    invocation metrics Bedrock adds to the last one left in; None when the payload is not that shape."""
    outer = jsoncodec.parse_json_body(payload)
    data = outer.get("bytes") if isinstance(outer, dict) else None
    if not isinstance(data, str):
        return None
    try:
        inner = jsoncodec.parse_json_body(base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError):
        return None
    return inner if isinstance(inner, dict) else None


def metrics_usage(metrics: Any) -> dict[str, int]:
    """Anthropic usage fields from Bedrock's `amazon-bedrock-invocationMetrics` (token counts only)."""
    if not isinstance(metrics, dict):
        return {}
    names = {"inputTokenCount": "input_tokens", "outputTokenCount": "output_tokens",
             "cacheReadInputTokenCount": "cache_read_input_tokens",
             "cacheWriteInputTokenCount": "cache_creation_input_tokens"}
    return {ours: metrics[theirs] for theirs, ours in names.items()
            if isinstance(metrics.get(theirs), int) and not isinstance(metrics.get(theirs), bool)}


# AWS exception names (Bedrock Runtime API reference, "Errors") -> Anthropic error types.
BEDROCK_ERRORS = {
    "ThrottlingException": "rate_limit_error",
    "ServiceQuotaExceededException": "rate_limit_error",
    "ServiceUnavailableException": "overloaded_error",
    "ModelNotReadyException": "overloaded_error",
    "ValidationException": "invalid_request_error",
    "AccessDeniedException": "permission_error",
    "UnrecognizedClientException": "authentication_error",
    "ExpiredTokenException": "authentication_error",
    "ResourceNotFoundException": "not_found_error",
    "ModelTimeoutException": "timeout_error",
    "InternalServerException": "api_error",
    "ModelStreamErrorException": "api_error",
    "ModelErrorException": "api_error",
}


def bedrock_error_type(exception: str | None) -> str:
    """The Anthropic error type for an AWS exception name (`ThrottlingException`, also in the
    `x-amzn-ErrorType` form `ThrottlingException:http://…` and the stream's `throttlingException`); api_error for
    one not known."""
    name = (exception or "").split(":", 1)[0].strip()
    return BEDROCK_ERRORS.get(name[:1].upper() + name[1:], "api_error")  # in-stream names are lowerCamel


# --- translation: an Anthropic Messages request served by Bedrock ------------------------------------------------

BEDROCK_VERSION = "bedrock-2023-05-31"  # the body's anthropic_version Bedrock requires (Bedrock's Claude docs)
# Body fields Bedrock refuses ("Extra inputs are not permitted"), each with the betas that enable it: dropped together,
# never one without the other (claude-code-gateway-protocol.md: request tags label usage only).
REFUSED = {"tags": ("request-tags-",)}
# Undated Anthropic aliases -> the dated id Bedrock knows (Anthropic's models overview, "Model names").
DATED = {
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929", "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-opus-4-5": "claude-opus-4-5-20251101", "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514", "claude-sonnet-4": "claude-sonnet-4-20250514",
    "claude-opus-4-0": "claude-opus-4-20250514", "claude-opus-4": "claude-opus-4-20250514",
    "claude-3-7-sonnet-latest": "claude-3-7-sonnet-20250219", "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022",
}
# Region -> the geography prefix of Bedrock's cross-region inference profiles (us., eu., apac.).
_GEOGRAPHY = (("us-gov-", "us-gov."), ("us-", "us."), ("ca-", "us."), ("eu-", "eu."), ("ap-", "apac."))


def bedrock_model_id(model: str, region: str | None) -> str:
    """Bedrock's id for an Anthropic-style model id: a dated id becomes the inference profile of the region's
    geography, `us.anthropic.claude-sonnet-4-5-20250929-v1:0`; an id already in Bedrock's form (an `anthropic.`
    id, a profile, an ARN) is kept. The rule file's `models` map comes first (addons/translate.py)."""
    if "anthropic." in model or model.startswith("arn:"):
        return model
    dated = DATED.get(model, model)
    geography = next((prefix for start, prefix in _GEOGRAPHY if (region or "").startswith(start)), "")
    return f"{geography}anthropic.{dated}-v1:0"


def bedrock_body(body: dict[str, Any], betas: list[str]) -> tuple[dict[str, Any], bool, list[str]]:
    """(the InvokeModel body, whether it streams, what was dropped) for an Anthropic Messages body and the request's
    `anthropic-beta` values: `model` and `stream` leave the body (the path says them), `anthropic_version` comes in,
    the betas move into `anthropic_beta`, and each refused field goes with its betas."""
    out = {k: v for k, v in body.items() if k not in ("model", "stream")}
    stream = body.get("stream") is True
    out["anthropic_version"] = BEDROCK_VERSION
    betas, dropped = drop_refused(out, betas)
    if betas:
        out["anthropic_beta"] = betas
    return out, stream, dropped


def bedrock_count_request(body: dict[str, Any], betas: list[str]) -> dict[str, Any]:
    """Bedrock CountTokens' body for a count_tokens body: the InvokeModel body it would be, base64 in
    `input.invokeModel.body`; with the `max_tokens` InvokeModel requires (above any thinking budget) and without an
    empty `tools` list (claude-code-gateway-protocol.md, "count_tokens")."""
    invoke, _, _ = bedrock_body(body, betas)
    thinking = invoke.get("thinking")
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    invoke["max_tokens"] = budget + 1 if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0 else 1
    if invoke.get("tools") == []:
        del invoke["tools"]
    return {"input": {"invokeModel": {"body": base64.b64encode(jsoncodec.dumps(invoke)).decode()}}}


def foundation_model_id(model: str) -> str:
    """The foundation model id of a Bedrock inference profile (`us.anthropic.x-v1:0` -> `anthropic.x-v1:0`): what
    CountTokens takes."""
    return re.sub(r"^(?:[a-z]{2,4}|global|us-gov)\.(?=anthropic\.)", "", model)


def chunk_sse(payload: bytes) -> bytes | None:
    """The SSE event a Bedrock `chunk` payload stands for: `event: <type>`, then the event's own JSON bytes as
    Bedrock carried them (re-encoded only to leave out the invocation metrics of the last one)."""
    outer = jsoncodec.parse_json_body(payload)
    data = outer.get("bytes") if isinstance(outer, dict) else None
    if not isinstance(data, str):
        return None
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    event = jsoncodec.parse_json_body(raw)
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return None
    if METRICS_KEY in event:
        del event[METRICS_KEY]
        raw = jsoncodec.dumps(event)
    return b"event: " + event["type"].encode() + b"\ndata: " + raw + b"\n\n"


# --- translation: an Anthropic Messages request served by Vertex AI -----------------------------------------------

VERTEX_VERSION = "vertex-2023-10-16"  # the body's anthropic_version Vertex requires (Vertex AI's Claude docs)
_DATE = re.compile(r"^(claude-.+)-(\d{8})$")


def vertex_model_id(model: str) -> str:
    """Vertex's id for an Anthropic-style model id: `claude-sonnet-4-5-20250929` (or its alias) becomes
    `claude-sonnet-4-5@20250929`; an id with `@` is kept."""
    if "@" in model:
        return model
    m = _DATE.match(DATED.get(model, model))
    return f"{m.group(1)}@{m.group(2)}" if m else model


def drop_refused(out: dict[str, Any], betas: list[str]) -> tuple[list[str], list[str]]:
    """Remove from `out` (in place) the body fields the clouds refuse, each together with its betas, never one
    without the other (REFUSED): (the betas kept, the fields and betas dropped)."""
    dropped: list[str] = []
    for field_name, beta_prefixes in REFUSED.items():
        if field_name in out:
            del out[field_name]
            dropped.append(field_name)
        kept = [b for b in betas if not b.startswith(beta_prefixes)]
        dropped += [b for b in betas if b not in kept]
        betas = kept
    return betas, dropped


def vertex_body(body: dict[str, Any], betas: list[str]) -> tuple[dict[str, Any], bool, list[str], list[str]]:
    """(the rawPredict body, whether it streams, the betas kept, what was dropped): `model` leaves the body (the path
    names it), `anthropic_version` comes in, `stream` stays; the betas stay in the header (Vertex takes them there);
    refused fields go with their betas."""
    out = {k: v for k, v in body.items() if k != "model"}
    out["anthropic_version"] = VERTEX_VERSION
    betas, dropped = drop_refused(out, betas)
    return out, body.get("stream") is True, betas, dropped


# Google's canonical error codes (google.rpc.Code, as Vertex's `error.status`) -> Anthropic error types.
GOOGLE_ERRORS = {
    "RESOURCE_EXHAUSTED": "rate_limit_error", "UNAVAILABLE": "overloaded_error", "INVALID_ARGUMENT": "invalid_request_error",
    "FAILED_PRECONDITION": "invalid_request_error", "OUT_OF_RANGE": "invalid_request_error",
    "PERMISSION_DENIED": "permission_error", "UNAUTHENTICATED": "authentication_error", "NOT_FOUND": "not_found_error",
    "DEADLINE_EXCEEDED": "timeout_error", "ABORTED": "conflict_error", "ALREADY_EXISTS": "conflict_error",
    "INTERNAL": "api_error", "UNKNOWN": "api_error",
}


# Cloud errors carry account ids, ARNs, project ids: the client gets the message without them (the log keeps it).
_ARN = re.compile(r"arn:aws[\w-]*:[^\s\"',]+")
_ACCOUNT = re.compile(r"\b\d{12}\b")
_PROJECT = re.compile(r"(projects/)[^/\s\"',]+")
# Messages Claude Code's recovery matches: passed on exactly (claude-code-gateway-protocol.md, "Errors").
_VERBATIM = re.compile(r"^(?:Input is too long\.|prompt is too long.*|The request size \(.*\) exceeds .*)$", re.S)


def client_message(message: str) -> str:
    """A cloud's error message as the client may see it: verbatim when Claude Code's recovery keys on it, else with
    ARNs, 12-digit account ids and Google project ids replaced by `[redacted]`."""
    if _VERBATIM.match(message):
        return message
    return _PROJECT.sub(r"\1[redacted]", _ACCOUNT.sub("[redacted]", _ARN.sub("[redacted]", message)))
