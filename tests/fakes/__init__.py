"""Test doubles that stand in for real services (stdlib only, independent of llm_gateway)."""

from .upstream import (
    DEFAULT_MODEL,
    DEFAULT_TEXT,
    DEFAULT_USAGE,
    ERROR_TYPES,
    FakeUpstream,
    RecordedRequest,
    Scenario,
    litellm_wrapped_error,
    message_to_events,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TEXT",
    "DEFAULT_USAGE",
    "ERROR_TYPES",
    "FakeUpstream",
    "RecordedRequest",
    "Scenario",
    "litellm_wrapped_error",
    "message_to_events",
]
