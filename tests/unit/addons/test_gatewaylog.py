"""The default log: mitmproxy's connection chatter moved to debug, failed non-API requests named."""

from __future__ import annotations

import logging

from mitmproxy import flow as mflow
from mitmproxy.test import taddons, tflow, tutils

from gwtest import api_flow, rule_file
from llm_gateway.addons.gatewaylog import CHATTY_LOGGER, GatewayLog
from llm_gateway.addons.routing import ApiRouter


def levels(caplog) -> list[tuple[str, str]]:
    return [(r.getMessage(), r.levelname) for r in caplog.records if r.name == CHATTY_LOGGER]


def test_connection_chatter_becomes_debug_and_the_rest_keeps_its_level(caplog):
    addon = GatewayLog()
    with taddons.context(addon), caplog.at_level(logging.DEBUG):
        log = logging.getLogger(CHATTY_LOGGER)
        for line in ("client connect", "client disconnect", "server connect api.anthropic.com:443",
                     "server disconnect api.anthropic.com:443", "Streaming response from api.anthropic.com.",
                     "error establishing server connection: [Errno -2] Name or service not known",
                     "client connected to something else"):
            log.info(line)
        log.warning("server connect but a warning")
        addon.done()
        log.info("client connect again")
        log.info("client connect")
    assert levels(caplog) == [
        ("client connect", "DEBUG"), ("client disconnect", "DEBUG"), ("server connect api.anthropic.com:443", "DEBUG"),
        ("server disconnect api.anthropic.com:443", "DEBUG"), ("Streaming response from api.anthropic.com.", "DEBUG"),
        ("error establishing server connection: [Errno -2] Name or service not known", "INFO"),
        ("client connected to something else", "INFO"), ("server connect but a warning", "WARNING"),
        ("client connect again", "INFO"), ("client connect", "INFO"),  # after done(): mitmproxy's own levels again
    ]


def test_a_failed_non_api_request_is_named_without_its_query(caplog):
    addon = GatewayLog()
    f = tflow.tflow(req=tutils.treq(host="api.anthropic.com", port=443, scheme=b"https", path=b"/api/oauth?token=s3cret"))
    f.error = mflow.Error("[Errno -2] Name or service not known\n[00:00:00.000] forged")
    with taddons.context(addon), caplog.at_level(logging.WARNING):
        addon.error(f)
    assert ("failed: GET https://api.anthropic.com:443/api/oauth: [Errno -2] Name or service not known\\n"
            "[00:00:00.000] forged") in caplog.text
    assert "s3cret" not in caplog.text


def test_api_exchanges_are_left_to_their_usage_line(caplog):
    addon, router = GatewayLog(), ApiRouter(rule_file())
    f = api_flow()
    with taddons.context(addon, router), caplog.at_level(logging.WARNING):
        router.requestheaders(f)
        f.error = mflow.Error("connection refused")
        addon.error(f)
    assert "failed:" not in caplog.text
