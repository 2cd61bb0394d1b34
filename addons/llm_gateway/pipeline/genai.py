"""One exchange as OpenTelemetry GenAI attributes: the span's, its cache-break event's and its metrics'.

Plain dicts from the Exchange alone (no SDK here: addons/otel.py exports them). Names follow the OpenTelemetry
semantic conventions for generative AI (gen-ai-spans.md, gen-ai-metrics.md, registry `gen_ai.*`, `error.type`,
`server.*`); what the conventions have no name for is in the gateway's own `llm_gateway.*` namespace. Token
counts are read with protocol/tokens.py's `token`, as the usage record's (pipeline/record.py), and summed by
Anthropic's rule: `gen_ai.usage.input_tokens` = input + cache read + cache write (the conventions ask for the
whole prompt; Anthropic's `input_tokens` is only its uncached part).

Never a session id in a metric's attributes (a new one every run); prompt and answer text only through
`content_attributes`, which the addon calls only when content capture is on (policy/otel.py).
"""

from __future__ import annotations

from typing import Any

from llm_gateway.pipeline.exchange import Exchange
from llm_gateway.protocol import jsoncodec
from llm_gateway.protocol.tokens import token
from llm_gateway.records.schema import outcome

OPERATION = "chat"  # gen_ai.operation.name: the Messages API is a chat completion
# The conventions' gen_ai.provider.name values for where the gateway sends requests (issue 26 names providers
# on the exchange as `provider`; until it does, every exchange goes to Anthropic's own API).
PROVIDERS = {"anthropic": "anthropic", "bedrock": "aws.bedrock", "vertex": "gcp.vertex_ai",
             "aws.bedrock": "aws.bedrock", "gcp.vertex_ai": "gcp.vertex_ai"}
# Claude Code's attribution headers (reference/claude-code-gateway-protocol.md): agent and parent agent.
AGENT_HEADERS = {"x-claude-code-agent-id": "llm_gateway.agent.id",
                 "x-claude-code-parent-agent-id": "llm_gateway.agent.parent_id"}
MAX_ATTRIBUTE_CHARS = 200
BREAK_EVENT = "llm_gateway.cache_break"
# Characters per content attribute when OTEL_(SPAN_)ATTRIBUTE_VALUE_LENGTH_LIMIT is not set (policy/otel.py):
# with content capture on, a span stays under about 50 kB (system, input and output text), not the megabyte
# of a long agent conversation, in the export queue's memory and in each OTLP request.
CONTENT_MAX_CHARS = 16384

# The conventions' explicit bucket boundaries (gen-ai-metrics.md): tokens, and seconds.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
SECONDS_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)


INT64 = (-(2**63), 2**63 - 1)  # OTLP's int_value is a signed 64-bit integer


def exportable_text(text: str) -> str:
    """`text` as OTLP can carry it: protobuf strings are UTF-8, and a client's lone surrogate (JSON `"\\ud83d"`
    in a model name, an undecodable header byte) would fail the encoding of the whole batch it is in."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="replace").decode()
    return text


def exportable(attributes: dict[str, Any]) -> dict[str, Any]:
    """The attributes OTLP can encode: strings as `exportable_text`, an integer past 64 bits (a client's
    `max_tokens: 1e30` written as an integer) left out rather than refused by the encoder."""
    found: dict[str, Any] = {}
    for key, value in attributes.items():
        if isinstance(value, str):
            value = exportable_text(value)
        elif isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]:
            continue
        elif isinstance(value, tuple):
            value = tuple(exportable_text(v) if isinstance(v, str) else v for v in value)
        found[key] = value
    return found


def provider(ex: Exchange) -> str:
    """gen_ai.provider.name: decided here only, from the exchange's `provider` once it has one."""
    name = getattr(ex, "provider", None) or "anthropic"
    return PROVIDERS.get(name, name)


def span_name(ex: Exchange) -> str:
    """`chat {gen_ai.request.model}`, or `chat` when the request names no model."""
    return exportable_text(f"{OPERATION} {ex.model_requested}") if ex.model_requested else OPERATION


def _common(ex: Exchange, server: str | None, port: int | None) -> dict[str, Any]:
    found = {"gen_ai.operation.name": OPERATION, "gen_ai.provider.name": provider(ex)}
    if ex.model_requested:
        found["gen_ai.request.model"] = ex.model_requested
    if server:
        found["server.address"] = server
        if port:
            found["server.port"] = port
    return found


def start_attributes(ex: Exchange, headers: Any, server: str | None, port: int | None) -> dict[str, Any]:
    """What is known when the request arrives (after client detection and key custody): `headers` is the
    request's (any mapping matched case-insensitively, like mitmproxy's Headers)."""
    found = _common(ex, server, port)
    if ex.stream_requested is not None:
        found["gen_ai.request.stream"] = ex.stream_requested
    if ex.session:
        found["gen_ai.conversation.id"] = ex.session
    found["llm_gateway.client.name"] = ex.client
    if ex.principal:
        found["llm_gateway.principal"] = ex.principal
    found["llm_gateway.mode"] = "egress" if ex.mode == "regular" else "base_url"
    for header, key in AGENT_HEADERS.items():
        value = headers.get(header)
        if value:
            found[key] = value[:MAX_ATTRIBUTE_CHARS]
    if ex.body is not None and isinstance(ex.body, dict):
        for field, key in (("max_tokens", "gen_ai.request.max_tokens"), ("temperature", "gen_ai.request.temperature"),
                           ("top_p", "gen_ai.request.top_p"), ("top_k", "gen_ai.request.top_k")):
            value = ex.body.get(field)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found[key] = value
    return found


def input_tokens(usage: dict[str, Any] | None) -> int | None:
    """The whole prompt: input + cache read + cache write (None without usage)."""
    if not usage:
        return None
    parts = [token(usage, key) for key in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")]
    return sum(p for p in parts if p) if any(p is not None for p in parts) else None


def error_type(ex: Exchange) -> str | None:
    """`error.type`: the native error type the client got, or `incomplete` / `no_response` (records/schema.py)."""
    found = outcome(ex.status, ex.error_type, ex.complete)
    return found.kind if found.error else None


def time_to_first_chunk(ex: Exchange) -> float | None:
    """Seconds from the request's arrival to the upstream's response head, for streamed answers only."""
    if ex.response_started and ex.stream_upstream:
        return max(0.0, ex.response_started - ex.started)
    return None


def end_attributes(ex: Exchange) -> dict[str, Any]:
    """What the finished exchange adds: the answer, its usage and cost, and what the client received."""
    found: dict[str, Any] = {}
    if ex.model_answered:
        found["gen_ai.response.model"] = ex.model_answered
    if ex.response_id:
        found["gen_ai.response.id"] = ex.response_id
    if ex.stop_reason:
        found["gen_ai.response.finish_reasons"] = (ex.stop_reason,)
    ttfc = time_to_first_chunk(ex)
    if ttfc is not None:
        found["gen_ai.response.time_to_first_chunk"] = ttfc
    usage = ex.usage
    prompt = input_tokens(usage)
    if prompt is not None:
        found["gen_ai.usage.input_tokens"] = prompt
    for field, key in (("output_tokens", "gen_ai.usage.output_tokens"),
                       ("cache_read_input_tokens", "gen_ai.usage.cache_read.input_tokens"),
                       ("cache_creation_input_tokens", "gen_ai.usage.cache_creation.input_tokens")):
        n = token(usage, field)
        if n is not None:
            found[key] = n
    if ex.status is not None:
        found["http.response.status_code"] = ex.status
    failed = error_type(ex)
    if failed:
        found["error.type"] = failed
    if ex.reason:
        found["llm_gateway.reason"] = ex.reason
    if ex.request_id:
        found["llm_gateway.request_id"] = ex.request_id
    if ex.stream_upstream is not None and ex.stream_requested is not None:
        found["llm_gateway.stream.forced"] = ex.stream_upstream != ex.stream_requested
    if ex.converted:
        found["llm_gateway.stream.converted"] = ex.converted
    price = ex.cost()
    if price.cost_usd is not None:
        found["llm_gateway.cost.usd"] = price.cost_usd
    if price.saved_usd is not None:
        found["llm_gateway.cost.saved_usd"] = price.saved_usd
    found["llm_gateway.cache_break"] = ex.cache_break
    return found


def break_event(ex: Exchange) -> dict[str, Any] | None:
    """The attributes of the span's `llm_gateway.cache_break` event, when the exchange broke its session's cache."""
    if not ex.cache_break:
        return None
    found: dict[str, Any] = {"llm_gateway.cache_break.reason": ex.cache_break_reason or "unknown"}
    if ex.cache_break_detail:
        found["llm_gateway.cache_break.detail"] = ex.cache_break_detail
    if ex.cache_break_tokens_lost is not None:
        found["llm_gateway.cache_break.tokens_lost"] = ex.cache_break_tokens_lost
    if ex.cache_break_cost_usd is not None:
        found["llm_gateway.cache_break.cost_usd"] = ex.cache_break_cost_usd
    return found


def metric_attributes(ex: Exchange, server: str | None, port: int | None) -> dict[str, Any]:
    """The attributes every GenAI metric point of this exchange carries: few values, never a session."""
    found = _common(ex, server, port)
    if ex.model_answered:
        found["gen_ai.response.model"] = ex.model_answered
    failed = error_type(ex)
    if failed:
        found["error.type"] = failed
    return found


def token_points(ex: Exchange) -> list[tuple[str, int]]:
    """(gen_ai.token.type, count) for gen_ai.client.token.usage: `input` (the whole prompt) and `output`."""
    points = []
    prompt = input_tokens(ex.usage)
    if prompt is not None:
        points.append(("input", prompt))
    output = token(ex.usage, "output_tokens")
    if output is not None:
        points.append(("output", output))
    return points


# -- content (only when capture is on) ----------------------------------------------------------------

def _parts(content: Any) -> list[dict[str, Any]]:
    """Anthropic content (a string or blocks) as the conventions' message parts."""
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts = []
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "content": block.get("text")})
        elif kind == "thinking":
            parts.append({"type": "reasoning", "content": block.get("thinking")})
        elif kind in ("tool_use", "server_tool_use"):
            parts.append({"type": "tool_call", "id": block.get("id"), "name": block.get("name"),
                          "arguments": block.get("input")})
        elif kind == "tool_result":
            parts.append({"type": "tool_call_response", "id": block.get("tool_use_id"),
                          "response": block.get("content")})
        else:
            parts.append({"type": str(kind)})
    return parts


def content_attributes(body: Any, limit: int = CONTENT_MAX_CHARS) -> dict[str, Any]:
    """`gen_ai.system_instructions` and `gen_ai.input.messages` (JSON strings) from the request body, each at
    most `limit` characters: an agent resends its whole conversation on every request (hundreds of kilobytes),
    so the messages are the newest that fit, still a JSON array, and `llm_gateway.content.messages_omitted`
    counts the older ones left out (each is on an earlier span of the conversation). Serialised newest first
    and stopped at the limit: the cost per request is bounded by `limit`, not by the conversation."""
    found: dict[str, Any] = {}
    if not isinstance(body, dict):
        return found
    if body.get("system"):
        found["gen_ai.system_instructions"] = _cut(jsoncodec.dumps(_parts(body["system"])).decode(), limit)
    messages = body.get("messages")
    if isinstance(messages, list):
        kept: list[str] = []
        size = 2  # the brackets
        messages = [m for m in messages if isinstance(m, dict)]
        for m in reversed(messages):
            text = jsoncodec.dumps({"role": m.get("role"), "parts": _parts(m.get("content"))}).decode()
            if size + len(text) + bool(kept) > limit:
                if not kept:  # the newest message alone is over the limit: cut, as the SDK's own limit cuts
                    kept.append(text)
                break
            kept.append(text)
            size += len(text) + (len(kept) > 1)
        found["gen_ai.input.messages"] = _cut("[" + ",".join(reversed(kept)) + "]", limit)
        if len(kept) < len(messages):
            found["llm_gateway.content.messages_omitted"] = len(messages) - len(kept)
    return found


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit]


def output_attributes(message: Any) -> dict[str, str]:
    """`gen_ai.output.messages` (a JSON string) from a whole Message."""
    if not (isinstance(message, dict) and message.get("type") == "message"):
        return {}
    out = {"role": "assistant", "parts": _parts(message.get("content")), "finish_reason": message.get("stop_reason")}
    return {"gen_ai.output.messages": jsoncodec.dumps([out]).decode()}
