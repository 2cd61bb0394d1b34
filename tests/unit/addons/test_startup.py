"""What the gateway says once it listens: the routed destination per base-URL listener, risky set-ups."""

from __future__ import annotations

import logging

import pytest
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons

from gwtest import BASE_RULES, rule_file
from llm_gateway.policy import rules as rules_mod
from llm_gateway.addons.startup import StartupReport, api_destinations

TARGET = ProxyMode.parse("reverse:https://api.anthropic.com@127.0.0.1:8081")


def destinations(routes: str, target=TARGET) -> str:
    return api_destinations(rules_mod.parse(BASE_RULES + routes, "r.yaml"), target)


@pytest.mark.parametrize("routes, expected", [
    ("", "https://api.anthropic.com (no route)"),
    ("routes:\n  - upstream: http://litellm:4000/anthropic\n", "http://litellm:4000/anthropic (routes[0])"),
    ("routes:\n  - {match: {mode: regular}, upstream: http://a}\n  - {match: {host: api.anthropic.com}, upstream: http://b:81}\n",
     "http://b:81 (routes[1])"),
    ("routes:\n  - {match: {host: other.example}, upstream: http://a}\n", "https://api.anthropic.com (no route)"),
    ("routes:\n  - {match: {path: /v1/messages/count_tokens}, upstream: http://a}\n  - upstream: http://b\n",
     "http://a for paths /v1/messages/count_tokens (routes[0]), http://b (routes[1])"),
    ("routes:\n  - {match: {path: /v1/*}, upstream: http://a}\n",
     "http://a for paths /v1/* (routes[0]), https://api.anthropic.com (the reverse target, no route)"),
])
def test_the_destination_is_what_the_routes_give(routes, expected):
    assert destinations(routes) == expected


def report(caplog, modes: list[str], routes: str = "", **options) -> str:
    addon = StartupReport(rule_file(BASE_RULES + routes))
    with taddons.context(addon, Proxyserver()) as tctx, caplog.at_level(logging.INFO):
        tctx.configure(addon, mode=modes, **options)
        addon.running()
    return "\n".join(f"{r.levelname} {r.getMessage()}" for r in caplog.records if r.name.startswith("llm_gateway"))


def test_banner_names_the_routed_destination(caplog):
    text = report(caplog, ["regular@127.0.0.1:8080", "reverse:https://api.anthropic.com@127.0.0.1:8081"],
                  "routes:\n  - upstream: http://127.0.0.1:4000\n", connection_strategy="lazy")
    assert ("base-URL listener 127.0.0.1:8081: API requests go to http://127.0.0.1:4000 (routes[0]); "
            "other requests to https://api.anthropic.com") in text
    assert "WARNING" not in text


def test_no_bind_address_and_eager_connections_are_warned_about(caplog):
    text = report(caplog, ["regular@8080", "reverse:https://api.anthropic.com@127.0.0.1:8081"],
                  connection_strategy="eager")
    assert "the regular listener (regular@8080) has no address and listens on every network interface" in text
    assert "--mode regular@127.0.0.1:8080" in text
    assert "connection_strategy=eager: the base-URL listener connects to https://api.anthropic.com" in text
    assert "base-URL listener 127.0.0.1:8081" in text


def test_an_explicit_all_interfaces_address_is_a_choice(caplog):
    text = report(caplog, ["regular@0.0.0.0:8080"], connection_strategy="lazy")
    assert "WARNING" not in text
