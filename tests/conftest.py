"""Fixtures shared by the end-to-end tests: a fake Anthropic upstream and real gateway processes."""

from __future__ import annotations

import pytest

from fakes.upstream import FakeUpstream
from harness import Gateway


def routed_rules(fake_url: str, extra: str = "") -> str:
    """Rules that treat api.anthropic.com as the API and send it to the fake upstream, in both modes."""
    return f"""\
apis:
  - name: anthropic
    hosts: [api.anthropic.com]
    paths: ["/v1/messages", "/v1/messages/*", "/anthropic/v1/messages", "/anthropic/v1/messages/*"]
routes:
  - match: {{host: api.anthropic.com}}
    upstream: {fake_url}
egress:
  default: deny
  allow: [api.anthropic.com]
  inspect: [api.anthropic.com]
{extra}"""


@pytest.fixture
def fake():
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def module_fake():
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
def gateway_factory():
    """Start gateways for one test; all are stopped at its end."""
    started: list[Gateway] = []

    def start(rules: str, **kw) -> Gateway:
        gw = Gateway(rules, **kw).start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()
