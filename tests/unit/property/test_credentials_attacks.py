"""Key custody under attack: what an agent running untrusted code can send to get the upstream key sent where it
should not go, or onto the wire in clear, and what reaches the gateway's log from such a request."""

from __future__ import annotations

import logging

import pytest
from mitmproxy.net.http import http1
from mitmproxy.test import taddons

from gwtest import api_flow
from llm_gateway.pipeline import exchange
from unit.policy.test_credentials import KEY, TOKEN_A, Chain, creds_rules
from unit.policy.test_credentials import chain  # noqa: F401  (the fixture: routing, detection, custody)


def custody_of(chain, flow):
    chain.run("requestheaders", flow)
    chain.run("request", flow)
    return flow


def wire(flow) -> bytes:
    return http1.assemble_request_head(flow.request)


@pytest.mark.parametrize("path", [
    "/v1/messages/../files",  # the API path glob `/v1/messages/*` matches; the server resolves it to /v1/files
    "/v1/messages/./../../v1/files?x=1",
    "/v1/messages/%2e%2e/files",  # the same, percent-encoded
    "/v1/messages/%2E%2E%2Ffiles",
    "/v1/messages/..%2ffiles",
    "/v1/messages/..\\files",
    "/v1/messages/..",
    "/v1/messages/..;/files",  # servlet-style path parameters: `..;` is `..` to them
    "/v1/messages/%252e%252e/files",  # encoded twice, for an upstream behind a decoding proxy
])
def test_a_dot_segment_path_never_gets_the_upstream_key(chain, path):
    """A gateway token grants the API paths of the rules, not every endpoint the upstream key can reach."""
    f = custody_of(chain, api_flow(path=path, headers={"x-api-key": TOKEN_A}))
    assert exchange.of(f) is not None  # it matched an API path glob
    assert KEY.encode() not in wire(f) and TOKEN_A.encode() not in wire(f)
    assert f.response is not None and f.response.status_code == 400
    assert f.response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens", "/v1/messages/batches?limit=2",
                                  "/v1/messages/a..b", "/v1/messages/.well"])
def test_ordinary_api_paths_still_get_it(chain, path):
    f = custody_of(chain, api_flow(path=path, headers={"x-api-key": TOKEN_A}))
    assert f.response is None and f"x-api-key: {KEY}\r\n".encode() in wire(f)


def test_the_upstream_key_never_goes_out_in_clear_to_a_host_the_agent_chose(chain):
    """Egress mode, plain HTTP through the proxy (`POST http://api.anthropic.com/v1/messages`, or to port 443):
    the agent picks scheme and port; the key would cross the network unencrypted."""
    for port in (80, 443):
        f = api_flow(headers={"x-api-key": TOKEN_A})
        f.request.scheme, f.request.port = "http", port
        custody_of(chain, f)
        assert KEY.encode() not in wire(f)
        assert f.response is not None and f.response.status_code == 400


def test_a_route_or_reverse_target_chosen_by_the_operator_may_be_plain_http(tmp_path, monkeypatch):
    (tmp_path / "k").write_text(KEY)
    monkeypatch.setenv("LLMGW_TEST_ALT_KEY", "sk-alt-key")
    route = "routes:\n  - {match: {host: api.anthropic.com}, upstream: 'http://127.0.0.1:9'}\n"
    c = Chain(creds_rules(tmp_path / "k", extra=route))
    with taddons.context(*c.parts):
        c.custody.load(None)
        c.custody._sync()
        f = custody_of(c, api_flow(headers={"x-api-key": TOKEN_A}))
        assert f.response is None and f.request.scheme == "http" and f"x-api-key: {KEY}\r\n".encode() in wire(f)
        f = api_flow(mode="reverse", headers={"x-api-key": TOKEN_A})
        f.request.scheme, f.request.port = "http", 80  # reverse:http://… : the operator's choice
        custody_of(c, f)
        assert f.response is None and f"x-api-key: {KEY}\r\n".encode() in wire(f)


def test_the_refusal_log_line_escapes_what_the_request_sent(chain, caplog):
    with caplog.at_level(logging.INFO):
        custody_of(chain, api_flow(path="/v1/messages/\x1b[31mred\u2028x", headers={"x-api-key": "llmgw-wrong"}))
        f = api_flow(path="/v1/messages/../x", headers={"x-api-key": TOKEN_A})
        f.request.method = "\x1b[2JPOST"  # mitmproxy's HTTP/1 reader takes any method without whitespace
        custody_of(chain, f)
        f = api_flow(headers={"x-api-key": "llmgw-wrong"})
        f.request.method = "\x1b[2JPOST"
        custody_of(chain, f)
    assert caplog.text.count("refused") == 2 and "no upstream key for" in caplog.text
    assert "\x1b" not in caplog.text and "\u2028" not in caplog.text


@pytest.mark.parametrize("host, path", [
    ("api.anthropic.com", "/v1/messages"),  # an API path: refused (no token in a header), and masked
    ("api.anthropic.com", "/api/claude_code/settings"),  # an API host, another path
    ("example.com", "/collect"),  # anywhere else: the token is for the gateway only
])
def test_a_token_in_the_query_string_is_masked_in_the_flow(chain, host, path):
    """A misconfigured client (or a curious agent) sends `?x-api-key=<token>`: the flow (mitmweb, `-w` files),
    the exchange's path (log lines) and the wire never carry it."""
    f = api_flow(host=host, path=f"{path}?beta=true&x-api-key={TOKEN_A}")
    chain.run("requestheaders", f)
    chain.run("request", f)
    assert TOKEN_A not in f.request.path and TOKEN_A.encode() not in wire(f)
    assert f.request.query["beta"] == "true" and "masked by the gateway" in f.request.query["x-api-key"]
    ex = exchange.of(f)
    assert ex is None or TOKEN_A not in ex.path
    if path == "/v1/messages":
        assert f.response.status_code == 401


def test_a_query_without_tokens_is_left_as_sent(chain):
    f = api_flow(path="/v1/messages?beta=true&a=%2Fb", headers={"x-api-key": TOKEN_A})
    chain.run("requestheaders", f)
    chain.run("request", f)
    assert f.request.path == "/v1/messages?beta=true&a=%2Fb" and f.response is None


def test_without_its_wire_wrapping_the_gateway_forwards_no_credential(chain):
    """`mitm/serializers.install` failed (a mitmproxy without those serialisers): API requests are answered, not
    forwarded with a placeholder, and a pass-through credential off the API paths is not forwarded either."""
    chain.custody.wire_ready = False
    f = custody_of(chain, api_flow(headers={"x-api-key": TOKEN_A}))
    assert f.response.status_code == 500 and KEY.encode() not in wire(f) and TOKEN_A.encode() not in wire(f)
    f = custody_of(chain, api_flow(path="/api/oauth/profile", headers={
        "authorization": "Bearer sk-ant-oat01-x", "anthropic-beta": "oauth-1"}))
    assert "authorization" not in f.request.headers and b"sk-ant-oat01-x" not in wire(f)


def test_mint_prints_a_line_that_means_what_was_asked():
    """`--client` takes any client name of the rules (they may hold spaces or `#`): quoted where needed, so the
    printed line parses into exactly that; `--upstream` is a credentials.upstream name and is checked as one."""
    import yaml

    from llm_gateway.policy import credentials as policy_credentials
    from llm_gateway.policy import spec

    for client in ("claude-code", "claude code #1", "x, upstream: other}"):
        token, line = policy_credentials.mint("a", client=client)
        [entry] = yaml.safe_load(line)
        assert entry == {"name": "a", "sha256": spec.token_hash(token), "client": client}
    with pytest.raises(ValueError, match="upstream"):
        policy_credentials.mint("a", upstream="main}, client: x")


def test_the_log_says_why_a_refused_api_request_lost_its_credential(chain, caplog):
    """The egress policy refused a request to the API path (domain fronting): the log must not call
    `/v1/messages` "not an API path", which sends whoever reads it looking at the wrong rule."""
    from mitmproxy import http

    f = api_flow(headers={"x-api-key": TOKEN_A})
    f.response = http.Response.make(403, b"refused")  # as EgressPolicy answers, before routing and custody
    with caplog.at_level(logging.INFO):
        chain.run("requestheaders", f)
    assert "x-api-key" not in f.request.headers
    assert "not an API path" not in caplog.text and "answered by the gateway" in caplog.text


@pytest.mark.parametrize("path", ["/v1/messages", "/api/oauth/profile"])
def test_a_pass_through_rule_passes_only_the_credential_it_matched(chain, path):
    """The rule lets subscription OAuth bearers through; an `x-api-key` sent beside one (an agent's own key, a
    guess) is not what the rule admitted, and goes no further."""
    own = "sk-ant-api03-agents-own-key"
    f = custody_of(chain, api_flow(path=path, headers={
        "x-api-key": own, "authorization": "Bearer sk-ant-oat01-x", "anthropic-beta": "oauth-2025-04-20"}))
    assert f.response is None and b"authorization: Bearer sk-ant-oat01-x\r\n" in wire(f)
    assert own.encode() not in wire(f) and b"x-api-key" not in wire(f) and own not in str(f.request.headers)
