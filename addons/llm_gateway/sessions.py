"""Per-session prompt-cache memory, to catch the moment a session stops hitting its cache.

An agent session that loses its cache pays about ten times more for every turn, and nothing else
tells anyone. Memory is bounded: the least recently seen sessions are forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class SessionCache:
    used_cache: bool = False  # an earlier request wrote or read cache
    requests: int = 0
    breaks: int = 0


class CacheWatch:
    def __init__(self, max_sessions: int = 10_000) -> None:
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[str, SessionCache] = OrderedDict()
        self.breaks = 0

    def observe(self, session: str | None, usage: dict | None) -> bool:
        """Record one successful exchange; True when it is a cache break."""
        if not session or not usage:
            return False
        state = self.sessions.pop(session, None) or SessionCache()
        self.sessions[session] = state
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        read = usage.get("cache_read_input_tokens") or 0
        wrote = usage.get("cache_creation_input_tokens") or 0
        broke = state.used_cache and read == 0
        state.requests += 1
        state.used_cache = state.used_cache or bool(read or wrote)
        if broke:
            state.breaks += 1
            self.breaks += 1
        return broke
