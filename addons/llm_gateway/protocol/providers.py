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
