"""The traps a new user met in the first hour, and the holes in egress and logs (issue 16), end to end
through a real mitmdump / mitmweb, and `scripts/gateway` itself where the trap was in the script.

An HTTPS origin of its own (`Origin`) stands in for api.anthropic.com's non-API paths and for evil.test:
tests/fakes/resolve.py maps those exact names to it (a name in another spelling would not resolve), and
the gateway trusts its CA through `ssl_verify_upstream_trusted_ca`. It records the SNI and the request
head it got, so a test sees exactly what went upstream.
"""

from __future__ import annotations

import json
import re
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import sdk_client
from conftest import routed_rules
from fakes.upstream import DEFAULT_TEXT
from harness import ROOT, Gateway, free_port
from e2e.test_e2e_egress import RESOLVE, connect, get, make_ca_and_leaf, post, read_head, tls_request
from e2e.test_e2e_mitmweb import WebApi

pytestmark = pytest.mark.e2e

SCRIPT = ROOT / "scripts" / "gateway"
LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\.\d{3}\]", re.M)  # mitmdump's time stamp opens every log line


class Origin:
    """HTTPS on 127.0.0.1 for api.anthropic.com and evil.test; remembers (SNI, request head) per request."""

    def __init__(self, tmp: Path) -> None:
        self.ca, cert, key = make_ca_and_leaf(tmp, ["api.anthropic.com", "evil.test"])
        self.seen: list[tuple[str | None, str]] = []
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        snis: dict[int, str | None] = {}  # per handler thread: the handshake runs in it
        ctx.sni_callback = lambda sock, name, c: snis.__setitem__(threading.get_ident(), name)
        origin = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    with ctx.wrap_socket(self.request, server_side=True) as tls:
                        tls.settimeout(10)
                        head = read_head(tls).decode("latin-1")
                        origin.seen.append((snis.pop(threading.get_ident(), None), head))
                        body = b"origin saw " + head.split(" ", 2)[1].encode()
                        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                except (OSError, ssl.SSLError, IndexError):
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> "Origin":
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    with Origin(tmp_path_factory.mktemp("origin")) as server:
        yield server


@pytest.fixture(scope="module")
def egress_gw(module_fake, origin):
    """Egress mode: api.anthropic.com inspected (its API paths routed to the fake), evil.test allowed."""
    rules = routed_rules(module_fake.url).replace("allow: [api.anthropic.com]", "allow: [api.anthropic.com, evil.test]")
    gw = Gateway(
        rules, reverse_to=None,
        extra_args=("-s", str(RESOLVE), "--set", f"ssl_verify_upstream_trusted_ca={origin.ca}"),
        env={"LLM_GATEWAY_TEST_HOSTS": f"api.anthropic.com=127.0.0.1:{origin.port},evil.test=127.0.0.1:{origin.port}"},
    ).start()
    yield gw
    gw.stop()


def header_of(head: str, name: str) -> str | None:
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


# --- 1. absolute-form targets inside a decrypted tunnel ---------------------------------------------------


def test_absolute_form_target_naming_another_host_is_refused_and_nothing_reaches_it(egress_gw, origin):
    before = len(origin.seen)
    sock, status, _ = connect(egress_gw, "api.anthropic.com:443")
    assert status == 200
    request = b"GET https://evil.test/v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n"
    _, status, headers, body = tls_request(sock, sni="api.anthropic.com", cafile=egress_gw.ca_cert, request=request)
    assert status == 403 and b"domain fronting" in body
    assert headers["x-gateway-egress"].startswith("fronting: refused api.anthropic.com:443/v1/models")
    time.sleep(0.3)
    assert origin.seen[before:] == []  # neither evil.test nor api.anthropic.com got it
    rec = egress_gw.wait_record(lambda r: r["decision"] == "fronting" and r.get("host_header") == "evil.test", kind="egress")
    assert rec["rule"] == "request target differs from the CONNECT target"


@pytest.mark.parametrize("host_header", ["Host: api.anthropic.com\r\n", ""], ids=["with-host", "without-host"])
def test_absolute_form_target_of_the_tunnel_host_goes_upstream_in_origin_form(egress_gw, origin, host_header):
    before = len(origin.seen)
    sock, status, _ = connect(egress_gw, "api.anthropic.com:443")
    request = f"GET https://api.anthropic.com/api/hello?x=1 HTTP/1.1\r\n{host_header}Connection: close\r\n\r\n".encode()
    _, status, _, body = tls_request(sock, sni="api.anthropic.com", cafile=egress_gw.ca_cert, request=request)
    assert (status, body) == (200, b"origin saw /api/hello?x=1")
    [(sni, head)] = origin.seen[before:]
    assert head.startswith("GET /api/hello?x=1 HTTP/1.1\r\n")
    assert header_of(head, "host") == "api.anthropic.com" and sni == "api.anthropic.com"


# --- 2. trailing-dot and upper-case CONNECT names -----------------------------------------------------------


@pytest.mark.parametrize("name", ["api.anthropic.com.", "API.ANTHROPIC.COM", "Api.Anthropic.Com."])
def test_connect_names_in_any_spelling_reach_the_host_in_normal_form(egress_gw, origin, module_fake, name):
    before = len(origin.seen)
    sock, status, _ = connect(egress_gw, f"{name}:443")
    assert status == 200
    started = time.monotonic()
    # the TLS name is the CONNECT name as written, as Python's ssl sends it
    _, status, _, body = tls_request(sock, sni=name, cafile=egress_gw.ca_cert, request=get("/api/hello", name))
    assert time.monotonic() - started < 10
    assert (status, body) == (200, b"origin saw /api/hello")
    [(sni, head)] = origin.seen[before:]
    assert sni == "api.anthropic.com" and header_of(head, "host") == "api.anthropic.com"
    # and an API path in the same spelling is routed and recorded
    module_fake.clear()
    sock, status, _ = connect(egress_gw, f"{name}:443")
    _, status, _, body = tls_request(sock, sni=name, cafile=egress_gw.ca_cert, request=post("/v1/messages", name))
    assert status == 200 and json.loads(body)["content"][0]["text"] == DEFAULT_TEXT
    assert len(module_fake.messages_requests()) == 1


def test_a_failing_upstream_set_up_gets_an_answer_within_seconds(module_fake, origin):
    """The origin's certificate is not trusted here: the TLS set-up with it fails, and the client hears so."""
    gw = Gateway(routed_rules(module_fake.url), reverse_to=None, extra_args=("-s", str(RESOLVE)),
                 env={"LLM_GATEWAY_TEST_HOSTS": f"api.anthropic.com=127.0.0.1:{origin.port}"}).start()
    try:
        for name in ("api.anthropic.com", "api.anthropic.com."):
            sock, status, _ = connect(gw, f"{name}:443")
            started = time.monotonic()
            _, status, _, body = tls_request(sock, sni=name, cafile=gw.ca_cert, request=get("/api/hello", name))
            assert time.monotonic() - started < 10
            assert status == 502 and b"Certificate verify failed" in body
        out = gw.wait_for_output("failed: GET https://api.anthropic.com:443/api/hello: ")
        assert "does not appear to be an IPv4 or IPv6 address" not in out
    finally:
        gw.stop()


# --- 3. a refused CONNECT: the reason without the gateway's file layout ----------------------------------------


def test_refused_connect_names_the_rule_but_not_the_rule_file_and_curl_shows_why(egress_gw):
    sock, status, body = connect(egress_gw, "github.com:443")
    sock.close()
    assert status == 403 and b"egress.default: deny" in body
    assert str(egress_gw.rules_path).encode() not in body and str(egress_gw.dir).encode() not in body
    done = subprocess.run(["curl", "-sv", "--max-time", "10", "-x", egress_gw.proxy_url, "https://github.com/"],
                          capture_output=True, text=True, timeout=30)
    assert "x-gateway-egress: denied: denied github.com:443: not allowed (egress.default: deny)" in done.stderr
    assert str(egress_gw.dir) not in done.stderr


# --- 4. forged log lines -----------------------------------------------------------------------------------------


FORGED = "claude-sonnet-4-5\n[12:00:00.000] egress allowed: CONNECT evil.example:443"


def test_a_forged_line_in_a_request_body_stays_inside_its_own_escaped_line(module_fake):
    gw = Gateway(routed_rules(module_fake.url), regular=False).start()
    try:
        body = {"model": FORGED, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        req = urllib.request.Request(gw.base_url + "/v1/messages", data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json", "x-api-key": "sk-ant-x"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
        record = gw.wait_record(lambda r: True)
        assert record["model"] == FORGED  # the record keeps the value itself (JSON escapes it)
        out = gw.wait_for_output("egress allowed: CONNECT evil.example:443")
        lines = [line for line in out.splitlines() if "evil.example" in line]
        assert lines == [line for line in lines if "claude-sonnet-4-5\\n[12:00:00.000] egress allowed" in line]
        assert len(lines) == 1 and LOG_LINE.match(lines[0])
        assert not any(line.startswith("[12:00:00.000]") for line in out.splitlines())
    finally:
        gw.stop()


# --- 5, 6, 9, 12. scripts/gateway: --upstream, lazy connections, the banner, mitmweb's comment --------------------


class ScriptGateway(Gateway):
    """`scripts/gateway` itself, base-URL listener only, its records in the usual file."""

    def __init__(self, rules: str, *, upstream: str | None = None, web: bool = False, extra: tuple[str, ...] = ()):
        super().__init__(rules, reverse_to=upstream or "https://api.anthropic.com", regular=False,
                         tool="mitmweb" if web else "mitmdump")
        self.upstream, self.web, self.extra = upstream, web, extra

    def args(self) -> list[str]:
        args = [str(SCRIPT), "--egress-port", "0", "--base-port", str(free_port()), "--rules", str(self.rules_path),
                "--confdir", str(self.confdir)]
        if self.upstream:
            args += ["--upstream", self.upstream]
        if self.web:
            self.web_port = free_port()
            args += ["--web", "--web-port", str(self.web_port)]
        return args + ["--", "--set", f"gateway_log={self.usage_log}", *self.extra]


def anthropic_only_rules() -> str:
    """The API named by host api.anthropic.com, no route: what --upstream users have."""
    return routed_rules("http://unused.invalid").split("routes:")[0] + "egress:\n  default: deny\n"


@pytest.mark.parametrize("web", [False, True], ids=["mitmdump", "mitmweb"])
def test_script_with_upstream_records_exchanges(module_fake, web):
    gw = ScriptGateway(anthropic_only_rules(), upstream=module_fake.url, web=web).start(timeout=60)
    try:
        module_fake.clear()
        result = sdk_client.run("create", base_url=gw.base_url, headers={"x-test-id": "upstream"})
        assert result["ok"], result
        record = gw.wait_record(lambda r: True)
        assert (record["mode"], record["path"], record["upstream"]) == ("reverse", "/v1/messages", module_fake.url)
        assert record["input_tokens"] == 21 and record["cache_read_input_tokens"] == 13
        out = gw.output()
        assert f"API requests go to {module_fake.url} (no route)" in out  # the banner names the destination
        if web:  # 12: the comment leads with what a person scans for (the Comment column shows ~17 characters)
            [flow] = WebApi(gw.web_url, gw.web_token).flows("upstream")
            assert flow["comment"].startswith("$? anthropic-python · hit 32%")  # cost, client: what the list shows
    finally:
        gw.stop()


def test_script_routes_work_without_dns_for_the_reverse_target_and_the_banner_shows_the_route(module_fake):
    try:
        socket.getaddrinfo("api.anthropic.com", 443)
        print("note: api.anthropic.com resolves here; the lazy strategy is checked by the banner and option only")
    except OSError:
        pass
    gw = ScriptGateway(routed_rules(module_fake.url)).start(timeout=60)
    try:
        module_fake.clear()
        result = sdk_client.run("create", base_url=gw.base_url)
        assert result["ok"], result
        assert gw.wait_record(lambda r: True)["upstream"] == module_fake.url
        out = gw.output()
        assert f"API requests go to {module_fake.url} (routes[0]); other requests to https://api.anthropic.com" in out
        assert "forwards to https://api.anthropic.com" not in out
        assert "connection_strategy=eager" not in out
    finally:
        gw.stop()


def test_eager_connections_are_warned_about(module_fake):
    gw = ScriptGateway(routed_rules(module_fake.url), extra=("--set", "connection_strategy=eager")).start(timeout=60)
    try:
        gw.wait_for_output("connection_strategy=eager: the base-URL listener connects to https://api.anthropic.com")
    finally:
        gw.stop()


# --- 7. an emptied or missing rule file ---------------------------------------------------------------------------


def test_empty_or_missing_rule_file_is_reported_and_the_last_good_rules_stay(module_fake):
    gw = Gateway(routed_rules(module_fake.url), regular=False).start()
    try:
        def exchange_is_recorded(n: int) -> None:
            assert sdk_client.run("create", base_url=gw.base_url)["ok"]
            assert len(gw.records(count=n)) == n

        exchange_is_recorded(1)
        gw.write_rules("# emptied by mistake\n")
        gw.wait_for_output(f"{gw.rules_path}:1: the rule file is empty")
        exchange_is_recorded(2)
        gw.rules_path.rename(gw.dir / "moved.yaml")
        gw.wait_for_output(f"rule file {gw.rules_path} is missing (moved or deleted), keeping the last good rules")
        exchange_is_recorded(3)
        (gw.dir / "moved.yaml").write_text(routed_rules(module_fake.url))
        (gw.dir / "moved.yaml").rename(gw.rules_path)
        gw.wait_for_output(f"rules reloaded from {gw.rules_path}")
        exchange_is_recorded(4)
    finally:
        gw.stop()


# --- 8. `stream: off` without quotes --------------------------------------------------------------------------------


def test_unquoted_stream_off_forces_the_upstream_request_to_json(module_fake):
    rules = routed_rules(module_fake.url, clients=[]).replace(
        "clients: []\n", "clients:\n  - name: test-agent\n    headers: [x-test-agent]\n    stream: off\n")
    assert "stream: off\n" in rules
    gw = Gateway(rules, regular=False).start()
    try:
        module_fake.clear()
        result = sdk_client.run("stream", base_url=gw.base_url, headers={"x-test-agent": "1"})
        assert result["ok"], result
        assert module_fake.messages_requests()[-1].json["stream"] is False
        record = gw.wait_record(lambda r: True)
        assert (record["client"], record["stream_requested"], record["stream_upstream"]) == ("test-agent", True, False)
    finally:
        gw.stop()


# --- 10. mitmproxy's connection chatter ---------------------------------------------------------------------------


CHATTER = ("client connect", "client disconnect", "server connect", "server disconnect", "Streaming response from")


@pytest.mark.parametrize("verbosity", ["info", "debug"])
def test_connection_chatter_is_out_of_the_default_output(module_fake, verbosity):
    gw = Gateway(routed_rules(module_fake.url), regular=False,
                 extra_args=("--set", f"termlog_verbosity={verbosity}")).start()
    try:
        for call in ("create", "stream"):
            assert sdk_client.run(call, base_url=gw.base_url)["ok"]
        gw.records(count=2)
        out = gw.wait_for_output("claude-test-1 200")  # the gateway's own line per exchange is there
        chatter = [c for c in CHATTER if c in out]
        assert chatter == ([] if verbosity == "info" else list(CHATTER))
    finally:
        gw.stop()


# --- 11. a failed non-API call names its host and path --------------------------------------------------------------


def test_a_failed_non_api_call_names_host_and_path(module_fake):
    dead = free_port()  # nothing listens there
    gw = Gateway(routed_rules(module_fake.url), regular=False, reverse_to=f"http://127.0.0.1:{dead}").start()
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(gw.base_url + "/api/oauth/profile?token=secret-token", timeout=10)
        assert e.value.code == 502
        out = gw.wait_for_output(f"failed: GET http://127.0.0.1:{dead}/api/oauth/profile: ")
        assert "secret-token" not in out
    finally:
        gw.stop()
