"""Fixtures shared by the end-to-end tests: a fake Anthropic upstream and real gateway processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fakes.upstream import FakeUpstream
from harness import Gateway


DEFAULT_RULES = Path(__file__).resolve().parent.parent / "rules.yaml"


def routed_rules(fake_url: str, extra: str = "", clients: list[dict] | None = None) -> str:
    """Rules that treat api.anthropic.com as the API and send it to `fake_url`, in both modes.

    The client signatures are the default rule file's unless `clients` is given.
    """
    if clients is None:
        clients = yaml.safe_load(DEFAULT_RULES.read_text())["clients"]
    return yaml.safe_dump({"clients": clients}) + f"""\
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
