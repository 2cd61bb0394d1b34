"""API flow recognition and routing, in both modes."""

from mitmproxy.test import taddons, tflow

from gwtest import api_flow, call, rule_file
from llm_gateway.addons.bodies import BodyLimit
from llm_gateway.pipeline import exchange
from llm_gateway.addons.routing import ApiRouter

ROUTED = """\
apis:
  - name: anthropic
    hosts: [api.anthropic.com]
    paths: ["/v1/messages", "/anthropic/v1/messages"]
routes:
  - match: {host: api.anthropic.com, mode: regular}
    upstream: http://127.0.0.1:4000/anthropic
  - match: {path: "/v1/messages"}
    upstream: https://other.example:8443
"""


def run(router, flow):
    bodies = BodyLimit()  # reads the body, after routing
    router.requestheaders(flow)
    bodies.requestheaders(flow)
    router.request(flow)
    call(bodies.request, flow)
    return exchange.of(flow)


def test_api_flow_gets_an_exchange_and_buffered_body():
    router = ApiRouter(rule_file())
    with taddons.context(router):
        f = api_flow(path="/v1/messages?beta=true")
        f.request.stream = True
        ex = run(router, f)
        assert ex is not None and ex.api == "anthropic" and ex.mode == "regular"
        assert f.request.stream is False
        assert ex.body["model"] == "claude-x" and ex.model == "claude-x"
        assert ex.upstream == "https://api.anthropic.com:443"
        assert f.metadata["gateway"]["api"] == "anthropic"


def test_non_api_flows_are_left_alone():
    router = ApiRouter(rule_file())
    with taddons.context(router):
        for f in (api_flow(host="github.com"), api_flow(path="/api/hello"), tflow.tflow()):
            before = f.request.get_state()
            assert run(router, f) is None
            assert f.request.get_state() == before
            assert "gateway" not in f.metadata


def test_host_matching_ignores_case_and_trailing_dot():
    router = ApiRouter(rule_file())
    with taddons.context(router):
        assert run(router, api_flow(host="API.Anthropic.COM.")) is not None


def test_route_rewrites_destination_prefix_and_host_header():
    router = ApiRouter(rule_file(ROUTED))
    with taddons.context(router):
        f = api_flow(path="/v1/messages?beta=true")
        ex = run(router, f)
        assert (f.request.scheme, f.request.host, f.request.port) == ("http", "127.0.0.1", 4000)
        assert f.request.path == "/anthropic/v1/messages?beta=true"
        assert f.request.host_header == "127.0.0.1:4000"
        assert ex.upstream == "http://127.0.0.1:4000/anthropic"
        assert ex.host == "api.anthropic.com" and ex.path == "/v1/messages?beta=true"


def test_routes_first_match_wins_and_mode_matters():
    router = ApiRouter(rule_file(ROUTED))
    with taddons.context(router):
        f = api_flow(mode="reverse")
        run(router, f)
        assert (f.request.scheme, f.request.host, f.request.port) == ("https", "other.example", 8443)
        assert f.request.host_header == "other.example:8443"


def test_garbage_body_is_no_problem():
    router = ApiRouter(rule_file())
    with taddons.context(router):
        for body in (b"", b"not json", b"\xff\xfe", b"[1,2]", b"{" * 100000):
            f = api_flow(body=body)
            ex = run(router, f)
            assert ex is not None and ex.model is None
            assert f.request.content == body


def test_base_url_listener_takes_api_paths_whatever_its_reverse_target():
    """`scripts/gateway --upstream http://litellm:4000`: the reverse target is no API host, yet every request
    at an API path on that listener is an API exchange; in egress mode the host still counts."""
    router = ApiRouter(rule_file())
    with taddons.context(router):
        ex = run(router, api_flow(mode="reverse", host="litellm"))
        assert ex is not None and (ex.api, ex.mode, ex.host) == ("anthropic", "reverse", "litellm")
        assert run(router, api_flow(mode="reverse", host="litellm", path="/api/hello")) is None
        assert run(router, api_flow(mode="regular", host="litellm")) is None
