"""Per-session prompt-cache memory, to catch the moment a session stops hitting its cache.

An agent session that loses its cache pays about ten times more for every turn, and nothing else
tells anyone. A prompt cache belongs to one model, so a session's requests to another model (Claude
Code's small Haiku side requests, say) neither break nor build its cache. Memory is bounded: the least
recently seen sessions are forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

MAX_MODELS = 16  # per session: the model name comes from the client


@dataclass
class SessionCache:
    cached_models: set[str | None] = field(default_factory=set)  # models whose earlier requests wrote or read cache
    requests: int = 0
    breaks: int = 0


class CacheWatch:
    def __init__(self, max_sessions: int = 10_000) -> None:
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[str, SessionCache] = OrderedDict()
        self.breaks = 0

    def observe(self, session: str | None, usage: dict | None, model: str | None = None) -> bool:
        """Record one successful exchange; True when it is a cache break.

        A usage without `cache_read_input_tokens` (a proxy that drops it) says nothing either way.
        """
        if not session or not usage:
            return False
        state = self.sessions.pop(session, None) or SessionCache()
        self.sessions[session] = state
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        read = usage.get("cache_read_input_tokens")
        wrote = usage.get("cache_creation_input_tokens") or 0
        broke = model in state.cached_models and read == 0
        state.requests += 1
        if (read or wrote) and len(state.cached_models) < MAX_MODELS:
            state.cached_models.add(model)
        if broke:
            state.breaks += 1
            self.breaks += 1
        return broke
