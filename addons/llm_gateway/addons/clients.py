"""Client detection as an addon: which client and session sent a request, and its stream preference
(policy/clients.py decides from the headers and body).
"""

from __future__ import annotations

from llm_gateway.pipeline import exchange
from llm_gateway.policy.clients import (
    _OVERRIDE_BYTES,
    OVERRIDE_HEADER,
    agent_ids,
    detect,
    find_signature,
)


class ClientDetector:
    """Labels every API flow with its client, session and stream preference, in both modes."""

    def request(self, flow) -> None:
        ex = exchange.of(flow)
        if ex is None or flow.response:
            return
        found = detect(ex.rules.clients, flow.request.headers, ex.body)
        ex.client, ex.session, ex.user_agent = found.client, found.session, found.user_agent
        ex.agent_id, ex.parent_agent_id = agent_ids(flow.request.headers)
        signature = find_signature(ex.rules.clients, found.client)
        ex.stream_preference = signature.stream if signature else "as-sent"
        if any(name.lower() == _OVERRIDE_BYTES for name, _ in flow.request.headers.fields):  # a pop scans and raises
            flow.request.headers.pop(OVERRIDE_HEADER, None)
        exchange.publish(flow, ex)
