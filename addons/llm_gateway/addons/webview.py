"""Reading API traffic in mitmweb: the assembled message instead of raw frames, and annotated flows.

When an agent misbehaves, people open mitmweb to see what it sent and what came back. Three things
make that readable:

- `MessageView`, a contentview for `text/event-stream` and Messages JSON bodies: the Message the
  client assembled (text, tool calls with their input, thinking, stop reason) and its usage; and for a
  Messages request, its settings, tools, system prompt and conversation, message by message (a Claude Code
  request is tens of kB of JSON). mitmweb picks it by itself; the raw JSON stays one click away.
- A bounded copy of each streamed body (`StreamCopyTap` on the relay), put in the flow when the
  stream ends, so mitmweb shows it instead of "content missing". Forwarding stays unbuffered.
- A short `flow.comment` per API flow, led by what a person scans the list for (the error type, or the
  cache hit share and cost), then client, session, stream handling and tokens; and a marker for errors,
  cache breaks and denied egress.

`WebView` is the addon; it registers the contentview itself and removes it in `done`. It must run
after `Usage` in the hook order (it reads what the other parts found about the exchange).
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import contentviews, ctx, exceptions, http
from mitmproxy.contentviews import Contentview, Metadata
from mitmproxy.tools.dump import DumpMaster
from mitmproxy.utils import human

from llm_gateway.mitm import registry
from llm_gateway.pipeline import exchange, relay
from llm_gateway.pipeline.flows import EGRESS_METADATA
from llm_gateway.protocol import jsoncodec, messages
from llm_gateway.protocol.render import count_text, render_message, render_request
from llm_gateway.protocol.sse import SSE_TYPE
from llm_gateway.protocol.tokens import cache_share
from llm_gateway.util.logsafe import clean

logger = logging.getLogger("llm_gateway.webview")

VIEW_NAME = "llm-message"
# flow.metadata keys. The egress policy puts its decision on the flows it judges, as
# {"decision": "denied" | "blocked" | "fronting" | "allowed" | …, "host": …, "port": …, "rule": …};
# this module only reads it, and marks the refusals.
EGRESS_REFUSALS = frozenset({"denied", "blocked", "fronting"})
STREAM_COPY_KEY = "gateway_stream_copy"

KEEP_LIMIT = 4 * 1024 * 1024  # bytes of a streamed body kept for viewing, by default, where flows are viewed
MARK_ERROR = ":x:"
MARK_CACHE_BREAK = ":warning:"
MARK_DENIED = ":no_entry:"

# Only this much of a body is searched for the signs of an Anthropic stream when picking a view.
_SNIFF_BYTES = 64 * 1024


# --------------------------------------------------------------------------------------- the view


class MessageView(Contentview):
    """The Message a response body describes, as the client's SDK assembles it."""

    name = VIEW_NAME
    syntax_highlight = "none"

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        if isinstance(metadata.http_message, http.Request):
            request = _request_json(data)
            if request is None:
                raise ValueError("not a Messages API request")
            return render_request(request)
        message = _message_json(data)
        if message is not None:
            return render_message(message)
        acc = messages.message_from_sse(data)
        if acc.message is None and acc.error is None:
            raise ValueError("neither a Messages API stream nor a Message")
        return render_message(
            acc.message,
            stream=True,
            complete=acc.complete,
            error=acc.error,
            malformed=acc.malformed,
            copy=_copy_note(metadata),
        )

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        if not data:
            return -1
        if isinstance(metadata.http_message, http.Request):
            if metadata.content_type in (None, "application/json") and b'"messages"' in data[:_SNIFF_BYTES]:
                return 2 if _request_json(data) is not None else -1
            return -1
        if metadata.content_type == SSE_TYPE:
            head = data[:_SNIFF_BYTES]
            return 2 if b"message_start" in head or b"event: error" in head else -1
        if metadata.content_type in (None, "application/json") and b'"message"' in data[:_SNIFF_BYTES]:
            return 2 if _message_json(data) is not None else -1
        return -1


def _message_json(data: bytes) -> dict[str, Any] | None:
    """The body as a Message, or None when it is not `{"type": "message", …}` JSON."""
    body = jsoncodec.parse_json_body(data)
    return body if isinstance(body, dict) and body.get("type") == "message" else None


def _request_json(data: bytes) -> dict[str, Any] | None:
    """The body as a Messages request (`{"model": …, "messages": [...]}`), or None."""
    body = jsoncodec.parse_json_body(data)
    return body if isinstance(body, dict) and isinstance(body.get("messages"), list) else None


def _copy_note(metadata: Metadata) -> str | None:
    flow = metadata.flow
    copy = flow.metadata.get(STREAM_COPY_KEY) if flow is not None else None
    if isinstance(copy, dict) and copy.get("truncated"):
        return (
            f"only the first {human.pretty_size(copy.get('kept_bytes', 0))} of "
            f"{human.pretty_size(copy.get('total_bytes', 0))} were kept for viewing (gateway_keep_stream_body)"
        )
    return None


# ------------------------------------------------------------------------------ the stream copy


class StreamCopyTap:
    """Keeps the raw bytes of the events that pass, whole events only, up to `limit` bytes.

    Sits last on the relay, so it sees each event as it was forwarded (after other taps rewrote it).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.copy = bytearray()  # one buffer, not a list of the events: the events' own bytes can be reused
        self.kept = 0
        self.total = 0
        self.truncated = False

    def on_event(self, event) -> None:
        self.on_raw(event.raw)

    def on_raw(self, raw: bytes) -> None:
        """Copy one whole event's bytes (the relay's quick path hands them over without an `Event`)."""
        size = len(raw)
        self.total += size
        if self.truncated:
            return
        if self.kept + size > self.limit:
            self.truncated = True
            return
        self.copy += raw
        self.kept += size

    def on_end(self) -> bytes:
        return b""

    def body(self) -> bytes:
        return bytes(self.copy)

    def summary(self) -> dict[str, Any]:
        return {"kept_bytes": self.kept, "total_bytes": self.total, "truncated": self.truncated}


def _copy_tap(ex: exchange.Exchange) -> StreamCopyTap | None:
    return next((tap for tap in ex.sse_taps if isinstance(tap, StreamCopyTap)), None)


# ------------------------------------------------------------------------------ the annotations


def short_session(session: str | None) -> str | None:
    """The first 8 characters of a session id: enough to tell sessions apart in a list (a prefix also works for
    the usage report's --session)."""
    if not session:
        return None
    return session[:8]


def cost_text(ex: exchange.Exchange) -> str | None:
    """The exchange's cost, short enough to leave room for the client in the flow list: US cents below a dollar
    (`0.02¢`, `1.2¢`, `12¢`, `<0.01¢`), dollars from one (`$1.25`); `$?` when it used tokens no price is known
    for; None when it used none."""
    if not ex.usage:
        return None
    cost = ex.cost().cost_usd
    return "$?" if cost is None else short_money(cost)


def short_money(usd: float) -> str:
    cents = usd * 100
    if cents >= 100:
        return f"${usd:.2f}"
    if cents >= 10:
        return f"{cents:.0f}¢"
    if cents >= 1:
        return f"{cents:.1f}¢"
    if cents >= 0.01 or cents == 0:
        return f"{cents:.2f}¢".replace("0.00¢", "0¢")
    return "<0.01¢"


def asked_for(flow: http.HTTPFlow, ex: exchange.Exchange) -> str | None:
    """Where the agent was going, when a route sent the request elsewhere (the flow list shows where it went)."""
    if flow.request.host.lower() == ex.host.lower():
        return None
    return clean(f"{ex.host}{ex.path}", 200)


def comment_for(flow: http.HTTPFlow, ex: exchange.Exchange) -> str:
    """Cost, client and session first: mitmweb's Comment column is 150 pixels wide (about 20 characters), so
    `1.2¢ claude-code 1a2b3c4d` is what the flow list shows of it; then the cache hit share or the error, and
    the rest for the flow's own page: `1.2¢ claude-code 1a2b3c4d · hit 32% · in 21 out 9 cache r13 w7`, or
    `litellm · error rate_limit_error · …`. Values from the traffic are escaped."""
    session = short_session(ex.session)
    head = [cost_text(ex), clean(ex.client, 64), clean(session) if session else None]
    parts = [" ".join(p for p in head if p)]
    lead = []
    if ex.error_type:
        error = f"error {clean(ex.error_type, 60)}"
        if ex.unwrapped:
            error += f" unwrapped from {ex.unwrapped_from or 'an envelope'}"
        lead.append(error)
    if flow.error:  # mitmproxy's own words beside the error type (the record's `reason` says it in short)
        lead.append(f"failed: {clean(flow.error.msg, 120)}")
    elif ex.usage:
        share = cache_share(ex.usage)
        lead.append(f"hit {'-' if share is None else f'{share:.0%}'}")
    if ex.cache_break:
        lead.append("CACHE BREAK" + (f" {clean(ex.cache_break_reason, 40)}" if ex.cache_break_reason else ""))
    if lead:
        parts.append(" ".join(lead))
    if ex.principal:  # key custody: the gateway token's name (addons/credentials.py)
        parts.append(f"principal {clean(ex.principal, 64)}")
    asked = asked_for(flow, ex)
    if asked:
        parts.append(f"asked {asked}")
    stream = []
    if ex.stream_requested is not None and ex.stream_upstream is not None and ex.stream_requested != ex.stream_upstream:
        stream.append(f"stream forced {'on' if ex.stream_upstream else 'off'}")
    if ex.converted:
        stream.append(f"converted {ex.converted}")
    if stream:
        parts.append(", ".join(stream))
    if ex.usage:
        usage = ex.usage
        parts.append(
            f"in {count_text(usage, 'input_tokens')} out {count_text(usage, 'output_tokens')}"
            f" cache r{count_text(usage, 'cache_read_input_tokens')} w{count_text(usage, 'cache_creation_input_tokens')}"
        )
    if ex.cache_break and ex.cache_break_reason:
        parts.append(clean(ex.break_text(), 400))
    if flow.response is not None and flow.response.status_code < 400 and not ex.complete and not ex.error_type:
        parts.append("incomplete")
    copy = flow.metadata.get(STREAM_COPY_KEY)
    if isinstance(copy, dict) and copy.get("truncated"):
        parts.append(f"body copy cut at {human.pretty_size(copy.get('kept_bytes', 0))}")
    return " · ".join(parts)


def marker_for(flow: http.HTTPFlow, ex: exchange.Exchange) -> str:
    failed = flow.error is not None or (flow.response is not None and flow.response.status_code >= 400)
    if failed or ex.error_type:
        return MARK_ERROR
    if ex.cache_break:
        return MARK_CACHE_BREAK
    return ""


def refused_egress(flow: http.HTTPFlow) -> dict[str, Any] | None:
    decision = flow.metadata.get(EGRESS_METADATA)
    return decision if isinstance(decision, dict) and decision.get("decision") in EGRESS_REFUSALS else None


def egress_comment(flow: http.HTTPFlow, decision: dict[str, Any]) -> str:
    """`egress denied: evil.example:443 (not in egress.allow)`."""
    where = clean(decision.get("host") or flow.request.pretty_host)
    if decision.get("port"):
        where += f":{decision['port']}"
    rule = decision.get("rule") or decision.get("reason")
    return f"egress {decision['decision']}: {where}" + (f" ({clean(rule)})" if rule else "")


def annotate(flow: http.HTTPFlow) -> None:
    """Set the flow's comment and marker from what the gateway found; a user's own are kept."""
    refused = refused_egress(flow)
    ex = exchange.of(flow)
    if refused is not None:
        comment, marker = egress_comment(flow, refused), MARK_DENIED
    elif ex is not None:
        comment, marker = comment_for(flow, ex), marker_for(flow, ex)
    else:
        return
    if not flow.comment:
        flow.comment = comment
    if marker and not flow.marked:
        flow.marked = marker


# ------------------------------------------------------------------------------------ the addon


def flow_notes_wanted(setting: str, master: Any, options: Any) -> bool:
    """`gateway_flow_notes` as a switch: "on"/"off", or "auto": on unless the master is mitmdump's and no
    flows are saved. Raises OptionsError for anything else."""
    value = setting.strip().lower()
    if value in ("on", "off"):
        return value == "on"
    if value != "auto":
        raise exceptions.OptionsError(f"gateway_flow_notes: {setting!r} is not one of auto, on, off")
    saving = "save_stream_file" in options and bool(options.save_stream_file)
    return saving or not isinstance(master, DumpMaster)


class WebView:
    def __init__(self) -> None:
        self.view = MessageView()
        self.keep_limit = KEEP_LIMIT
        self.notes = True

    def load(self, loader) -> None:
        loader.add_option(
            "gateway_keep_stream_body",
            str,
            "auto",
            "Keep a copy of each streamed API response body, up to this size (e.g. 512k, 4m; 0 to keep none), "
            "so mitmweb can show it. Forwarding stays unbuffered; a longer stream keeps only its first events. "
            "auto: 4m where someone can look at flows (mitmweb, mitmproxy), none in mitmdump.",
        )
        loader.add_option(
            "gateway_flow_notes",
            str,
            "auto",
            "Flow comments, markers and the gateway's summary in flow.metadata, for people looking at flows: on, "
            "off, or auto: on in mitmweb and the console and when flows are saved (save_stream_file, -w), off in "
            "plain mitmdump, where nobody sees them. Records, log lines and metrics do not depend on it.",
        )
        contentviews.add(self.view)

    def configure(self, updated: set[str]) -> None:
        if updated & {"gateway_flow_notes", "save_stream_file"}:
            self.notes = flow_notes_wanted(ctx.options.gateway_flow_notes, ctx.master, ctx.options)
            exchange.publishing = self.notes
        if "gateway_keep_stream_body" not in updated:
            return
        value = ctx.options.gateway_keep_stream_body
        if value.strip().lower() == "auto":
            # mitmdump shows no flow, and the copy is most of the memory a stream holds (up to 4 MB each)
            self.keep_limit = 0 if isinstance(ctx.master, DumpMaster) else KEEP_LIMIT
            return
        try:
            limit = human.parse_size(value)
        except ValueError as e:
            raise exceptions.OptionsError(f"gateway_keep_stream_body: {e}") from None
        self.keep_limit = max(limit or 0, 0)

    def done(self) -> None:
        exchange.publishing = True  # the module's default again: the switch is this addon's
        registry.unregister_view(self.view)  # mitmproxy 12 has no public way to unregister a contentview

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or relay.of(flow) is None or self.keep_limit <= 0:
            return
        if "store_streamed_bodies" in ctx.options and ctx.options.store_streamed_bodies:
            return  # mitmproxy keeps the whole body itself
        ex.add_tap(StreamCopyTap(self.keep_limit), exchange.COPY)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)  # a stream cut off: what came before it is still worth seeing

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        try:
            self._keep_copy(flow)
            if self.notes:
                annotate(flow)
        except Exception:  # viewing aids must never disturb the traffic
            logger.exception(f"cannot annotate {clean(flow.request.pretty_url)}")

    def _keep_copy(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        tap = _copy_tap(ex) if ex is not None else None
        if tap is None or flow.response is None or flow.response.raw_content is not None:
            return
        flow.response.raw_content = tap.body()  # only the flow's copy: the client already has every byte
        flow.metadata[STREAM_COPY_KEY] = tap.summary()
        if tap.truncated:
            ex.note(f"stream copy cut at {tap.kept} of {tap.total} bytes")
