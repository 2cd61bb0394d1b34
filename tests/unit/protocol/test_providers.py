"""protocol/providers.py: the clouds' paths, Bedrock's chunk payloads, invocation metrics and exception names."""

from __future__ import annotations

import base64
import json

import pytest
from botocore.eventstream import EventStreamBuffer

from fakes.clouds import chunk_frame, exception_frame, frame
from llm_gateway.protocol import providers


@pytest.mark.parametrize("provider,path,expected", [
    (providers.BEDROCK, "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke",
     ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", False)),
    (providers.BEDROCK, "/model/global.anthropic.claude-haiku-4-5-20251001-v1%3A0/invoke-with-response-stream",
     ("global.anthropic.claude-haiku-4-5-20251001-v1:0", True)),
    (providers.BEDROCK, "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.x/invoke",
     ("arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.x", False)),
    (providers.BEDROCK, "/model/x/count-tokens", ("x", None)),
    (providers.VERTEX, "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict",
     ("claude-sonnet-4-5@20250929", False)),
    (providers.VERTEX, "/projects/p/locations/global/publishers/anthropic/models/claude-opus-4-1@20250805:streamRawPredict",
     ("claude-opus-4-1@20250805", True)),
    (providers.VERTEX, "/v1/projects/p/locations/x/publishers/anthropic/models/count-tokens:rawPredict", ("count-tokens", False)),
    (providers.BEDROCK, "/v1/messages", (None, None)),
    (providers.ANTHROPIC, "/model/x/invoke", (None, None)),
])
def test_request_facts(provider, path, expected):
    assert providers.request_facts(provider, path) == expected


def test_the_fakes_frames_decode_with_botocore_and_carry_one_anthropic_event():
    event = {"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 5, "outputTokenCount": 2}}
    buf = EventStreamBuffer()
    raw = chunk_frame(event) + exception_frame("throttlingException", "slow down")
    for i in range(0, len(raw), 7):  # odd boundaries, as TCP gives them
        buf.add_data(raw[i:i + 7])
    first, second = list(buf)
    assert first.headers[":event-type"] == "chunk"
    assert providers.chunk_event(first.payload) == event
    assert second.headers[":message-type"] == "exception" and second.headers[":exception-type"] == "throttlingException"


def test_a_frame_with_a_bad_crc_is_refused_by_the_decoder():
    from botocore.eventstream import ChecksumMismatch

    raw = bytearray(frame({":message-type": "event"}, b"{}"))
    raw[-1] ^= 1
    buf = EventStreamBuffer()
    buf.add_data(bytes(raw))
    with pytest.raises(ChecksumMismatch):
        list(buf)


@pytest.mark.parametrize("payload", [b"", b"[]", b'{"bytes": 3}', b'{"bytes": "!!"}',
                                     json.dumps({"bytes": base64.b64encode(b"[1]").decode()}).encode()])
def test_chunk_payloads_not_of_the_shape_give_none(payload):
    assert providers.chunk_event(payload) is None


def test_metrics_usage():
    assert providers.metrics_usage({"inputTokenCount": 10, "outputTokenCount": 3, "cacheReadInputTokenCount": 100,
                                    "cacheWriteInputTokenCount": 7, "invocationLatency": 50, "firstByteLatency": True}) == {
        "input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 7}
    assert providers.metrics_usage(None) == {} and providers.metrics_usage({"inputTokenCount": True}) == {}


@pytest.mark.parametrize("name,expected", [
    ("ThrottlingException", "rate_limit_error"),
    ("throttlingException", "rate_limit_error"),
    ("ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/", "rate_limit_error"),
    ("serviceUnavailableException", "overloaded_error"),
    ("ValidationException", "invalid_request_error"),
    ("modelTimeoutException", "timeout_error"),
    ("SomethingNew", "api_error"),
    (None, "api_error"),
])
def test_bedrock_error_type(name, expected):
    assert providers.bedrock_error_type(name) == expected


@pytest.mark.parametrize("model,region,expected", [
    ("claude-sonnet-4-5", "us-east-1", "us.anthropic.claude-sonnet-4-5-20250929-v1:0"),
    ("claude-haiku-4-5-20251001", "eu-central-1", "eu.anthropic.claude-haiku-4-5-20251001-v1:0"),
    ("claude-sonnet-4-5-20250929", "ap-northeast-1", "apac.anthropic.claude-sonnet-4-5-20250929-v1:0"),
    ("claude-3-5-haiku-20241022", None, "anthropic.claude-3-5-haiku-20241022-v1:0"),
    ("global.anthropic.claude-sonnet-4-5-20250929-v1:0", "us-east-1", "global.anthropic.claude-sonnet-4-5-20250929-v1:0"),
    ("arn:aws:bedrock:us-east-1:111122223333:application-inference-profile/x", "us-east-1",
     "arn:aws:bedrock:us-east-1:111122223333:application-inference-profile/x"),
])
def test_bedrock_model_id(model, region, expected):
    assert providers.bedrock_model_id(model, region) == expected


def test_bedrock_body_moves_betas_and_drops_refused_fields_with_their_betas():
    body = {"model": "m", "stream": True, "max_tokens": 5, "messages": [], "tags": {"a": "b"}}
    out, stream, dropped = providers.bedrock_body(body, ["interleaved-thinking-2025-05-14", "request-tags-2026-08-21"])
    assert stream is True and dropped == ["tags", "request-tags-2026-08-21"]
    assert out == {"max_tokens": 5, "messages": [], "anthropic_version": "bedrock-2023-05-31",
                   "anthropic_beta": ["interleaved-thinking-2025-05-14"]}
    assert body["model"] == "m"  # the caller's body is left as it was
    # a beta alone (no field) goes too; no betas left: no anthropic_beta key
    out, stream, dropped = providers.bedrock_body({"model": "m", "messages": []}, ["request-tags-2026-08-21"])
    assert stream is False and dropped == ["request-tags-2026-08-21"] and "anthropic_beta" not in out


def test_chunk_sse_keeps_the_event_bytes_and_drops_the_metrics():
    raw = b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"h\\u00e9"}}'
    payload = json.dumps({"bytes": base64.b64encode(raw).decode(), "p": "abc"}).encode()
    assert providers.chunk_sse(payload) == b"event: content_block_delta\ndata: " + raw + b"\n\n"
    last = {"type": "message_stop", providers.METRICS_KEY: {"inputTokenCount": 1}}
    payload = json.dumps({"bytes": base64.b64encode(json.dumps(last).encode()).decode()}).encode()
    assert providers.chunk_sse(payload) == b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    assert providers.chunk_sse(b'{"bytes": "e30="}') is None  # {} has no type


@pytest.mark.parametrize("message,shown", [
    ("Input is too long.", "Input is too long."),
    ("prompt is too long: 210000 tokens > 200000 maximum", "prompt is too long: 210000 tokens > 200000 maximum"),
    ("User: arn:aws:sts::111122223333:assumed-role/x/y is not authorized to perform: bedrock:InvokeModel",
     "User: [redacted] is not authorized to perform: bedrock:InvokeModel"),
    ("account 111122223333 has no access", "account [redacted] has no access"),
])
def test_client_message(message, shown):
    assert providers.client_message(message) == shown


def test_vertex_model_id_and_body():
    assert providers.vertex_model_id("claude-sonnet-4-5") == "claude-sonnet-4-5@20250929"
    assert providers.vertex_model_id("claude-3-5-haiku-20241022") == "claude-3-5-haiku@20241022"
    assert providers.vertex_model_id("claude-opus-4-1@20250805") == "claude-opus-4-1@20250805"
    assert providers.vertex_model_id("my-model") == "my-model"
    out, stream, kept, dropped = providers.vertex_body(
        {"model": "m", "stream": True, "messages": [], "tags": {}}, ["a-beta", "request-tags-2026-08-21"])
    assert out == {"stream": True, "messages": [], "anthropic_version": "vertex-2023-10-16"}
    assert (stream, kept, dropped) == (True, ["a-beta"], ["tags", "request-tags-2026-08-21"])


def test_project_ids_leave_google_messages():
    assert providers.client_message("Permission denied on projects/acme-prod-123/locations/us-east5") == \
        "Permission denied on projects/[redacted]/locations/us-east5"


def test_bedrock_count_request():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [],
            "thinking": {"type": "enabled", "budget_tokens": 2048}}
    out = providers.bedrock_count_request(body, ["request-tags-2026-08-21", "b"])
    invoke = json.loads(base64.b64decode(out["input"]["invokeModel"]["body"]))
    assert invoke == {"messages": body["messages"], "thinking": body["thinking"], "max_tokens": 2049,
                      "anthropic_version": "bedrock-2023-05-31", "anthropic_beta": ["b"]}
    plain = json.loads(base64.b64decode(providers.bedrock_count_request({"messages": []}, [])["input"]["invokeModel"]["body"]))
    assert plain["max_tokens"] == 1


@pytest.mark.parametrize("model,expected", [
    ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "anthropic.claude-sonnet-4-5-20250929-v1:0"),
    ("global.anthropic.x-v1:0", "anthropic.x-v1:0"), ("anthropic.x-v1:0", "anthropic.x-v1:0"),
])
def test_foundation_model_id(model, expected):
    assert providers.foundation_model_id(model) == expected
