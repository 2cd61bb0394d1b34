"""The egress policy, hook by hook: every decision, the no-bypass normal forms, and the records."""

from __future__ import annotations

import json
import logging
import ssl

import pytest
from mitmproxy import ctx, tls
from mitmproxy.proxy import context as pcontext
from mitmproxy.proxy import layers
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

from gwtest import rule_file
from llm_gateway.addons import egress as addons_egress
from llm_gateway.policy import egress as policy_egress
from llm_gateway.addons.egress import EgressPolicy
from llm_gateway.policy.egress import blocked_by, judge
from llm_gateway.protocol.hosts import ip_literal, normalize_host, path_forms
from llm_gateway.addons.recordlog import RecordLog
from llm_gateway.addons.routing import ApiRouter
from llm_gateway.pipeline import exchange
from llm_gateway.policy import rules as rules_mod

RULES = """\
apis:
  - name: anthropic
    hosts: [api.anthropic.com]
    paths: ["/v1/messages", "/v1/messages/*"]
egress:
  default: deny
  allow:
    - "*.github.com"
    - packages.example.com:443
    - 10.1.2.3
    - api.anthropic.com
  inspect:
    - api.anthropic.com
  block:
    - {host: api.anthropic.com, path: "/api/*"}
  record_allowed: each                   # one record per decision (the parser's default), said explicitly
usage:
  log: "-"
"""
SOURCE = "test-rules.yaml"
NO_API = RULES.replace("    - api.anthropic.com\n  inspect:\n    - api.anthropic.com\n", "  inspect: []\n")  # API host denied


@pytest.fixture
def policy(tmp_path):
    log = tmp_path / "records.jsonl"
    records = RecordLog()
    pol = EgressPolicy(rule_file(RULES), records)
    with taddons.context(records, pol) as tctx:
        tctx.configure(records, gateway_log=str(log))
        pol.log_path = log
        yield pol


def records_of(pol) -> list[dict]:
    return [json.loads(line) for line in pol.log_path.read_text().splitlines()] if pol.log_path.exists() else []


def connect_flow(host: str, port: int = 443, *, mode: str = "regular"):
    req = tutils.treq(method=b"CONNECT", scheme=b"", host=host, port=port, path=b"", authority=f"{host}:{port}".encode())
    f = tflow.tflow(req=req)
    f.client_conn.proxy_mode = ProxyMode.parse(mode)
    f.client_conn.sni = None
    return f


def inner_flow(connect, path: str = "/v1/messages", *, host_header: str | None = None, sni: str | None = "same",
               method: str = "POST", headers: dict[str, str] | None = None):
    """A decrypted request inside the tunnel `connect` opened (same client and server connection)."""
    host = connect.request.host
    req = tutils.treq(scheme=b"https", host=host, port=connect.request.port, path=path.encode(), method=method.encode(),
                      content=b'{"model":"m","max_tokens":1,"messages":[]}', authority=b"")
    req.headers["host"] = host_header if host_header is not None else host
    for k, v in (headers or {}).items():
        req.headers[k] = v
    f = tflow.tflow(req=req)
    f.client_conn = connect.client_conn
    f.server_conn = connect.server_conn
    f.client_conn.sni = host if sni == "same" else sni
    return f


def plain_flow(url_host: str, path: str = "/", *, port: int = 80, host_header: str | None = None, headers=None):
    req = tutils.treq(scheme=b"http", host=url_host, port=port, path=path.encode(), method=b"GET", content=b"")
    req.headers["host"] = host_header if host_header is not None else url_host
    for k, v in (headers or {}).items():
        req.headers[k] = v
    f = tflow.tflow(req=req)
    f.client_conn.sni = None
    return f


def client_hello(sni: str | None) -> tls.ClientHello:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = parse_client_hello(outgoing.read())
    assert hello is not None
    return hello


def hello_data(connect, sni: str | None) -> tls.ClientHelloData:
    context = pcontext.Context(connect.client_conn, ctx.options)
    context.server = connect.server_conn
    data = tls.ClientHelloData(context, client_hello(sni))
    data.establish_server_tls_first = True  # as mitmproxy's tlsconfig sets it with connection_strategy=eager
    return data


# --- judging ------------------------------------------------------------------------------------


def test_host_normal_form():
    assert normalize_host("API.Anthropic.COM.") == "api.anthropic.com"
    assert normalize_host("[::1]") == "::1"
    assert normalize_host("host..") == "host"


@pytest.mark.parametrize(
    "spelling", ["127.0.0.1", "127.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1", "0x7f000001"]
)
def test_every_spelling_of_an_ipv4_address_is_an_ip_literal(spelling):
    assert ip_literal(spelling) == "127.0.0.1"


def test_ip_literals_and_names():
    assert ip_literal("::1") == "::1"
    assert ip_literal("0:0:0:0:0:0:0:1") == "::1"
    assert ip_literal("fe80::1%eth0") == "fe80::1"
    for name in ("github.com", "deadbeef", "cafe.beef", "1password.com", "a1.b2"):
        assert ip_literal(name) is None


def egress_rules(text: str = RULES):
    return rules_mod.parse(text, SOURCE).egress


@pytest.mark.parametrize(
    "host, port, allowed, inspect, rule",
    [
        ("api.anthropic.com", 443, True, True, "egress.inspect[0]: api.anthropic.com"),
        ("api.github.com", 443, True, False, "egress.allow[0]: *.github.com"),
        ("a.b.github.com", 22, True, False, "egress.allow[0]: *.github.com"),
        ("github.com", 443, False, False, "egress.default: deny"),  # *.github.com is not github.com
        ("packages.example.com", 443, True, False, "egress.allow[1]: packages.example.com:443"),
        ("packages.example.com", 80, False, False, "egress.default: deny"),
        ("evil.example", 443, False, False, "egress.default: deny"),
        ("10.1.2.3", 443, True, False, "egress.allow[2]: 10.1.2.3"),
        ("10.1.515", 443, True, False, "egress.allow[2]: 10.1.2.3"),  # another spelling of the same address
        ("10.1.2.4", 443, False, False, "IP address not listed in egress.allow or egress.inspect"),
        ("api.github.com\x00.evil", 443, False, False, "not a valid host name"),
        ("evil.com/.github.com", 443, False, False, "not a valid host name"),
        ("", 443, False, False, "not a valid host name"),
    ],
)
def test_judge(host, port, allowed, inspect, rule):
    assert judge(egress_rules(), host, port) == policy_egress.Verdict(allowed, inspect, rule)


def test_default_allow_still_denies_unlisted_ip_addresses():
    e = egress_rules("egress:\n  default: allow\n  allow: ['*']\n")
    assert judge(e, "anything.example", 443) == policy_egress.Verdict(True, False, "egress.allow[0]: *")
    assert judge(e, "192.168.0.1", 443).allowed is False
    assert judge(e, "2130706433", 443).allowed is False
    assert judge(e, "::1", 443).allowed is False
    e = egress_rules("egress:\n  default: allow\n")
    assert judge(e, "x.example", 8080) == policy_egress.Verdict(True, False, "egress.default: allow")
    assert judge(e, "10.0.0.1", 80).allowed is False


def test_inspect_implies_allow():
    e = egress_rules("egress:\n  default: deny\n  inspect: [api.example.com]\n")
    assert judge(e, "api.example.com", 443) == policy_egress.Verdict(True, True, "egress.inspect[0]: api.example.com")


def test_path_forms_resolve_encoding_and_dot_segments():
    assert path_forms("/api/x?token=1") == {"/api/x"}
    assert "/api/x" in path_forms("/%61pi/x")
    assert "/api/x" in path_forms("/%2561pi/x")
    assert "/api/x" in path_forms("//api//x")
    assert "/api/x" in path_forms("/v1/../api/./x")
    assert "/api/" in path_forms("/api/")


@pytest.mark.parametrize("path", ["/api/event_logging/batch", "/%61pi/x", "/v1/../api/x", "//api/x", "/API/x?y=1"])
def test_blocked_paths(path):
    assert blocked_by(egress_rules(), "api.anthropic.com", path) == "egress.block[0]: api.anthropic.com /api/*"


def test_not_blocked():
    assert blocked_by(egress_rules(), "api.anthropic.com", "/v1/messages?api/x") is None
    assert blocked_by(egress_rules(), "api.github.com", "/api/x") is None


# --- CONNECT ------------------------------------------------------------------------------------


def test_connect_to_inspected_host_is_allowed_and_normalized(policy):
    f = connect_flow("API.Anthropic.COM.")
    policy.http_connect(f)
    assert f.response is None
    assert f.request.host == "api.anthropic.com"  # mitmproxy connects to exactly what was judged
    tunnel = policy.tunnels[f.server_conn]
    assert (tunnel.host, tunnel.port, tunnel.inspect, tunnel.refused) == ("api.anthropic.com", 443, True, None)
    [rec] = records_of(policy)
    assert rec == {
        "kind": "egress", "ts": rec["ts"], "decision": "allowed", "method": "CONNECT", "host": "api.anthropic.com",
        "port": 443, "path": None, "rule": "egress.inspect[0]: api.anthropic.com", "client_ip": "127.0.0.1",
    }


def test_connect_to_allowed_host_is_tunnelled_untouched(policy):
    f = connect_flow("Api.GitHub.com.")
    policy.http_connect(f)
    assert f.response is None
    [rec] = records_of(policy)
    assert rec["decision"] == "tunnelled" and rec["rule"] == "egress.allow[0]: *.github.com"
    data = hello_data(f, "API.github.com")
    policy.tls_clienthello(data)
    assert data.ignore_connection is True
    assert len(records_of(policy)) == 1  # no record per TLS handshake


def test_inspected_tunnel_is_decrypted(policy):
    f = connect_flow("api.anthropic.com")
    policy.http_connect(f)
    data = hello_data(f, "api.anthropic.com")
    policy.tls_clienthello(data)
    assert data.ignore_connection is False
    assert data.establish_server_tls_first is True  # left as mitmproxy's tlsconfig set it


@pytest.mark.parametrize("host", ["evil.example", "EVIL.example.", "github.com"])
def test_denied_connect_gets_403_naming_host_and_rule(policy, host):
    f = connect_flow(host)
    policy.http_connect(f)
    assert f.response.status_code == 403
    text = f.response.get_text()
    assert normalize_host(host) + ":443" in text and SOURCE not in text and "egress.default: deny" in text
    assert f.server_conn not in policy.tunnels
    [rec] = records_of(policy)
    assert (rec["decision"], rec["host"], rec["rule"]) == ("denied", normalize_host(host), "egress.default: deny")


@pytest.mark.parametrize("host", ["127.0.0.1", "2130706433", "10.1.2.4", "::1"])
def test_ip_literal_connect_denied_unless_listed(policy, host):
    f = connect_flow(host)
    policy.http_connect(f)
    assert f.response.status_code == 403
    assert records_of(policy)[0]["rule"] == "IP address not listed in egress.allow or egress.inspect"


def test_listed_ip_literal_is_allowed_in_canonical_form(policy):
    f = connect_flow("10.1.515")
    policy.http_connect(f)
    assert f.response is None and f.request.host == "10.1.2.3"
    assert records_of(policy)[0]["decision"] == "tunnelled"


def test_denied_api_host_tunnel_is_accepted_only_to_answer_permission_error(tmp_path):
    records = RecordLog()
    pol = EgressPolicy(rule_file(NO_API), records)
    with taddons.context(records, pol) as tctx:
        tctx.configure(records, gateway_log=str(tmp_path / "r.jsonl"))
        pol.log_path = tmp_path / "r.jsonl"
        f = connect_flow("api.anthropic.com")
        pol.http_connect(f)
        # a 200 of our own: mitmproxy opens no connection to the denied host, even with connection_strategy=eager
        assert f.response.status_code == 200 and f.response.headers.fields == ()
        data = hello_data(f, "api.anthropic.com")
        pol.tls_clienthello(data)
        assert data.ignore_connection is False and data.establish_server_tls_first is False
        inner = inner_flow(f)
        pol.requestheaders(inner)
        assert inner.response.status_code == 403
        body = json.loads(inner.response.content)
        assert body["type"] == "error" and body["error"]["type"] == "permission_error"
        assert "api.anthropic.com" in body["error"]["message"] and SOURCE not in body["error"]["message"]
        assert inner.response.headers["content-type"] == "application/json"
        other = inner_flow(f, "/api/hello")  # not an API path: the plain 403
        pol.requestheaders(other)
        assert other.response.status_code == 403 and other.response.headers["content-type"].startswith("text/plain")
        assert [r["decision"] for r in records_of(pol)] == ["denied", "denied", "denied"]
        assert [r["path"] for r in records_of(pol)] == [None, "/v1/messages", "/api/hello"]


def test_refused_tunnels_never_connect_and_stay_refused(policy):
    from mitmproxy.proxy.server_hooks import ServerConnectionHookData

    policy.rule_file.rules = rules_mod.parse(NO_API, SOURCE)
    denied, allowed = tunnel(policy), tunnel(policy, "api.github.com")
    for f in (denied, allowed):
        policy.server_connect(ServerConnectionHookData(f.server_conn, f.client_conn))
    assert denied.server_conn.error == "refused by the egress policy (denied api.anthropic.com:443)"
    assert allowed.server_conn.error is None
    policy.rule_file.rules = rules_mod.parse(RULES, SOURCE)  # the host is allowed now...
    inner = inner_flow(denied)
    policy.requestheaders(inner)
    assert inner.response.status_code == 403  # ...for the client's next connection, not this tunnel
    assert records_of(policy)[-1]["rule"] == "egress.default: deny"


def test_connect_inside_a_tunnel_is_refused(policy):
    outer = connect_flow("api.anthropic.com")
    policy.http_connect(outer)
    nested = connect_flow("api.github.com")
    nested.client_conn, nested.server_conn = outer.client_conn, outer.server_conn
    policy.http_connect(nested)
    assert nested.response.status_code == 403
    assert records_of(policy)[-1]["rule"] == "CONNECT inside a tunnel"


def test_other_modes_are_not_affected(policy):
    f = connect_flow("evil.example", mode="upstream:http://proxy.example:3128")
    policy.http_connect(f)
    assert f.response is None
    r = plain_flow("evil.example")
    r.client_conn.proxy_mode = ProxyMode.parse("reverse:https://api.anthropic.com")
    policy.requestheaders(r)
    assert r.response is None
    assert records_of(policy) == []


# --- TLS ClientHello: SNI fronting ---------------------------------------------------------------


def test_sni_of_another_host_in_an_untouched_tunnel_is_decrypted_to_be_refused(policy):
    f = connect_flow("api.github.com")
    policy.http_connect(f)
    data = hello_data(f, "evil.example")
    policy.tls_clienthello(data)
    assert data.ignore_connection is False and data.establish_server_tls_first is False
    assert policy.tunnels[f.server_conn].refused == "fronting"
    assert f.server_conn.sni == "api.github.com"  # a server handshake (eager mode) names the CONNECT target
    rec = records_of(policy)[-1]
    assert (rec["decision"], rec["host"], rec["sni"], rec["method"]) == ("fronting", "api.github.com", "evil.example", "TLS")
    inner = inner_flow(f, "/", sni="evil.example", method="GET")
    policy.requestheaders(inner)
    assert inner.response.status_code == 403 and "domain fronting" in inner.response.get_text()


def test_sni_of_another_host_in_an_inspected_tunnel_never_reaches_a_server(policy):
    f = connect_flow("api.anthropic.com")
    policy.http_connect(f)
    data = hello_data(f, "evil.example")
    policy.tls_clienthello(data)
    assert data.ignore_connection is False and data.establish_server_tls_first is False
    assert records_of(policy)[-1]["decision"] == "fronting"


def test_no_sni_is_not_fronting(policy):
    f = connect_flow("10.1.2.3")
    policy.http_connect(f)
    data = hello_data(f, None)
    policy.tls_clienthello(data)
    assert data.ignore_connection is True


# --- requests inside a decrypted tunnel ------------------------------------------------------------


def tunnel(policy, host="api.anthropic.com"):
    f = connect_flow(host)
    policy.http_connect(f)
    return f


def test_allowed_request_inside_tunnel_passes_without_a_record(policy):
    f = tunnel(policy, "API.ANTHROPIC.COM.")
    inner = inner_flow(f, "/v1/messages?beta=true", host_header="Api.Anthropic.Com:443", sni="api.anthropic.com.")
    policy.requestheaders(inner)
    assert inner.response is None
    assert len(records_of(policy)) == 1  # only the CONNECT's


@pytest.mark.parametrize("header", ["evil.example", "evil.example:443", "[::1]", "api.github.com"])
def test_host_header_of_another_host_is_refused(policy, header):
    f = tunnel(policy)
    inner = inner_flow(f, host_header=header)
    router = ApiRouter(policy.rule_file)
    policy.requestheaders(inner)
    router.requestheaders(inner)
    assert inner.response.status_code == 403
    assert exchange.of(inner) is None  # never routed, never counted
    body = json.loads(inner.response.content)  # /v1/messages on the API host: native error
    assert body["error"]["type"] == "permission_error" and "domain fronting" in body["error"]["message"]
    rec = records_of(policy)[-1]
    assert rec["decision"] == "fronting" and rec["host"] == "api.anthropic.com"
    assert rec["host_header"] == normalize_host(policy_egress.host_of_header(header))
    assert rec["rule"] == "Host header differs from the CONNECT target"


def test_absolute_form_target_of_another_host_inside_tunnel_is_refused(policy):
    """RFC 9112 §3.2.2: a server takes an absolute-form target's authority over the Host header."""
    f = tunnel(policy)
    inner = inner_flow(f, "/v1/models", method="GET")
    inner.request.authority = "Evil.Example.:443"
    policy.requestheaders(inner)
    assert inner.response.status_code == 403 and b"domain fronting" in inner.response.content
    assert inner.response.headers["x-gateway-egress"].startswith("fronting: refused api.anthropic.com:443/v1/models")
    rec = records_of(policy)[-1]
    assert (rec["decision"], rec["host_header"], rec["rule"]) == (
        "fronting", "evil.example", "request target differs from the CONNECT target")


@pytest.mark.parametrize("host_header", ["api.anthropic.com", None])
def test_absolute_form_target_of_the_tunnel_host_goes_upstream_in_origin_form(policy, host_header):
    f = tunnel(policy)
    inner = inner_flow(f, "/v1/models", method="GET")
    inner.request.authority = "API.anthropic.com"
    if host_header is None:
        del inner.request.headers["host"]
    policy.requestheaders(inner)
    assert inner.response is None
    assert inner.request.authority == "" and inner.request.host_header == "api.anthropic.com"


def test_host_header_and_sni_upstream_are_the_normal_form(policy):
    f = tunnel(policy, "API.Anthropic.COM.")
    inner = inner_flow(f, "/v1/models", host_header="API.Anthropic.COM.:443", sni="API.Anthropic.COM.", method="GET")
    policy.requestheaders(inner)
    assert inner.response is None and inner.request.host_header == "api.anthropic.com:443"
    with taddons.context(policy):
        data = hello_data(f, "API.Anthropic.COM.")
        policy.tls_clienthello(data)
    assert data.context.server.sni == "api.anthropic.com" and not data.ignore_connection


def test_refusal_header_is_one_escaped_ascii_line(policy):
    inner = inner_flow(tunnel(policy), "/api/caf\u00e9\x1b[2J", method="GET")
    policy.requestheaders(inner)
    value = inner.response.headers["x-gateway-egress"]
    assert value.isascii() and value.isprintable() and "\\x1b" in value


def test_sni_differing_inside_tunnel_is_refused(policy):
    f = tunnel(policy)
    inner = inner_flow(f, "/", sni="evil.example", method="GET")
    policy.requestheaders(inner)
    assert inner.response.status_code == 403
    assert records_of(policy)[-1]["sni"] == "evil.example"


@pytest.mark.parametrize("path", ["/api/event_logging/batch", "/%61pi/x?x=1", "/v1/../api/x"])
def test_blocked_path_inside_tunnel(policy, path):
    f = tunnel(policy)
    inner = inner_flow(f, path)
    inner.request.stream = True  # stream_large_bodies may have turned it on
    policy.requestheaders(inner)
    assert inner.response.status_code == 403 and inner.request.stream is False
    text = inner.response.get_text()
    assert "egress.block[0]: api.anthropic.com /api/*" in text and SOURCE not in text
    rec = records_of(policy)[-1]
    assert rec["decision"] == "blocked" and rec["path"] == path.split("?")[0]
    assert inner.metadata["gateway_egress"]["decision"] == "blocked"  # mitmweb marks it


def test_rules_reloaded_mid_tunnel_apply_to_its_next_request(policy):
    f = tunnel(policy)
    policy.rule_file.rules = rules_mod.parse(RULES.replace("  inspect:\n    - api.anthropic.com\n", "  inspect: []\n")
                                             .replace("    - api.anthropic.com\n", ""), SOURCE)
    inner = inner_flow(f)
    policy.requestheaders(inner)
    assert inner.response.status_code == 403
    assert records_of(policy)[-1]["decision"] == "denied"


def test_records_and_answers_hold_no_secrets(policy):
    f = tunnel(policy)
    inner = inner_flow(f, "/api/x?key=sk-ant-secret-in-query", headers={
        "x-api-key": "sk-ant-secret-key", "authorization": "Bearer sk-ant-secret-bearer", "cookie": "s=sk-ant-secret-cookie",
    })
    policy.requestheaders(inner)
    assert inner.response.status_code == 403
    written = policy.log_path.read_text()
    assert "sk-ant-secret" not in written and "sk-ant-secret" not in inner.response.get_text()


# --- plain HTTP -----------------------------------------------------------------------------------


def test_plain_http_denied_names_host_and_rule(policy):
    f = plain_flow("Evil.Example.", "/x?token=abc")
    policy.requestheaders(f)
    assert f.response.status_code == 403
    text = f.response.get_text()
    assert "evil.example:80" in text and SOURCE not in text and "token" not in text
    rec = records_of(policy)[-1]
    assert (rec["decision"], rec["method"], rec["host"], rec["port"], rec["path"]) == ("denied", "GET", "evil.example", 80, "/x")
    assert f.metadata["gateway_egress"] == {"decision": "denied", "host": "evil.example", "port": 80, "rule": rec["rule"]}


def test_plain_http_allowed_is_recorded_and_normalized(policy):
    f = plain_flow("Api.GitHub.com.", "/repos")
    policy.requestheaders(f)
    assert f.response is None and f.request.host == "api.github.com"
    rec = records_of(policy)[-1]
    assert (rec["decision"], rec["path"], rec["rule"]) == ("allowed", "/repos", "egress.allow[0]: *.github.com")


def test_plain_http_ip_literal_denied(policy):
    f = plain_flow("127.0.0.1")
    policy.requestheaders(f)
    assert f.response.status_code == 403


def test_plain_http_host_header_fronting(policy):
    f = plain_flow("api.github.com", host_header="evil.example")
    policy.requestheaders(f)
    assert f.response.status_code == 403
    assert records_of(policy)[-1]["rule"] == "Host header differs from the request target"


def test_plain_http_to_api_host_blocked_api_path_gets_native_error(policy):
    f = plain_flow("api.anthropic.com", "/v1/messages", port=80)
    policy.rule_file.rules = rules_mod.parse(RULES.replace('path: "/api/*"', 'path: "/v1/messages*"'), SOURCE)
    policy.requestheaders(f)
    assert f.response.status_code == 403
    assert json.loads(f.response.content)["error"]["type"] == "permission_error"


# --- next_layer -----------------------------------------------------------------------------------


class FakeNextLayer:
    def __init__(self, context, data: bytes, preset=None):
        self.context = context
        self._data = data
        self.layer = preset

    def data_client(self) -> bytes:
        return self._data


def next_layer_for(policy, f, data: bytes, preset_factory=None):
    context = pcontext.Context(f.client_conn, ctx.options)
    context.server = f.server_conn
    preset = preset_factory(context) if preset_factory else None
    nl = FakeNextLayer(context, data, preset)
    policy.next_layer(nl)  # type: ignore[arg-type]
    return nl


def test_untouched_tunnel_without_tls_is_relayed_raw(policy):
    f = tunnel(policy, "api.github.com")
    nl = next_layer_for(policy, f, b"GET / HTTP/1.1\r\nHost: evil\r\n\r\n",
                        lambda c: layers.HttpLayer(c, layers.http.HTTPMode.transparent))
    assert isinstance(nl.layer, layers.TCPLayer) and nl.layer.flow is None  # ignore=True: no flow
    assert nl.context.layers == [nl.layer]  # mitmproxy's own choice is off the stack


def test_untouched_tunnel_with_tls_is_left_to_tls_clienthello(policy):
    f = tunnel(policy, "api.github.com")
    nl = next_layer_for(policy, f, b"\x16\x03\x01\x02\x00\x01")
    assert nl.layer is None


def test_refused_tunnel_never_relays_raw_bytes(policy):
    f = tunnel(policy)
    policy.tunnels[f.server_conn].refused = "fronting"
    nl = next_layer_for(policy, f, b"SSH-2.0-x\r\n", lambda c: layers.TCPLayer(c))
    assert isinstance(nl.layer, layers.HttpLayer)


def test_inspected_tunnel_and_other_connections_keep_mitmproxys_choice(policy):
    f = tunnel(policy)
    nl = next_layer_for(policy, f, b"SSH-2.0-x\r\n", lambda c: layers.TCPLayer(c))
    assert isinstance(nl.layer, layers.TCPLayer) and nl.layer.flow is not None
    plain = plain_flow("api.github.com")
    nl = next_layer_for(policy, plain, b"GET / HTTP/1.1\r\n")
    assert nl.layer is None


# --- log ------------------------------------------------------------------------------------------


def test_one_human_line_per_decision_and_one_warning_for_uninspected_api_hosts(tmp_path, caplog):
    text = RULES.replace("  inspect:\n    - api.anthropic.com\n", "  inspect: []\n")
    records = RecordLog()
    pol = EgressPolicy(rule_file(text), records)
    with taddons.context(records, pol) as tctx, caplog.at_level(logging.INFO, logger="llm_gateway.egress"):
        tctx.configure(records, gateway_log=str(tmp_path / "r.jsonl"))
        for _ in range(2):
            pol.http_connect(connect_flow("api.anthropic.com"))
        pol.http_connect(connect_flow("evil.example"))
    lines = [r.getMessage() for r in caplog.records if r.name == "llm_gateway.egress"]
    assert lines.count("egress tunnelled: CONNECT api.anthropic.com:443 (egress.allow[3]: api.anthropic.com) from 127.0.0.1") == 2
    assert sum("not in egress.inspect" in line for line in lines) == 1
    assert "egress denied: CONNECT evil.example:443 (egress.default: deny) from 127.0.0.1" in lines


def test_hooks_fail_closed(policy, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("bug")

    t = tunnel(policy, "api.github.com")
    monkeypatch.setattr(addons_egress, "canonical_host", broken)
    data = hello_data(t, "api.github.com")
    policy.tls_clienthello(data)
    assert data.ignore_connection is False and policy.tunnels[t.server_conn].refused == "denied"

    monkeypatch.setattr(addons_egress, "judge", broken)
    f = connect_flow("api.github.com")
    policy.http_connect(f)
    r = plain_flow("api.github.com")
    policy.requestheaders(r)
    assert f.response.status_code == 403 and r.response.status_code == 403
    assert "internal error" in r.response.get_text()
    assert sum("egress policy error" in rec.getMessage() for rec in caplog.records) == 3


def test_hooks_are_safe_on_flows_that_already_have_a_response(policy):
    f = connect_flow("evil.example")
    f.response = tutils.tresp()
    policy.http_connect(f)
    r = plain_flow("evil.example")
    r.response = tutils.tresp()
    policy.requestheaders(r)
    assert f.response.status_code == 200 and r.response.status_code == 200
    assert records_of(policy) == []


def test_allowed_decisions_are_summarised_and_refusals_recorded_each(tmp_path, caplog):
    """egress.record_allowed: summary (the default rules.yaml's): a Claude Code turn's ~20 allowed tunnels are one record per
    host and rule, with their count, written at stop (or every SUMMARY_EVERY seconds); every refusal is a record
    and a warning of its own, at once."""
    from llm_gateway.addons.metrics import Metrics

    log = tmp_path / "records.jsonl"
    records = RecordLog()
    metrics = Metrics(records)
    pol = EgressPolicy(rule_file(RULES.replace("record_allowed: each", "record_allowed: summary")), records)
    caplog.set_level(logging.DEBUG, logger="llm_gateway.egress")
    with taddons.context(records, pol) as tctx:
        tctx.configure(records, gateway_log=str(log))
        for _ in range(3):
            pol.http_connect(connect_flow("api.github.com"))
        for _ in range(2):
            pol.http_connect(connect_flow("api.anthropic.com"))
        pol.http_connect(connect_flow("evil.example"))
        written = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        assert [(r["decision"], r["host"]) for r in written] == [("denied", "evil.example")]  # the refusal, at once
        records.done()  # the gateway stops: the held counts are written before the log closes
    got = [json.loads(line) for line in log.read_text().splitlines()]
    summaries = sorted((r["decision"], r["host"], r["count"], r["summary"]) for r in got if r.get("summary"))
    assert summaries == [("allowed", "api.anthropic.com", 2, True), ("tunnelled", "api.github.com", 3, True)]
    assert all(r["since"] <= r["ts"] and r["method"] == "CONNECT" for r in got if r.get("summary"))
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "llm_gateway.egress"]
    assert [m for level, m in lines if level == "WARNING"] == [
        "egress denied: CONNECT evil.example:443 (egress.default: deny) from 127.0.0.1"]
    assert sum(level == "DEBUG" for level, _ in lines) == 5  # each allowed decision, for whoever asks for debug
    assert sorted(m for level, m in lines if level == "INFO") == [
        m for m in sorted(m for _, m in lines) if " x2 since " in m or " x3 since " in m]
    counted = {s.labels["decision"]: s.value for s in metrics.egress.collect()[0].samples if s.name.endswith("_total")}
    assert counted == {"allowed": 2.0, "tunnelled": 3.0, "denied": 1.0}
