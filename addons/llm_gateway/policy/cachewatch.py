"""Why a session's prompt cache broke: fingerprints of the cacheable prefix, compared turn by turn.

Anthropic caches a request's prefix in a fixed order: model, then `tools`, then `system`, then `messages`,
each a list of blocks, cut at the blocks that carry `cache_control` (up to 4 breakpoints, TTL "5m" or "1h";
a read looks back up to 20 blocks before each breakpoint; prefixes below a model's minimum length are not
cached). Source: Anthropic's prompt-caching documentation ("Prompt caching": "How it works", "Cache
limitations", "What invalidates the cache").

For every successful exchange of a session the gateway keeps a `Fingerprint` of that prefix: a short hash per
block, the shape (tool names, block counts) and the breakpoints with their TTL. No prompt text is kept; tool
names are, cleaned and cut, because "tool 'x' removed" needs the name of a tool that is gone. When a request
reads fewer cache tokens than its session's previous request (of the same conversation) had cached, the two
fingerprints are compared and the first position where the cache was lost names the reason.

Pure functions (`fingerprint`, `explain`, `min_cacheable`) and one bounded store (`CacheWatch`: sessions
forgotten least-recently-used first).
"""

from __future__ import annotations

import hashlib
import re
import struct
import sys
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llm_gateway.protocol import jsoncodec
from llm_gateway.protocol.tokens import CACHE_TTL, token

if TYPE_CHECKING:
    pass

REASONS = (
    "ttl_expired", "model_changed", "tools_changed", "system_changed", "messages_changed", "breakpoint_changed",
    "below_minimum", "unknown",
)
DIGEST = 8  # bytes of hash per block (see _hash): collisions within one session are negligible at 2**-64
LOOKBACK = 20  # blocks a cache read looks back from a breakpoint (Anthropic: "about 20 blocks")
# conversations kept per session: the main loop, each subagent, each model switched to (all client-chosen)
MAX_CONVERSATIONS = 16
# bytes of fingerprints kept in all (see footprint): the session cap counts sessions, but a fingerprint grows
# with its prompt, 8 bytes a block; 5000 sessions of long conversations and subagents stay well below this
MAX_BYTES = 256 * 2**20
OVERHEAD = 400  # bytes of a fingerprint besides its arrays: the objects, the conversation's key and entry
DEFAULT_TTL = CACHE_TTL  # seconds; the API's two cache lifetimes
# Minimum cacheable prompt length in tokens, per model (Anthropic's prompt-caching docs, "Cache limitations");
# first match wins; anything else: DEFAULT_MIN_CACHEABLE.
MIN_CACHEABLE: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"opus-4-5|haiku-4-5"), 4096),
    (re.compile(r"haiku"), 2048),  # Claude Haiku 3 and 3.5
)
DEFAULT_MIN_CACHEABLE = 1024  # Opus 4/4.1, Sonnet 3.7/4/4.5, and models not listed
ROLES = {"u": "user", "a": "assistant", "s": "system"}  # message roles by their first letter
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:@/+-]")


def min_cacheable(model: str | None) -> int:
    """The model's minimum cacheable prompt length, in tokens."""
    return next((n for pattern, n in MIN_CACHEABLE if model and pattern.search(model)), DEFAULT_MIN_CACHEABLE)


def clean(name: Any, limit: int = 64) -> str:
    """A client-supplied name (tool, model) made safe for a log line: listed characters only, cut at `limit`."""
    text = _UNSAFE.sub("?", str(name))
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------- fingerprints


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """The cacheable prefix of one request, as hashes and shape. Positions count blocks in Anthropic's order:
    every tool, then every system block, then every content block of every message."""

    model: str | None
    digests: bytes  # DIGEST bytes per block
    tools: tuple[str, ...]  # cleaned tool names, in order
    system: int  # number of system blocks
    roles: str  # one letter per message: the first of its role ("u", "a"; "?" for anything else)
    counts: bytes  # the number of content blocks per message, as array("I") bytes (compact: sessions are many)
    breakpoints: tuple[tuple[int, str], ...]  # (position, "5m" | "1h"), in position order
    settings: bytes = b""  # hash of `thinking` and `tool_choice`: a change loses the messages' cache, not the rest

    @property
    def messages(self) -> tuple[tuple[str, int], ...]:
        """(role, number of content blocks) per message."""
        return tuple(zip((ROLES.get(r, "?") for r in self.roles), array("I", self.counts)))

    @property
    def blocks(self) -> int:
        return len(self.digests) // DIGEST

    def digest(self, position: int) -> bytes:
        return self.digests[position * DIGEST : (position + 1) * DIGEST]

    def section(self, start: int, count: int) -> bytes:
        return self.digests[start * DIGEST : (start + count) * DIGEST]

    def system_digests(self) -> bytes:
        return self.section(len(self.tools), self.system)

    def message(self, number: int) -> bytes:
        """The digests of message `number` (0 = the first; b"" when there is none)."""
        counts = array("I", self.counts[: (number + 1) * array("I").itemsize])
        if len(counts) <= number:
            return b""
        return self.section(len(self.tools) + self.system + sum(counts[:number]), counts[number])

    def opening(self) -> bytes:
        """The digests of the first message: with the system prompt, what tells one conversation of a session
        (the main loop, a subagent) from another."""
        return self.message(0)

    def label(self, position: int) -> str:
        """Where a position is, in words: "tool 'x'", "system block 2", "message 3 (user) block 1"."""
        if position < len(self.tools):
            return f"tool '{self.tools[position]}'"
        position -= len(self.tools)
        if position < self.system:
            return f"system block {position + 1}"
        position -= self.system
        for number, (role, count) in enumerate(self.messages, 1):
            if position < count:
                return f"message {number} ({role}) block {position + 1}"
            position -= count
        return "the end of the prompt"


MAX_SHARED_NAMES = 50_000  # tool names held for sharing (each at most 64 characters); past it, start over


class _ToolLists:
    """One copy of a tool list for every fingerprint that has it: each request is parsed anew, and 300 MCP tool
    names held per conversation would be most of a session's memory. Holds at most MAX_SHARED_NAMES names (a few
    MB), however many distinct lists clients send."""

    def __init__(self) -> None:
        self.lists: dict[tuple[str, ...], tuple[str, ...]] = {}
        self.names = 0

    def shared(self, names: tuple[str, ...]) -> tuple[str, ...]:
        found = self.lists.get(names)
        if found is None:
            if self.names + len(names) > MAX_SHARED_NAMES:
                self.lists.clear()
                self.names = 0
            found = self.lists[names] = tuple(sys.intern(n) for n in names)
            self.names += len(names)
        return found


_TOOL_LISTS = _ToolLists()


def footprint(fp: Fingerprint | None) -> int:
    """About how many bytes a kept fingerprint holds (its tool names are shared, see _ToolLists)."""
    if fp is None:
        return OVERHEAD
    return OVERHEAD + len(fp.digests) + len(fp.counts) + len(fp.roles) + 8 * len(fp.tools) + 64 * len(fp.breakpoints)


_DIGEST_OF = struct.Struct("<q").pack  # a Python hash (a signed 64-bit int) as DIGEST bytes


def _hash(block: Any) -> bytes:
    """DIGEST bytes that change with anything in the block but its `cache_control`: Python's own hash of the
    block's canonical JSON (orjson, in C). That hash is SipHash-1-3 with a key drawn at start
    (PYTHONHASHSEED), so a client cannot aim a collision, and it is four times faster than SHA-1 and eight
    times BLAKE2b on these blocks; the digests never leave the process (fingerprints live only in its memory).
    Per 280 kB Claude Code request about 0.3 ms, from 1.9 ms with json's encoder and BLAKE2b
    (docs/benchmarks.md)."""
    if isinstance(block, dict) and "cache_control" in block:  # a breakpoint is not part of the cached text
        block = {k: v for k, v in block.items() if k != "cache_control"}
    return _DIGEST_OF(hash(jsoncodec.canonical(block)))


def _blocks(value: Any) -> list[Any]:
    """A `system` or message `content` as its list of blocks: a string is one text block (so the API reads it)."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    return list(value) if isinstance(value, list) else []


def _ttl(block: Any) -> str | None:
    control = block.get("cache_control") if isinstance(block, dict) else None
    if not isinstance(control, dict):
        return None
    return "1h" if control.get("ttl") == "1h" else "5m"


def fingerprint(body: Any) -> Fingerprint | None:
    """The fingerprint of a Messages request body (parsed JSON), or None for anything that is not one.

    Never raises: a body too deep or too odd to serialise gives None."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return None
    try:
        digests, breakpoints = bytearray(), []

        def add(block: Any) -> None:
            ttl = _ttl(block)
            if ttl:
                breakpoints.append((len(digests) // DIGEST, ttl))
            digests.extend(_hash(block))

        tools = body.get("tools") if isinstance(body.get("tools"), list) else []
        for tool in tools:
            add(tool)
        system = _blocks(body.get("system"))
        for block in system:
            add(block)
        roles, counts = [], array("I")
        for message in body["messages"]:
            message = message if isinstance(message, dict) else {}
            content = _blocks(message.get("content"))
            for block in content:
                add(block)
            role = message.get("role")
            roles.append(role[0] if role in ROLES.values() else "?")
            counts.append(len(content))
    except (ValueError, TypeError, RecursionError):
        return None
    model = body.get("model")
    settings = _hash({k: body.get(k) for k in ("thinking", "tool_choice")})
    return Fingerprint(
        model=clean(model, 128) if isinstance(model, str) else None,
        digests=bytes(digests),
        tools=_TOOL_LISTS.shared(tuple(clean(t.get("name", "?") if isinstance(t, dict) else "?") for t in tools)),
        system=len(system),
        roles="".join(roles),
        counts=counts.tobytes(),
        breakpoints=tuple(breakpoints),
        settings=settings,
    )


# ---------------------------------------------------------------------------------------------- explanations


def _names(names: list[str], verb: str) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{'tool' if len(names) == 1 else 'tools'} {shown} {verb}"


def tools_detail(prev: Fingerprint, cur: Fingerprint) -> str:
    """"tool 'mcp__x__search' removed; 3 tools reordered": what differs between two tool lists."""
    before = {name: prev.digest(i) for i, name in enumerate(prev.tools)}
    after = {name: cur.digest(i) for i, name in enumerate(cur.tools)}
    parts = []
    removed = [n for n in before if n not in after]
    added = [n for n in after if n not in before]
    changed = [n for n in after if n in before and before[n] != after[n]]
    if removed:
        parts.append(_names(removed, "removed"))
    if added:
        parts.append(_names(added, "added"))
    if changed:
        parts.append(_names(changed, "changed"))
    kept_before = [n for n in before if n in after]  # the tools both lists have, each in its own order
    kept_after = [n for n in after if n in before]
    moved = sum(a != b for a, b in zip(kept_before, kept_after))
    if moved:
        parts.append(f"{moved} {'tool' if moved == 1 else 'tools'} reordered")
    return "; ".join(parts) or "tool definitions changed"


def _first_difference(a: bytes, b: bytes) -> int | None:
    """The first block position where two digest strings differ (a shorter one differs where it ends)."""
    for i in range(0, min(len(a), len(b)), DIGEST):
        if a[i : i + DIGEST] != b[i : i + DIGEST]:
            return i // DIGEST
    return None if len(a) == len(b) else min(len(a), len(b)) // DIGEST


def system_detail(prev: Fingerprint, cur: Fingerprint) -> str:
    i = _first_difference(prev.section(len(prev.tools), prev.system), cur.section(len(cur.tools), cur.system)) or 0
    if i < min(prev.system, cur.system):
        return f"system block {i + 1} changed"
    return f"system block {i + 1} {'added' if cur.system > prev.system else 'removed'}"


def messages_detail(prev: Fingerprint, cur: Fingerprint) -> str:
    p, c = len(prev.tools) + prev.system, len(cur.tools) + cur.system
    for number, (old, new) in enumerate(zip(prev.messages, cur.messages), 1):
        a, b = prev.section(p, old[1]), cur.section(c, new[1])
        if old[0] != new[0]:
            return f"message {number} is now {new[0]}, was {old[0]}"
        if a != b:
            i = _first_difference(a, b) or 0
            verb = "changed" if i < min(old[1], new[1]) else ("added" if new[1] > old[1] else "removed")
            return f"message {number} ({new[0]}) block {i + 1} {verb}"
        p, c = p + old[1], c + new[1]
    return f"{len(cur.messages)} messages, {len(prev.messages)} before: message {len(cur.messages) + 1} removed"


def elapsed_text(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _in_reach(position: int, breakpoints: tuple[tuple[int, str], ...]) -> bool:
    """Can a request with these breakpoints read a cache entry written at `position`?"""
    return any(0 <= b - position < LOOKBACK for b, _ in breakpoints)


def explain(
    prev: Fingerprint | None,
    cur: Fingerprint | None,
    elapsed: float,
    ttl_seconds: dict[str, float],
    prompt_tokens: int,
) -> tuple[str, str]:
    """(reason, detail) for a request that read less cache than the previous one of its conversation had cached.

    `elapsed`: seconds since that previous request; `ttl_seconds`: {"5m": s, "1h": s}; `prompt_tokens`: input +
    cache read + cache write of this request. The earliest position where the cache was lost decides: the model,
    then each of the previous request's breakpoints in order (its prefix changed: tools, system or messages; or
    its TTL ran out), then whether this request's breakpoints still reach the last one. Never raises."""
    if prev is None or cur is None:
        return "unknown", "no fingerprint of the prompt (request body not a Messages request)"
    if prev.model != cur.model:
        return "model_changed", f"model {prev.model} -> {cur.model}"
    minimum = min_cacheable(cur.model)
    if prompt_tokens < minimum:
        return "below_minimum", f"prompt of {prompt_tokens} tokens; {cur.model} caches from {minimum}"
    diff = _first_difference(prev.digests, cur.digests)
    if diff is not None and diff >= prev.blocks:
        diff = None  # the new request only extends the old prefix
    for position, ttl in prev.breakpoints:
        if diff is not None and diff <= position:
            if prev.tools != cur.tools or prev.section(0, len(prev.tools)) != cur.section(0, len(cur.tools)):
                return "tools_changed", tools_detail(prev, cur)
            start = len(prev.tools)
            if prev.system != cur.system or prev.section(start, prev.system) != cur.section(start, cur.system):
                return "system_changed", system_detail(prev, cur)
            return "messages_changed", messages_detail(prev, cur)
        if position >= len(prev.tools) + prev.system and prev.settings != cur.settings:
            return "messages_changed", "thinking or tool_choice changed (the messages' cache goes with them)"
        if elapsed > ttl_seconds.get(ttl, DEFAULT_TTL[ttl]):
            return "ttl_expired", f"{elapsed_text(elapsed)} since the last request; TTL {ttl}"
    if prev.breakpoints and not _in_reach(prev.breakpoints[-1][0], cur.breakpoints):
        was = prev.label(prev.breakpoints[-1][0])
        now = ", ".join(cur.label(b) for b, _ in cur.breakpoints) or "none"
        return "breakpoint_changed", f"breakpoint at {was} not in reach; breakpoints now: {now}"
    return "unknown", f"prefix and breakpoints unchanged, {elapsed_text(elapsed)} since the last request"


def continues(a: Fingerprint | None, b: Fingerprint | None) -> bool:
    """Does request `b` go on with the conversation of request `a` although their first messages or models
    differ (else they share a conversation_key)?

    - the same model, another first message: an edit (a break) when the first answer (message 2) is still the
      same; not when `b` is alone, as Claude Code's subagents of one kind begin side by side (same session id,
      model and system prompt, each its own task);
    - another model, the same first message, and the same system prompt or first answer: a model switch (tools
      may change with it, and so may the system prompt: Claude Code's names its model).

    Anything else is another conversation of the session and breaks nothing: Claude Code's small side requests
    to Haiku, its subagents (Task tool: their own system prompt and first message)."""
    if a is None or b is None:
        return False
    same_answer = a.message(1) == b.message(1) != b""
    if a.model == b.model:
        return same_answer
    return a.opening() == b.opening() != b"" and (a.system_digests() == b.system_digests() or same_answer)


def conversation_key(fp: Fingerprint | None) -> tuple[str | None, bytes]:
    """(model, hash of the first message): which conversation of its session a request continues."""
    if fp is None:
        return None, b""
    return fp.model, hashlib.blake2b(fp.opening(), digest_size=DIGEST).digest()


# ---------------------------------------------------------------------------------------------- the store


@dataclass(frozen=True, slots=True)
class Break:
    reason: str
    detail: str
    tokens_lost: int  # what the previous request had cached, less what this one read
    number: int  # breaks so far in this session, this one included


@dataclass(slots=True)
class _Seen:
    fingerprint: Fingerprint | None
    started: float  # epoch seconds
    cached: int  # cache read + cache write of that request: what the cache held after it


@dataclass
class SessionCache:
    # by conversation_key, most recent last
    conversations: OrderedDict[tuple[str | None, bytes], _Seen] = field(default_factory=OrderedDict)
    requests: int = 0
    breaks: int = 0
    size: int = 0  # footprint of its conversations' fingerprints, bytes


class CacheWatch:
    """Per-session memory of the last request of each conversation; bounded to `max_sessions` sessions and
    `max_bytes` bytes of fingerprints, least recently seen sessions forgotten first."""

    def __init__(self, max_sessions: int = 5_000, max_bytes: int = MAX_BYTES) -> None:
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self.sessions: OrderedDict[str, SessionCache] = OrderedDict()
        self.breaks = 0
        self.size = 0  # bytes: the sum of the sessions' sizes

    def _trim(self) -> None:
        """Forget the least recently seen sessions past either cap; the most recent one always stays."""
        while len(self.sessions) > 1 and (len(self.sessions) > self.max_sessions or self.size > self.max_bytes):
            self.size -= self.sessions.popitem(last=False)[1].size

    def observe(
        self,
        session: str | None,
        usage: dict | None,
        body: Any,
        started: float,
        ttl_seconds: dict[str, float] | None = None,
        max_sessions: int | None = None,
    ) -> Break | None:
        """Record one successful exchange (`body`: the request JSON; `started`: epoch seconds); a `Break` when
        it read fewer cached tokens than the previous request of its conversation had cached, else None.

        A usage without `cache_read_input_tokens` (a proxy that drops it) says nothing either way."""
        if not session or not isinstance(usage, dict) or not usage:
            return None
        if max_sessions is not None:
            self.max_sessions = max_sessions
        state = self.sessions.pop(session, None) or SessionCache()
        self.sessions[session] = state
        self._trim()
        state.requests += 1
        read, wrote = token(usage, "cache_read_input_tokens"), token(usage, "cache_creation_input_tokens") or 0
        fp = fingerprint(body)
        key = conversation_key(fp)
        prev = state.conversations.get(key)
        if prev is None:  # the most recent conversation this one continues with an edit or a model switch
            prev = next((seen for seen in reversed(state.conversations.values())
                         if continues(seen.fingerprint, fp)), None)
        found = None
        if prev is not None and read is not None and read < prev.cached:
            prompt = read + wrote + (token(usage, "input_tokens") or 0)
            reason, detail = explain(prev.fingerprint, fp, started - prev.started, ttl_seconds or DEFAULT_TTL, prompt)
            state.breaks += 1
            self.breaks += 1
            found = Break(reason, detail, prev.cached - read, state.breaks)
        if read is not None:
            before = state.size
            gone = state.conversations.pop(key, None)
            state.size -= footprint(gone.fingerprint) if gone else 0
            state.conversations[key] = _Seen(fp, started, read + wrote)
            state.size += footprint(fp)
            while len(state.conversations) > MAX_CONVERSATIONS:
                state.size -= footprint(state.conversations.popitem(last=False)[1].fingerprint)
            self.size += state.size - before
            self._trim()
        return found


# ---------------------------------------------------------------------------------------------- the gateway's hook


