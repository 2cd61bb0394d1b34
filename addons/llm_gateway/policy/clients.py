"""Which agent sent an API request, and which of its sessions it belongs to.

`ClientDetector` is the addon; the rest is pure logic. `detect` takes the request headers (a mitmproxy `Headers`, or any mapping of
header name to value, matched case-insensitively) and the request body already parsed once by the caller (a dict,
or anything else for an empty or non-JSON body), and never raises.

Known signatures are data (the `clients:` section of `rules.yaml`), checked in order: the first signature with
ANY matching matcher names the client; none names it `unknown`. A request may name its client itself with the
`x-gateway-client` header, which the gateway strips before forwarding.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from llm_gateway.policy.spec import ClientSignature
from llm_gateway.protocol import jsoncodec
from llm_gateway.protocol.headers import normalize
from llm_gateway.util.globs import GlobSet
from llm_gateway.util.perobject import PerObject

UNKNOWN = "unknown"
OVERRIDE_HEADER = "x-gateway-client"

# Session sources, most preferred first. "metadata.user_id" is Claude Code's body field; the rest are headers.
SESSION_SOURCES: tuple[str, ...] = (
    "x-claude-code-session-id",
    "metadata.user_id",
    "x-litellm-session-id",
    "x-opencode-session",
    "goose-session-id",
    "x-session-id",
    "x-session-affinity",
)

SESSION_MAX_CHARS = 200
USER_AGENT_MAX_CHARS = 512
# Only this much of a header value, user agent, metadata.user_id or system prompt is looked at when matching.
MATCH_MAX_CHARS = 8192
# A metadata.user_id longer than this is not Claude Code's: it is neither matched nor parsed.
USER_ID_MAX_CHARS = 4096
MAX_SYSTEM_BLOCKS = 16

_OVERRIDE_BYTES = OVERRIDE_HEADER.encode()
_OVERRIDE_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,63}")
# Claude Code before 2.1.78: user_<sha256>_account_<uuid or empty>_session_<uuid>
_LEGACY_USER_ID = re.compile(r"user_.*?_session_(.+)")


@dataclass(frozen=True)
class Detection:
    client: str
    session: str | None
    user_agent: str | None
    matched_by: str  # e.g. "user_agent claude-cli/*", "header x-litellm-*", "override header", "none"


def detect(signatures: Sequence[ClientSignature], headers: Mapping[str, str] | Any, body: Any) -> Detection:
    """Name the client of one request. Never raises."""
    try:
        h = normalize(headers)
        session = _session(h, body)
        ua = h.get("user-agent")
        user_agent = _printable(ua[:USER_AGENT_MAX_CHARS]) if ua else None
        override = _override(signatures, h.get(OVERRIDE_HEADER))
        if override:
            return Detection(override, session, user_agent, "override header")
        found = _first_match(signatures, h, ua, body)
        if found:
            return Detection(found[0].name, session, user_agent, found[1])
        return Detection(UNKNOWN, session, user_agent, "none")
    except Exception:  # pragma: no cover - a bug here must not break the flow
        return Detection(UNKNOWN, None, None, "none")


# Claude Code's agent ids (its gateway protocol, "Messages": a gateway keeps them): the agent that sent the
# request, and the agent that started it (a subagent's main loop); absent on the main loop's own requests.
AGENT_ID_HEADER = "x-claude-code-agent-id"
PARENT_AGENT_ID_HEADER = "x-claude-code-parent-agent-id"


def agent_ids(headers: Mapping[str, str] | Any) -> tuple[str | None, str | None]:
    """(agent id, parent agent id) a request names, each bounded and printable as a session id is; None
    where absent or junk. Never raises."""
    try:
        h = normalize(headers)
        return _clean_session(h.get(AGENT_ID_HEADER)), _clean_session(h.get(PARENT_AGENT_ID_HEADER))
    except Exception:  # noqa: BLE001 - detection must never cost the request
        return None, None


def session_id(headers: Mapping[str, str] | Any, body: Any) -> str | None:
    """The request's session id from the first source in `SESSION_SOURCES` that has a sane one. Never raises."""
    try:
        return _session(normalize(headers), body)
    except Exception:  # pragma: no cover
        return None


def find_signature(signatures: Iterable[ClientSignature], name: str | None) -> ClientSignature | None:
    """The signature called `name` (case-insensitive), e.g. to read the stream preference of a detection."""
    if not isinstance(name, str):
        return None
    name = name.lower()
    if isinstance(signatures, tuple):  # the rules' tuple: one dict per rule load
        return _by_name(signatures).get(name)
    return next((s for s in signatures if s.name.lower() == name), None)


def _name_table(signatures: tuple[ClientSignature, ...]) -> dict[str, ClientSignature]:
    """Lower-case name -> the first signature of that name."""
    table: dict[str, ClientSignature] = {}
    for sig in signatures:
        table.setdefault(sig.name.lower(), sig)
    return table


_by_name: PerObject[dict[str, ClientSignature]] = PerObject(_name_table, 64)


# --- matching -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NameMatchers:
    """The user agent and header-name globs of all signatures, each kind as one regular expression, with
    the index of the signature each glob belongs to."""

    user_agent: GlobSet
    user_agent_owner: tuple[int, ...]
    headers: GlobSet
    headers_owner: tuple[int, ...]


def _build_matchers(signatures: tuple[ClientSignature, ...]) -> _NameMatchers:
    pairs = {kind: [(i, g) for i, sig in enumerate(signatures) for g in getattr(sig, kind)]
             for kind in ("user_agent", "headers")}
    return _NameMatchers(
        GlobSet(g for _, g in pairs["user_agent"]), tuple(i for i, _ in pairs["user_agent"]),
        GlobSet(g for _, g in pairs["headers"]), tuple(i for i, _ in pairs["headers"]),
    )


# Built once per tuple of signatures (once per rule load).
_matchers: PerObject[_NameMatchers] = PerObject(_build_matchers, 64)


def _first_match(
    signatures: Sequence[ClientSignature], h: dict[str, str], ua: str | None, body: Any
) -> tuple[ClientSignature, str] | None:
    """The first signature that matches and how, as `_match` on each in order would find it, but with one
    regular expression for every user agent glob and one for every header-name glob."""
    facts = _BodyFacts(body)
    if not isinstance(signatures, tuple):  # a list may change: no compiled form to keep
        return next(((sig, how) for sig in signatures if (how := _match(sig, h, ua, facts))), None)
    m = _matchers(signatures)
    best = len(signatures)  # the first signature that matches by user agent or header name
    found = m.user_agent.first(ua[:MATCH_MAX_CHARS]) if ua is not None else None
    if found is not None:
        best = m.user_agent_owner[found]
    if m.headers.globs:
        for name in h:
            found = m.headers.first(name)
            if found is not None and m.headers_owner[found] < best:
                best = m.headers_owner[found]
    for sig in signatures[:best]:  # an earlier one may still match by a header value or the body
        how = _match_rest(sig, h, facts)
        if how:
            return sig, how
    if best < len(signatures):
        return signatures[best], _match(signatures[best], h, ua, facts) or "?"
    return None


def _match(sig: ClientSignature, h: dict[str, str], ua: str | None, body: Any) -> str | None:
    """How `sig` matches (the first of its matchers that does), or None."""
    if ua is not None:
        ua_head = ua[:MATCH_MAX_CHARS]
        for g in sig.user_agent:
            if g.match(ua_head):
                return f"user_agent {g}"
    for g in sig.headers:
        if any(g.match(name) for name in h):
            return f"header {g}"
    return _match_rest(sig, h, body if isinstance(body, _BodyFacts) else _BodyFacts(body))


class _BodyFacts:
    """What the body matchers read, each worked out once per request and only if a signature asks: the
    metadata.user_id and the head of the first system text (up to MATCH_MAX_CHARS, leading blanks off)."""

    __slots__ = ("body", "_user_id", "_system_head")
    _UNSET = object()

    def __init__(self, body: Any) -> None:
        self.body = body
        self._user_id = self._system_head = self._UNSET

    @property
    def user_id(self) -> str | None:
        if self._user_id is self._UNSET:
            self._user_id = _user_id(self.body)
        return self._user_id

    @property
    def system_head(self) -> str | None:
        if self._system_head is self._UNSET:
            text = _system_text(self.body)
            self._system_head = None if text is None else text[:MATCH_MAX_CHARS].lstrip()
        return self._system_head


def _match_rest(sig: ClientSignature, h: dict[str, str], facts: _BodyFacts) -> str | None:
    """How `sig` matches by its matchers other than the user agent and header names, or None."""
    for name, g in sig.header_values:
        value = h.get(name)
        if value is not None and g.match(value[:MATCH_MAX_CHARS]):
            return f"header_value {name}: {g}"
    if sig.metadata_user_id:
        user_id = facts.user_id
        if user_id is not None:
            for g in sig.metadata_user_id:
                if g.match(user_id):
                    return f"metadata.user_id {g}"
    if sig.system_prompt:
        head = facts.system_head
        if head is not None:
            for prefix in sig.system_prompt:
                if head.startswith(prefix):
                    return f"system_prompt {prefix.strip()}"
    return None


def _override(signatures: Sequence[ClientSignature], value: str | None) -> str | None:
    if value is None:
        return None
    value = value[:100].strip()
    if not _OVERRIDE_TOKEN.fullmatch(value):
        return None
    sig = find_signature(signatures, value)
    return sig.name if sig else value


# --- sessions -------------------------------------------------------------------------------------------------


def _session(h: dict[str, str], body: Any) -> str | None:
    for source in SESSION_SOURCES:
        if source == "metadata.user_id":
            found = _claude_code_session(_user_id(body))
        else:
            found = _clean_session(h.get(source))
        if found:
            return found
    return None


def _claude_code_session(user_id: str | None) -> str | None:
    """The session in Claude Code's metadata.user_id: a JSON string (from 2.1.78) or the older underscore form."""
    if user_id is None:
        return None
    text = user_id.strip()
    if text.startswith("{"):
        parsed = jsoncodec.loads(text)
        if isinstance(parsed, dict):
            found = _clean_session(parsed.get("session_id"))
            if found:
                return found
    m = _LEGACY_USER_ID.fullmatch(text)
    return _clean_session(m.group(1)) if m else None


def _clean_session(value: Any) -> str | None:
    """A bounded, printable session id, or None for a missing, empty or junk value."""
    if not isinstance(value, str):
        return None
    value = value[: SESSION_MAX_CHARS + 64].strip()[:SESSION_MAX_CHARS].strip()
    if not value or not value.isprintable():
        return None
    return value


# --- reading the request --------------------------------------------------------------------------------------


def _user_id(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    metadata = body.get("metadata")
    if not isinstance(metadata, dict):
        return None
    user_id = metadata.get("user_id")
    return user_id if isinstance(user_id, str) and len(user_id) <= USER_ID_MAX_CHARS else None


def _system_text(body: Any) -> str | None:
    """The first text of `system`: the string itself, or the first text block of a list."""
    if not isinstance(body, dict):
        return None
    system = body.get("system")
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        for block in islice(system, MAX_SYSTEM_BLOCKS):
            if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
                return block["text"]
    return None


def _printable(text: str) -> str | None:
    text = text.strip()
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "?" for c in text)
    return text or None


