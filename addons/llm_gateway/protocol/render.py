"""Messages as plain text for people (mitmweb's message view): an answer's blocks, citations, tool input and
usage; a request's settings, tools, system prompt and conversation, message by message."""

from __future__ import annotations

import json
from typing import Any

from llm_gateway.protocol.tokens import cache_share, token


def render_message(
    message: dict[str, Any] | None,
    *,
    stream: bool = False,
    complete: bool = True,
    error: dict[str, Any] | None = None,
    malformed: bool = False,
    copy: str | None = None,
) -> str:
    """The Message as text: a head (id, model, stop reason, usage, stream state), then each block."""
    lines: list[str] = []
    if copy:
        lines.append(f"NOTE: {copy}")
    if stream:
        if error is not None:
            err = error.get("error") if isinstance(error.get("error"), dict) else {}
            lines.append(f"stream error: {err.get('type', '?')}: {err.get('message', '')}")
        elif not complete:
            lines.append("stream INCOMPLETE: it ended before message_stop")
        if malformed:
            lines.append("some events could not be applied (malformed); shown as far as they went")
    if message is None:
        return "\n".join(lines)

    head = f"{message.get('role', 'assistant')} message {message.get('id', '?')}"
    if message.get("model"):
        head += f" · model {message['model']}"
    lines.append(head)
    stop = f"stop reason: {message.get('stop_reason')}"
    if message.get("stop_sequence") is not None:
        stop += f" (stop sequence {message['stop_sequence']!r})"
    lines.append(stop)
    if message.get("stop_details") is not None:
        lines.append(f"stop details: {_compact(message['stop_details'])}")
    if isinstance(message.get("usage"), dict):
        lines.extend(describe_usage(message["usage"]))
    extra = {k: v for k, v in message.items() if k not in _SHOWN_FIELDS and v is not None}
    for key, value in extra.items():
        lines.append(f"{key}: {_compact(value)}")

    content = message.get("content")
    for index, block in enumerate(content if isinstance(content, list) else []):
        lines.append("")
        lines.extend(render_block(index, block))
    return "\n".join(lines)


def render_request(body: dict[str, Any]) -> str:
    """A Messages request (`POST /v1/messages` JSON) as text: model and settings, the tools by name, the system
    prompt, then each message with its blocks. Images and documents are described, not dumped (base64)."""
    lines = [f"request · model {body.get('model', '?')}"]
    settings = [f"{k} {_compact(body[k])}" for k in _REQUEST_SETTINGS if k in body]
    if settings:
        lines.append(" · ".join(settings))
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        names = [str(t.get("name") or t.get("type") or "?") if isinstance(t, dict) else "?" for t in tools]
        lines.append(f"tools ({len(names)}): " + ", ".join(names))
    system = body.get("system")
    if system:
        lines += ["", "══ system"]
        if isinstance(system, list):
            for index, block in enumerate(system):
                lines.extend(render_block(index, block))
        else:
            lines.append(_text(system))
    messages = body.get("messages")
    for number, message in enumerate(messages if isinstance(messages, list) else []):
        lines.append("")
        if not isinstance(message, dict):
            lines += [f"══ message {number} · ?", _pretty(message)]
            continue
        lines.append(f"══ message {number} · {message.get('role', '?')}")
        content = message.get("content")
        if isinstance(content, list):
            for index, block in enumerate(content):
                lines.extend(render_block(index, block))
        else:
            lines.append(_text(content))
    return "\n".join(lines)


_REQUEST_SETTINGS = ("max_tokens", "stream", "temperature", "top_p", "top_k", "thinking", "tool_choice",
                     "stop_sequences", "metadata", "service_tier")
_SHOWN_FIELDS = frozenset({"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "stop_details", "usage"})


def describe_usage(usage: dict[str, Any]) -> list[str]:
    """`tokens: input 21 · output 9` and `cache: read 13 · write 7 (5m 7, 1h 0) · hit 32%` (+ server tools)."""
    write = f"write {count_text(usage, 'cache_creation_input_tokens')}"
    breakdown = usage.get("cache_creation")
    if isinstance(breakdown, dict) and breakdown:
        write += f" (5m {count_text(breakdown, 'ephemeral_5m_input_tokens')}, 1h {count_text(breakdown, 'ephemeral_1h_input_tokens')})"
    share = cache_share(usage)
    lines = [
        f"tokens: input {count_text(usage, 'input_tokens')} · output {count_text(usage, 'output_tokens')}",
        f"cache: read {count_text(usage, 'cache_read_input_tokens')} · {write} · hit {'-' if share is None else f'{share:.0%}'}",
    ]
    server = usage.get("server_tool_use")
    if isinstance(server, dict) and server:
        lines.append("server tools: " + " · ".join(f"{k} {v}" for k, v in server.items()))
    return lines


def count_text(usage: dict[str, Any], key: str) -> str:
    value = token(usage, key)
    return "-" if value is None else str(value)


def render_block(index: int, block: Any) -> list[str]:
    """One content block: a title line, then its readable body."""
    if not isinstance(block, dict):
        return [f"── [{index}] ?", _pretty(block)]
    kind = block.get("type", "?")
    title = f"── [{index}] {kind}"
    if block.get("name"):
        title += f" {block['name']}"
    if block.get("id"):
        title += f" ({block['id']})"
    if block.get("tool_use_id"):
        title += f" for {block['tool_use_id']}"
    lines = [title]
    shown = {"type", "name", "id", "tool_use_id"}
    if kind == "text":
        lines.append(_text(block.get("text")))
        for citation in block.get("citations") or []:
            lines.append(f"  cited: {_citation(citation)}")
        shown |= {"text", "citations"}
    elif kind == "thinking":
        lines.append(_text(block.get("thinking")))
        signature = block.get("signature")
        lines.append(f"  (signature: {len(signature) if isinstance(signature, str) else 0} chars)")
        shown |= {"thinking", "signature"}
    elif kind == "redacted_thinking":
        data = block.get("data")
        lines.append(f"(redacted: {len(data) if isinstance(data, str) else 0} chars of encrypted thinking)")
        shown.add("data")
    elif "input" in block:  # tool_use, server_tool_use, mcp_tool_use
        lines.append(_pretty(block["input"]))
        shown.add("input")
    elif "content" in block:  # tool results (web_search_tool_result, mcp_tool_result, …), compaction
        content = block["content"]
        if kind == "tool_result" and isinstance(content, list) and all(isinstance(b, dict) for b in content):
            for index, inner in enumerate(content):
                lines.extend("  " + line for part in render_block(index, inner) for line in part.split("\n"))
        else:
            lines.append(_text(content) if isinstance(content, str) else _pretty(content))
        shown.add("content")
    elif isinstance(block.get("source"), dict):  # image, document: say what it is, not its base64
        lines.append(_source(block["source"]))
        shown.add("source")
    rest = {k: v for k, v in block.items() if k not in shown}
    if rest:
        lines.append(f"  {_compact(rest)}")
    return lines


def _source(source: dict[str, Any]) -> str:
    data = source.get("data")
    if isinstance(data, str):
        return f"({source.get('media_type', '?')}, {len(data)} characters of {source.get('type', 'data')})"
    if source.get("url"):
        return f"(url {source['url']})"
    return _compact(source)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else _pretty(value)


def _citation(citation: Any) -> str:
    if not isinstance(citation, dict):
        return _compact(citation)
    where = citation.get("url") or citation.get("document_title") or citation.get("title") or citation.get("type")
    return f"{citation.get('cited_text', '')!r} ({where})"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
