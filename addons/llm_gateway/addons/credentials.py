"""Key custody: agents hold gateway tokens; only the gateway holds the real upstream key.

In a cluster the agents run untrusted code, so they should hold nothing worth stealing. With a `credentials`
section in the rule file, an API exchange is authenticated by a gateway-issued token (sent as `x-api-key` or
`Authorization: Bearer`, as the client likes), which the gateway swaps for the upstream key in the form the
upstream takes (`x-api-key` for Anthropic). Tokens are stored as SHA-256 hashes only; the upstream keys come
from files (a mounted Kubernetes Secret, re-read when it changes, also by the symlink swap Secrets update with)
or environment variables, never from the rule file. Without `tokens`, the upstream key replaces whatever the
client sent. `pass_through` rules let named kinds of credentials (subscription OAuth tokens) through unchanged.
An unknown or missing token gets a native 401 `authentication_error` from the gateway; nothing is forwarded.

Secrets never sit in the flow: the client's credential is masked as soon as its headers arrive (before mitmweb
first shows the flow), and the value the upstream must see is put in only while mitmproxy serialises the
request (mitm/serializers.py). An upstream that echoes the key back gets it masked in its answer, before any
other part reads it (docs/credentials.md, "An upstream that echoes a secret"): in the status line's reason, in
header names and values (`responseheaders`, the first addon there to see the answer), in every stream event
(`ScrubTap`, the `SCRUB` stage, before the reader), in bytes a stream passes on unread (an encoding the gateway
cannot decode: `ScrubTap.on_unread`), in a buffered body (`response`, before the answer pipeline), in an answer
that did not parse (`error`), and in every log line, tracebacks included (util/secretmask.KeyLogFilter, put on
the log handlers here).

`policy/credentials.decide` is the pure decision; `policy/credentials.KeyStore` reads and watches the keys;
`KeyCustody` here is the addon; `tools/mint_token` mints a token (`scripts/mint-token NAME`).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mitmproxy import http

from llm_gateway.mitm import layers, serializers
from llm_gateway.pipeline import exchange
from llm_gateway.pipeline.flows import proxy_mode
from llm_gateway.pipeline.answer import TOO_LARGE_MESSAGE, body_of, native_answer
from llm_gateway.policy.credentials import (
    CREDENTIAL_HEADERS,
    Decision,
    KeyStore,
    decide,
    presented,
)
from llm_gateway.protocol.headers import normalize
from llm_gateway.protocol.hosts import dot_segments, normalize_host, path_of
from llm_gateway.protocol.providers import ANTHROPIC
from llm_gateway.protocol.sse import Event
from llm_gateway.util.secretmask import ESCAPE_NEEDLE, LOG_FILTER, mask, scrub, scrub_event, scrub_json, secret_forms

if TYPE_CHECKING:
    from llm_gateway.addons.rulefile import RuleFile

logger = logging.getLogger("llm_gateway.credentials")

WATCH_INTERVAL = 0.5  # seconds; a changed key file is in force within about a second
UNAUTHENTICATED_MESSAGE = "invalid or missing gateway token (x-api-key or Authorization: Bearer)"


# ------------------------------------------------------------------------------------- the decision


def shown(host: str, path: str, method: str = "") -> str:
    """Where a request went, for a log line: the method (escaped unless plain letters) and the path without its
    query, cut and escaped. The host was matched against the rules' API hosts, so it is plain."""
    if method and not (method.isascii() and method.isalpha()):
        method = repr(method[:20])
    return f"{method + ' ' if method else ''}{host}{path_of(path)[:200]!r}"


# ------------------------------------------------------------------------------------------ the keys


# ------------------------------------------------------------------------------------------ the addon


@dataclass
class Custody:
    """The secrets of one exchange, beside the flow (never in it, never in its metadata)."""

    original: dict[str, str]  # header name -> what the client sent
    placeholders: list[str] = field(default_factory=list)
    key: str | None = None  # the upstream key sent
    forms: tuple[bytes, ...] = ()  # every secret the request carried upstream, as `secret_forms` spells them: masked in the answer


_custody: weakref.WeakKeyDictionary[http.HTTPFlow, Custody] = weakref.WeakKeyDictionary()


class ScrubTap:
    """Masks the secrets a request carried (the upstream key, a cloud token) in stream events (an upstream that
    echoes them back in an error), and in the bytes the relay passes on unread (`on_unread`)."""

    def __init__(self, *secrets: str) -> None:
        self.forms = secret_forms(secrets)
        # the relay's quick path sends on the deltas without them (pipeline/relay.py); a `\u` escape may spell one
        self.event_bytes = (*self.forms, ESCAPE_NEEDLE)
        self._held = b""  # unread bytes kept back: their end may be the start of the key

    def on_event(self, event: Any) -> Any | None:
        masked = scrub_event(event.raw, self.forms)
        return None if masked is event.raw else Event(masked)

    def mask_bytes(self, data: bytes) -> bytes:
        """Whole bytes masked, `\\u`-escaped spellings in a JSON text too (a Bedrock frame's payload,
        pipeline/eventstream.py); `data` itself when nothing changed."""
        return scrub_json(scrub(data, self.forms), self.forms)

    def on_unread(self, data: bytes, end: bool) -> bytes:
        """Bytes the relay forwards without parsing them (an encoding it cannot decode, a stream it gave up on):
        masked, the key found also when two chunks cut it; a tail that may begin the key waits for the next chunk
        (at most a key's length of bytes), and goes at the end."""
        if not self.forms:
            return data
        data = scrub(self._held + data, self.forms)
        self._held = b""
        if end or not data:
            return data
        longest = len(self.forms[0])
        for at in range(max(0, len(data) - longest + 1), len(data)):
            tail = data[at:]
            if any(form.startswith(tail) for form in self.forms):
                self._held = tail
                return data[:at]
        return data

    def on_end(self) -> bytes:
        return b""


class KeyCustody:
    """Authenticates API exchanges by gateway token and swaps in the upstream key. After routing and client
    detection (it may tie a token to a client), before anything that forwards."""

    def __init__(self, rule_file: RuleFile) -> None:
        self.rule_file = rule_file
        self.store = KeyStore()
        self._watcher: asyncio.Task | None = None
        self.wire_ready = False
        self._filtered: set[str] = set()  # the keys the log filter masks

    def load(self, loader) -> None:
        self.wire_ready = serializers.install()

    def running(self) -> None:
        for handler in logging.getLogger().handlers:  # mitmdump's terminal log, mitmweb's event log
            handler.addFilter(LOG_FILTER)
        self._sync()
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._watcher:
            self._watcher.cancel()
            self._watcher = None
        for handler in logging.getLogger().handlers:
            handler.removeFilter(LOG_FILTER)

    def _sync(self) -> None:
        creds = self.rule_file.rules.credentials
        self.store.use(creds.upstream if creds else ())
        self._keys_to_log_filter()

    def _keys_to_log_filter(self) -> None:
        """The log filter masks every key the store holds (the ones before a rotation stay masked too)."""
        known = self.store.keys.values()
        if not set(known) <= self._filtered:
            self._filtered |= set(known)
            LOG_FILTER.use(sorted(self._filtered))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                self._sync()
                self.store.refresh()
                self._keys_to_log_filter()
            except Exception:  # the watcher must outlive anything a file can do to it
                logger.exception("upstream key watcher")

    # -- hooks ---------------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Take the client's credentials out of the flow before anything shows it."""
        if flow in _custody:
            return
        ex = exchange.of(flow)
        self._mask_query_tokens(flow, ex)
        if ex is None:
            self._off_api(flow)
            return
        if flow.response or ex.rules.credentials is None:
            return
        if ex.provider != ANTHROPIC and ex.mode != "reverse":  # a cloud request its client signed: not a gateway token
            return
        headers = flow.request.headers
        original = {name: headers[name] for name in CREDENTIAL_HEADERS if name in headers}
        _custody[flow] = Custody(original)
        for name in original:
            headers[name] = mask("client credential")
        self._drop_unauthenticated_body(flow, ex, original)

    def _drop_unauthenticated_body(self, flow: http.HTTPFlow, ex: exchange.Exchange, original: dict[str, str]) -> None:
        """A request no token and no pass-through rule can admit is known on its headers: its body is dropped as it
        arrives, never held, decoded or parsed (the cheap check first). It is still answered by `request`, after
        client detection (from its headers), so its 401 and its record read as before. A token's client binding
        needs the client, known only from the body: `request` checks it."""
        creds = ex.rules.credentials
        seen = presented(original)
        if not creds.tokens or any(creds.token_for(v) for v in seen.values()):
            return
        decision = decide(creds, seen, normalize(flow.request.headers), "")
        if decision.action == "refuse":
            layers.cap_request_body(flow, 0, refused=True)  # its bytes are read and dropped

    def _mask_query_tokens(self, flow: http.HTTPFlow, ex: exchange.Exchange | None) -> None:
        """A gateway token in the query string (a misconfigured client, a curious agent) is never a credential
        here, and never stays in the flow, the exchange's path (log lines) or what goes upstream, whatever the
        host: it is for the gateway only. Costs a hash per query value, only on requests with a query."""
        creds = (ex.rules if ex is not None else self.rule_file.rules).credentials
        if creds is None or not creds.tokens or "?" not in flow.request.path:
            return
        query = flow.request.query.items(multi=True)
        if not any(creds.token_for(v) for _, v in query):
            return
        flow.request.query = [(k, mask("gateway token") if creds.token_for(v) else v) for k, v in query]
        if ex is not None:
            ex.path = flow.request.path

    def _off_api(self, flow: http.HTTPFlow) -> None:
        """A request to an API host (or to the base-URL listener, whatever its target) outside the API paths (e.g. Claude Code's `/api/claude_code/settings`, or
        the gateway's own `/-/metrics`): it gets no upstream key, and a gateway token goes no further (nor stays
        in the flow); a pass-through credential passes."""
        rules = self.rule_file.rules
        host = normalize_host(flow.request.host)
        # The base-URL listener is the gateway's own: whatever its target, a token sent there stops here.
        api_host = proxy_mode(flow) == "reverse" or any(h.match(host) for api in rules.apis for h in api.hosts)
        if rules.credentials is None or not api_host:
            return
        headers = flow.request.headers
        original = {name: headers.pop(name) for name in CREDENTIAL_HEADERS if name in headers}
        if not original:
            return
        custody = _custody[flow] = Custody(original)
        found = normalize(headers)  # one pass over the fields: Headers.items() is quadratic
        decision = decide(rules.credentials, presented(original), found, "unknown")
        if decision.action == "pass" and self.wire_ready and not flow.response:
            self._pass(flow, custody, decision)
        else:
            why = "is answered by the gateway" if flow.response else "is not an API path"
            where = shown(host, flow.request.path)
            logger.info(f"credentials: {where} {why}: its {', '.join(original)} is not forwarded")

    def request(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        custody = _custody.get(flow)
        if ex is None or custody is None or flow.response:
            return
        creds = ex.rules.credentials
        seen = presented(custody.original)
        headers = normalize(flow.request.headers)  # one pass over the fields: Headers.items() is quadratic
        decision = decide(creds, seen, headers, ex.client)
        ex.principal = decision.principal
        ex.note(f"credentials: {decision.why}")
        exchange.publish(flow, ex)
        if decision.action == "refuse":
            logger.warning(f"refused {ex.client} {shown(ex.host, ex.path, ex.method)}: {decision.why}")
            self._answer(flow, "authentication_error", UNAUTHENTICATED_MESSAGE)
            return
        if not self.wire_ready:
            self._answer(flow, "api_error", "the gateway cannot place upstream credentials (see its log)")
            return
        if decision.action == "pass":
            self._pass(flow, custody, decision)
            return
        if ex.provider != ANTHROPIC:  # a cloud request: the gateway signs it with its cloud credentials (addons/cloudauth.py)
            for name in CREDENTIAL_HEADERS:
                flow.request.headers.pop(name, None)
            return
        unsafe = self._unsafe_destination(flow, ex)
        if unsafe:
            logger.warning(f"no upstream key for {ex.client} {shown(ex.host, ex.path, ex.method)}: {unsafe}")
            self._answer(flow, "invalid_request_error", f"the gateway does not send its upstream key here: {unsafe}")
            return
        self._sync()
        up = decision.upstream
        key = self.store.key(up.name) if up is not None else None
        if key is None:
            name = up.name if up is not None else "?"
            logger.error(f"no upstream key {name} to send for {ex.client} ({decision.why}); answering 500")
            self._answer(flow, "api_error", f"the gateway has no upstream key {name!r} (see its log)")
            return
        for name in CREDENTIAL_HEADERS:
            flow.request.headers.pop(name, None)
        value = key if up.header == "x-api-key" else f"Bearer {key}"
        custody.key = key
        self._place(flow, custody, up.header, value, f"upstream key {up.name}")

    @staticmethod
    def _unsafe_destination(flow: http.HTTPFlow, ex: exchange.Exchange) -> str | None:
        """Why the upstream key must not go with this request, or None. A token grants the API paths the rules
        match, not what the path resolves to upstream; and the key never crosses the network in clear to a
        scheme and port the agent picked (egress or transparent mode, no route). A route's or the reverse
        target's plain `http://` is the operator's choice (a sidecar, a test upstream) and stays allowed."""
        if dot_segments(ex.path):
            return "a path with '.' or '..' segments"
        if flow.request.scheme != "https" and ex.mode != "reverse":
            if ex.route is None:
                return "plain http (use https)"
        return None

    def _pass(self, flow: http.HTTPFlow, custody: Custody, decision: Decision) -> None:
        """Forward the credentials the pass-through rule matched, and no other the client sent beside them."""
        for name, value in custody.original.items():
            if name in decision.passes:
                self._place(flow, custody, name, value, f"passed through ({decision.principal}) {name}")
            else:
                flow.request.headers.pop(name, None)

    def _place(self, flow: http.HTTPFlow, custody: Custody, name: str, value: str, label: str) -> None:
        LOG_FILTER.remember([value])  # a pass-through credential too: no log line shows it from now on
        placeholder = serializers.hold(value, label, flow.request.host, flow.request.port)
        custody.placeholders.append(placeholder)
        flow.request.headers[name] = placeholder

    def _answer(self, flow: http.HTTPFlow, error_type: str, message: str) -> None:
        # A wrong token stays wrong: without `x-should-retry: false` Claude Code retries a 401 ten times with
        # backoff (three minutes) before it says "Invalid API key"; the Anthropic SDKs honour the header.
        flow.response = native_answer(error_type, message, {"x-should-retry": "false"})

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Every secret the request carried upstream (its placeholders: the upstream key, a pass-through
        credential, the cloud signature, token or session token addons/cloudauth.py placed) is masked in the
        answer from here on; the first addon to see the answer, before the cloud placeholders are released."""
        sent = serializers.sent_secrets(flow.request)
        custody = self._sent(flow)
        forms = secret_forms(sent)
        if not forms:
            return
        if custody is None:
            custody = _custody[flow] = Custody({})
        custody.forms = forms
        LOG_FILTER.remember(sent)
        ex = exchange.of(flow)
        if ex is not None:
            ex.add_tap(ScrubTap(*sent), exchange.SCRUB)  # first: every other tap sees the masked event
        self._scrub_head(flow.response, custody.forms)

    def response(self, flow: http.HTTPFlow) -> None:
        custody = self._sent(flow)
        if custody is None or not custody.forms or flow.response.stream:
            return
        content = body_of(flow.response)
        if content is None:  # past the bound: unread, so not passed on either
            flow.response = native_answer("api_error", TOO_LARGE_MESSAGE)
        elif content and (masked := scrub_json(scrub(content, custody.forms), custody.forms)) is not content:
            flow.response.content = masked

    def error(self, flow: http.HTTPFlow) -> None:
        """An answer that did not parse: mitmproxy's error quotes the upstream's bytes (a status line, a header
        line, a chunk size), in the flow's error (records, the dumper's line, saved flows) and in the page it
        sends the client. With a secret among them: masked in the error, and the client gets a native 502."""
        sent = serializers.sent_secrets(flow.request)
        custody = self._sent(flow)
        forms = secret_forms(sent) if sent else custody.forms if custody is not None else ()
        if not forms or flow.error is None:
            return
        message = flow.error.msg.encode("utf-8", "surrogateescape")
        masked = scrub(message, forms)
        if masked is message:
            return
        flow.error.msg = masked.decode("utf-8", "surrogateescape")
        if flow.response is None:  # the answer pipeline's native 502 takes the page's place (addons/answer.py)
            return
        layers.answer_instead_of_error_page(flow, native_answer(
            "api_error", "The gateway's upstream failed: its answer could not be read.",
            {"x-should-retry": "true", "connection": "close"}, status=502), after_head=True)

    def _sent(self, flow: http.HTTPFlow) -> Custody | None:
        """The request is on the wire (or never will be): its placeholders are no longer needed."""
        custody = _custody.get(flow)
        if custody is not None and custody.placeholders:
            serializers.release(custody.placeholders)
            custody.placeholders = []
        return custody

    @staticmethod
    def _scrub_head(response: http.Response, forms: tuple[bytes, ...]) -> None:
        """The key masked in the reason phrase and in every header value, and a header whose name holds it
        dropped (the mask is no header name), in one pass over the raw fields (a setitem per header would rescan
        them all: quadratic in an answer with thousands of headers)."""
        reason = response.data.reason
        if (masked := scrub(reason, forms)) is not reason:
            response.data.reason = masked
        fields = response.headers.fields
        if any(form in name or form in value for name, value in fields for form in forms):
            response.headers.fields = tuple(
                (name, scrub(value, forms)) for name, value in fields if scrub(name, forms) is name)


# ------------------------------------------------------------------------------------------ minting

