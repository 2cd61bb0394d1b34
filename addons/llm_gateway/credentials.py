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
request (`lastmoment`). An upstream that echoes the key back gets it masked in its answer.

`decide` is the pure decision; `KeyStore` reads and watches the keys; `KeyCustody` is the addon; `main` mints
a token (`python -m llm_gateway.credentials NAME`, or `scripts/mint-token NAME`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import secrets
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import unquote

from mitmproxy import http

from . import exchange, lastmoment, routing, wire
from .credspec import Credentials, PassThrough, UpstreamKey, token_hash
from .rulefile import RuleFile, file_stamp
from .sse import Event

logger = logging.getLogger("llm_gateway.credentials")

CREDENTIAL_HEADERS = ("x-api-key", "authorization")  # where clients put Anthropic credentials
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KEY_CHARS = re.compile(r"[\x21-\x7e]{1,4096}")  # what a header can carry: visible ASCII, no spaces
MAX_KEY_FILE = 64 * 1024  # bytes read from a key file
TOKEN_PREFIX = "llmgw-"
WATCH_INTERVAL = 0.5  # seconds; a changed key file is in force within about a second
UNAUTHENTICATED_MESSAGE = "invalid or missing gateway token (x-api-key or Authorization: Bearer)"


# ------------------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Presented:
    """What a request carries: the `x-api-key` value and the `Authorization: Bearer` credential, if any."""

    api_key: str | None = None
    bearer: str | None = None

    def values(self) -> list[str]:
        return [v for v in (self.api_key, self.bearer) if v]


def presented(headers: Mapping[str, str]) -> Presented:
    """Read the client's credentials from request headers (a mitmproxy `Headers` or a lower-case mapping)."""
    api_key = (headers.get("x-api-key") or "").strip() or None
    auth = headers.get("authorization")
    bearer = None
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            bearer = value.strip()
    return Presented(api_key, bearer)


@dataclass(frozen=True)
class Decision:
    """`swap` (send the upstream key `upstream`), `pass` (forward the client's own credentials named in
    `passes`, the ones the rule matched) or `refuse` (answer 401). `principal` is the token's or pass-through
    rule's name; `why` says why, with no secret."""

    action: str
    principal: str | None = None
    upstream: UpstreamKey | None = None
    why: str = ""
    passes: tuple[str, ...] = ()  # for `pass`: the credential headers that go upstream


def decide(creds: Credentials, seen: Presented, headers: Mapping[str, str], client: str) -> Decision:
    """What to do with one API request's credentials. Pure; never raises."""
    for value in seen.values():
        token = creds.token_for(value)
        if token is None:
            continue
        if token.client is not None and token.client.lower() != client.lower():
            return Decision("refuse", None, None, f"token {token.name} is for client {token.client}, not {client}")
        return Decision("swap", token.name, creds.upstream_named(token.upstream), f"token {token.name}")
    for rule in creds.pass_through:
        if _passes(rule, seen, headers):
            passes = tuple(name for name, on in (("authorization", rule.bearer), ("x-api-key", rule.api_key)) if on)
            return Decision("pass", rule.name, None, f"pass_through {rule.name}", passes)
    if creds.tokens:
        return Decision("refuse", None, None, "unknown gateway token" if seen.values() else "no gateway token")
    return Decision("swap", None, creds.upstream[0], "no tokens configured")


def _passes(rule: PassThrough, seen: Presented, headers: Mapping[str, str]) -> bool:
    if rule.bearer and not any(g.match(seen.bearer) for g in rule.bearer):
        return False
    if rule.api_key and not any(g.match(seen.api_key) for g in rule.api_key):
        return False
    return all(g.match(headers.get(name)) for name, g in rule.header_values)


def dot_segments(path: str) -> bool:
    """Whether the path (query dropped) holds a `.` or `..` segment, also percent-encoded (once or more) or
    separated by a backslash, or followed by `;` parameters (`..;`, which servlet containers read as `..`): the
    upstream may resolve it (RFC 3986 section 5.2.4) to an endpoint outside the API paths the rules matched,
    e.g. `/v1/messages/../files`."""
    path = path.split("?", 1)[0]
    for _ in range(4):  # %252e -> %2e -> .: undo nested encodings, boundedly
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    return any(seg.split(";", 1)[0] in (".", "..") for seg in path.replace("\\", "/").split("/"))


def shown(host: str, path: str, method: str = "") -> str:
    """Where a request went, for a log line: the method (escaped unless plain letters) and the path without its
    query, cut and escaped. The host was matched against the rules' API hosts, so it is plain."""
    if method and not (method.isascii() and method.isalpha()):
        method = repr(method[:20])
    return f"{method + ' ' if method else ''}{host}{path.split('?', 1)[0][:200]!r}"


# ------------------------------------------------------------------------------------------ the keys


def read_key(spec: UpstreamKey) -> str:
    """The key, from its file (surrounding whitespace dropped: Secrets often end with a newline) or its
    environment variable. Raises ValueError with a message that names the source, never the content."""
    if spec.key_file:
        try:
            with open(spec.key_file, "rb") as f:
                raw = f.read(MAX_KEY_FILE + 1)
        except OSError as e:
            raise ValueError(f"upstream key {spec.name}: cannot read {spec.source}: {e.strerror or e}") from None
        if len(raw) > MAX_KEY_FILE:
            raise ValueError(f"upstream key {spec.name}: {spec.source} is larger than {MAX_KEY_FILE} bytes")
        text = raw.decode("ascii", "replace").strip()
    else:
        text = (os.environ.get(spec.key_env or "") or "").strip()
    if not KEY_CHARS.fullmatch(text):
        what = "is empty" if not text else "holds characters a header cannot carry"
        raise ValueError(f"upstream key {spec.name}: {spec.source} {what}")
    return text


class KeyStore:
    """The upstream keys in force, by name. A key that cannot be read (now, or after a change) keeps its
    last good value, with an error logged once per change; one that was never read is missing."""

    def __init__(self) -> None:
        self.specs: tuple[UpstreamKey, ...] = ()
        self.keys: dict[str, str] = {}
        self.stamps: dict[str, tuple | None] = {}
        self.reloads = 0

    def use(self, specs: tuple[UpstreamKey, ...]) -> None:
        """Take the upstream section of new rules: (re)read every key whose spec changed."""
        if specs == self.specs:
            return
        old = {s.name: s for s in self.specs}
        self.specs = specs
        for name in list(self.keys):
            if name not in {s.name for s in specs}:
                del self.keys[name]
        for spec in specs:
            if old.get(spec.name) != spec:
                self.keys.pop(spec.name, None)
                self._load(spec)

    def refresh(self) -> None:
        """Re-read the key files that changed since they were last read."""
        for spec in self.specs:
            if spec.key_file and file_stamp(spec.key_file) != self.stamps.get(spec.name):
                self._load(spec)

    def key(self, name: str) -> str | None:
        return self.keys.get(name)

    def _load(self, spec: UpstreamKey) -> None:
        if spec.key_file:
            self.stamps[spec.name] = file_stamp(spec.key_file)
        try:
            value = read_key(spec)
        except ValueError as e:
            kept = " (keeping the key read before)" if spec.name in self.keys else ""
            logger.error(f"{e}{kept}")
            return
        if self.keys.get(spec.name) != value:
            changed = spec.name in self.keys
            self.keys[spec.name] = value
            if changed:
                self.reloads += 1
            logger.info(f"upstream key {spec.name} {'re-read' if changed else 'read'} from {spec.source}")


# ------------------------------------------------------------------------------------------ the addon


@dataclass
class Custody:
    """The secrets of one exchange, beside the flow (never in it, never in its metadata)."""

    original: dict[str, str]  # header name -> what the client sent
    placeholders: list[str] = field(default_factory=list)
    key: str | None = None  # the upstream key sent, to mask in the answer


_custody: weakref.WeakKeyDictionary[http.HTTPFlow, Custody] = weakref.WeakKeyDictionary()


def mask(label: str) -> str:
    return f"[{label}; masked by the gateway]"


class ScrubTap:
    """Masks the upstream key in stream events (an upstream that echoes it back in an error)."""

    def __init__(self, key: str) -> None:
        self.key = key.encode()
        self.event_bytes = self.key  # the relay's quick path sends on the deltas without it (relay.py)

    def on_event(self, event: Any) -> Any | None:
        if self.key not in event.raw:
            return None
        return Event(event.raw.replace(self.key, mask("upstream key").encode()))

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

    def load(self, loader) -> None:
        self.wire_ready = lastmoment.install()

    def running(self) -> None:
        self._sync()
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._watcher:
            self._watcher.cancel()
            self._watcher = None

    def _sync(self) -> None:
        creds = self.rule_file.rules.credentials
        self.store.use(creds.upstream if creds else ())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                self._sync()
                self.store.refresh()
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
        headers = flow.request.headers
        original = {name: headers[name] for name in CREDENTIAL_HEADERS if name in headers}
        _custody[flow] = Custody(original)
        for name in original:
            headers[name] = mask("client credential")

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
        """A request to an API host outside the API paths (e.g. Claude Code's `/api/claude_code/settings`, or
        the gateway's own `/-/metrics`): it gets no upstream key, and a gateway token goes no further (nor stays
        in the flow); a pass-through credential passes."""
        rules = self.rule_file.rules
        host = flow.request.host.lower().rstrip(".")
        if rules.credentials is None or not any(h.match(host) for api in rules.apis for h in api.hosts):
            return
        headers = flow.request.headers
        original = {name: headers.pop(name) for name in CREDENTIAL_HEADERS if name in headers}
        if not original:
            return
        custody = _custody[flow] = Custody(original)
        found = {k.lower(): v for k, v in headers.items()}
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
        headers = {k.lower(): v for k, v in flow.request.headers.items()}
        decision = decide(creds, seen, headers, ex.client)
        ex.principal = decision.principal
        ex.notes.append(f"credentials: {decision.why}")
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
            if routing.match_route(ex.rules, ex.api, ex.mode, ex.host, ex.path) is None:
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
        placeholder = lastmoment.hold(value, label, flow.request.host, flow.request.port)
        custody.placeholders.append(placeholder)
        flow.request.headers[name] = placeholder

    def _answer(self, flow: http.HTTPFlow, error_type: str, message: str) -> None:
        flow.response = http.Response.make(
            wire.status_for_error_type(error_type),
            wire.error_json(error_type, message),
            {"content-type": "application/json"},
        )

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        custody = self._sent(flow)
        ex = exchange.of(flow)
        if custody is not None and custody.key and ex is not None:
            ex.sse_taps.insert(0, ScrubTap(custody.key))  # first: every other tap sees the masked event
            self._scrub_headers(flow.response, custody.key)

    def response(self, flow: http.HTTPFlow) -> None:
        custody = self._sent(flow)
        if custody is None or not custody.key or flow.response.stream:
            return
        content = flow.response.get_content(strict=False)
        if content and custody.key.encode() in content:
            flow.response.content = content.replace(custody.key.encode(), mask("upstream key").encode())

    def error(self, flow: http.HTTPFlow) -> None:
        self._sent(flow)

    def _sent(self, flow: http.HTTPFlow) -> Custody | None:
        """The request is on the wire (or never will be): its placeholders are no longer needed."""
        custody = _custody.get(flow)
        if custody is not None and custody.placeholders:
            lastmoment.release(custody.placeholders)
            custody.placeholders = []
        return custody

    @staticmethod
    def _scrub_headers(response: http.Response, key: str) -> None:
        for name, value in list(response.headers.items(multi=True)):
            if key in value:
                response.headers[name] = value.replace(key, mask("upstream key"))


# ------------------------------------------------------------------------------------------ minting


def mint(name: str, upstream: str | None = None, client: str | None = None) -> tuple[str, str]:
    """A new token and the rule line that admits it: (token, line). The token is random (256 bits)."""
    if not NAME.fullmatch(name):
        raise ValueError(f"a token name is 1-64 letters, digits, '.', '_' or '-' (got {name!r})")
    if upstream is not None and not NAME.fullmatch(upstream):
        raise ValueError(f"an upstream name is 1-64 letters, digits, '.', '_' or '-' (got {upstream!r})")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    # client names are free text in the rules: quote (a JSON string is a YAML scalar) what is not a plain name
    extra = "".join(f", {k}: {v if NAME.fullmatch(v) else json.dumps(v)}"
                    for k, v in (("upstream", upstream), ("client", client)) if v)
    return token, f'- {{name: {name}, sha256: "{token_hash(token)}"{extra}}}'


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mint-token",
        description="Mint a gateway token: prints the token (once: store it now) and the line to add under "
        "credentials.tokens in the rule file, which holds only the token's SHA-256.",
    )
    p.add_argument("name", help="who holds it (a team, an agent pool): the `principal` of its records")
    p.add_argument("--upstream", help="the credentials.upstream key it is exchanged for (default: the first)")
    p.add_argument("--client", help="accept it only from this client (a name from the clients section)")
    args = p.parse_args(argv)
    try:
        token, line = mint(args.name, args.upstream, args.client)
    except ValueError as e:
        p.error(str(e))
    print(f"# gateway token for {args.name} (shown once; give it to the agent as ANTHROPIC_API_KEY):")
    print(token)
    print("# add under credentials.tokens in the rule file:")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
