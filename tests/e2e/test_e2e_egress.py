"""Egress mode end to end: a real mitmdump in regular mode, real sockets, real TLS, the real SDK and Claude Code.

Made-up names (`tunnel.test`, `plain.test`, `evil.test`) have no DNS: tests/fakes/resolve.py, loaded as a
second script, maps them to 127.0.0.1 in `server_connect`, after the egress policy judged them (where DNS
would act). It matches names exactly, so a tunnel to `TUNNEL.TEST.` only works if the gateway connects to the
normal form of the name it judged.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import shlex
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
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import sdk_client
from fakes.upstream import DEFAULT_TEXT
from harness import ROOT, Gateway

pytestmark = pytest.mark.e2e

AGENT_ENV = ROOT / "scripts" / "agent-env"
RESOLVE = ROOT / "tests" / "fakes" / "resolve.py"
TEST_HOSTS = "tunnel.test=127.0.0.1,plain.test=127.0.0.1,evil.test=127.0.0.1"


def egress_rules(fake_url: str, egress: str) -> str:
    return f"""\
apis:
  - name: anthropic
    hosts: [api.anthropic.com]
    paths: ["/v1/messages", "/v1/messages/*"]
routes:
  - match: {{host: api.anthropic.com}}
    upstream: {fake_url}
egress:
{egress}"""


MAIN_EGRESS = """\
  default: deny
  allow: [api.anthropic.com, tunnel.test, plain.test, 127.0.0.1]
  inspect: [api.anthropic.com]
  block:
    - {host: api.anthropic.com, path: "/api/*"}
"""


class EagerGateway(Gateway):
    """mitmproxy's default connection strategy (the harness sets lazy, and mitmdump refuses a second --set)."""

    def args(self) -> list[str]:
        return ["connection_strategy=eager" if a == "connection_strategy=lazy" else a for a in super().args()]


def start_gateway(fake_url: str, egress: str, *, eager: bool = False, hosts: str = TEST_HOSTS) -> Gateway:
    return (EagerGateway if eager else Gateway)(
        egress_rules(fake_url, egress), reverse_to=None, extra_args=("-s", str(RESOLVE)),
        env={"LLM_GATEWAY_TEST_HOSTS": hosts},
    ).start()


# --- a TLS server with a CA of its own ---------------------------------------------------------------


def make_ca_and_leaf(tmp: Path, names: list[str]) -> tuple[Path, Path, Path]:
    """A throwaway CA, and a leaf for `names` (and 127.0.0.1) signed by it: (ca.pem, leaf.pem, leaf.key)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egress test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([*(x509.DNSName(n) for n in names),
                                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = tmp / "ca.pem", tmp / "leaf.pem", tmp / "leaf.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class TLSServer:
    """HTTPS on 127.0.0.1 with its own certificate; remembers every connection and the SNI it saw."""

    BODY = b"hello from the tunnel server"

    def __init__(self, tmp: Path) -> None:
        self.ca, self.cert, self.key = make_ca_and_leaf(tmp, ["tunnel.test"])
        self.cert_der = ssl.PEM_cert_to_DER_cert(self.cert.read_text())
        self.connections = 0
        self.snis: list[str | None] = []
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.sni_callback = lambda sock, name, c: self.snis.append(name)
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                server.connections += 1
                try:
                    with ctx.wrap_socket(self.request, server_side=True) as tls:
                        tls.settimeout(10)
                        read_head(tls)
                        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                    % (len(TLSServer.BODY), TLSServer.BODY))
                except (OSError, ssl.SSLError):
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class PlainServer:
    """Plain HTTP on 127.0.0.1, for plain-HTTP proxying."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = f"plain hello {self.path}".encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- a client that speaks CONNECT itself -------------------------------------------------------------------


def read_head(sock) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def read_response(sock, *, connect: bool = False) -> tuple[int, dict[str, str], bytes]:
    head = read_head(sock).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = b""
    if connect and 200 <= status < 300:
        return status, headers, body  # the tunnel starts right after the head
    want = int(headers.get("content-length", "-1"))
    while want < 0 or len(body) < want:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def connect(gw: Gateway, target: str) -> tuple[socket.socket, int, bytes]:
    sock = socket.create_connection(("127.0.0.1", gw.regular_port), timeout=10)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    status, _headers, body = read_response(sock, connect=True)
    return sock, status, body


def tls_request(sock: socket.socket, *, sni: str | None, cafile: Path, request: bytes):
    """TLS over an open tunnel trusting `cafile` only; returns (peer certificate DER, status, headers, body)."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    tls = ctx.wrap_socket(sock, server_hostname=sni)
    try:
        der = tls.getpeercert(binary_form=True)
        tls.sendall(request)
        status, headers, body = read_response(tls)
        return der, status, headers, body
    finally:
        tls.close()


def post(path: str, host: str, body: dict | None = None, headers: dict[str, str] | None = None) -> bytes:
    data = json.dumps(body or {"model": "claude-test-1", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\nx-api-key: sk-ant-e2e-secret\r\n"
            f"{extra}content-length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data


def get(path: str, host: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def egress_records(gw: Gateway, count: int = 0, timeout: float = 5) -> list[dict]:
    return gw.records(timeout=timeout, count=count, kind="egress")


def new_records(gw: Gateway, before: int, count: int = 1) -> list[dict]:
    return egress_records(gw, before + count)[before:]


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    server = TLSServer(tmp_path_factory.mktemp("tls-server"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def plain_server():
    server = PlainServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def gw(module_fake):
    gateway = start_gateway(module_fake.url, MAIN_EGRESS)
    yield gateway
    gateway.stop()


def agent_env(gw: Gateway, tmp: Path) -> dict[str, str]:
    """What scripts/agent-env prints for this gateway, as a dict."""
    done = subprocess.run(
        [str(AGENT_ENV), "--proxy", gw.proxy_url, "--confdir", str(gw.confdir), "--bundle", str(tmp / "bundle.pem")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    env = {}
    for line in done.stdout.splitlines():
        if line.startswith("export "):
            name, _, value = shlex.split(line[len("export "):])[0].partition("=")
            env[name] = value
    return env


# --- allowed, tunnelled untouched -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tunnel.test", "TUNNEL.TEST.", "Tunnel.Test"])
def test_allowed_host_is_tunnelled_untouched(gw, tls_server, name):
    before = len(egress_records(gw))
    sock, status, _ = connect(gw, f"{name}:{tls_server.port}")
    assert status == 200
    # the client trusts the server's own CA only, and sees the server's own certificate
    der, status, _, body = tls_request(sock, sni="tunnel.test", cafile=tls_server.ca, request=get("/", "tunnel.test"))
    assert der == tls_server.cert_der
    assert (status, body) == (200, TLSServer.BODY)
    assert tls_server.snis[-1] == "tunnel.test"  # the ClientHello reached the server as the client sent it
    [rec] = new_records(gw, before)
    assert (rec["decision"], rec["method"], rec["host"], rec["port"]) == ("tunnelled", "CONNECT", "tunnel.test", tls_server.port)
    assert rec["rule"] == "egress.allow[1]: tunnel.test" and rec["client_ip"] == "127.0.0.1" and rec["path"] is None


def test_inspected_host_shows_the_gateway_certificate_instead(module_fake, tls_server):
    """The control for the test above: the same client, with tunnel.test inspected, cannot see the real server."""
    gw2 = start_gateway(module_fake.url, MAIN_EGRESS.replace("inspect: [api.anthropic.com]", "inspect: [api.anthropic.com, tunnel.test]"))
    try:
        sock, status, _ = connect(gw2, f"tunnel.test:{tls_server.port}")
        assert status == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_request(sock, sni="tunnel.test", cafile=tls_server.ca, request=get("/", "tunnel.test"))
        sock, status, _ = connect(gw2, f"tunnel.test:{tls_server.port}")
        der, _, _, _ = tls_request(sock, sni="tunnel.test", cafile=gw2.ca_cert, request=get("/", "tunnel.test"))
        assert der != tls_server.cert_der
        assert "mitmproxy" in x509.load_der_x509_certificate(der).issuer.rfc4514_string()
        assert egress_records(gw2, 2)[-1]["decision"] == "allowed"
    finally:
        gw2.stop()


def test_inspected_api_host_with_upper_case_and_trailing_dot_is_decrypted_and_routed(gw, module_fake):
    module_fake.clear()
    before = len(egress_records(gw))
    sock, status, _ = connect(gw, "API.ANTHROPIC.COM.:443")
    assert status == 200
    _, status, _, body = tls_request(sock, sni="api.anthropic.com", cafile=gw.ca_cert,
                                     request=post("/v1/messages", "api.anthropic.com"))
    assert status == 200 and json.loads(body)["content"][0]["text"] == DEFAULT_TEXT
    assert len(module_fake.requests) == 1
    [rec] = new_records(gw, before)
    assert (rec["decision"], rec["host"], rec["rule"]) == ("allowed", "api.anthropic.com", "egress.inspect[0]: api.anthropic.com")
    usage = gw.records(count=1)
    assert usage and usage[-1]["host"] == "api.anthropic.com"
    time.sleep(0.3)
    assert len(egress_records(gw)) == before + 1  # no egress record for an allowed decrypted request


# --- denied ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, host", [("evil.test:443", "evil.test"), ("EVIL.Test.:8443", "evil.test"),
                                          ("github.com:443", "github.com")])
def test_denied_connect_gets_403_naming_host_and_rule(gw, target, host):
    before = len(egress_records(gw))
    sock, status, body = connect(gw, target)
    sock.close()
    assert status == 403
    text = body.decode()
    port = target.rsplit(":", 1)[1]
    assert f"{host}:{port}" in text and str(gw.rules_path) not in text and "egress.default: deny" in text
    [rec] = new_records(gw, before)
    assert (rec["decision"], rec["host"], rec["port"], rec["rule"]) == ("denied", host, int(port), "egress.default: deny")


def proxy_opener(gw: Gateway):
    return urllib.request.build_opener(urllib.request.ProxyHandler({"http": gw.proxy_url, "https": gw.proxy_url}))


def test_denied_plain_http_gets_403_naming_host_and_rule(gw):
    before = len(egress_records(gw))
    with pytest.raises(urllib.error.HTTPError) as e:
        proxy_opener(gw).open("http://evil.test/x?token=secret-token", timeout=10)
    assert e.value.code == 403
    text = e.value.read().decode()
    assert "evil.test:80" in text and str(gw.rules_path) not in text and "secret-token" not in text
    [rec] = new_records(gw, before)
    assert (rec["decision"], rec["method"], rec["host"], rec["path"]) == ("denied", "GET", "evil.test", "/x")


def test_allowed_plain_http_passes(gw, plain_server):
    before = len(egress_records(gw))
    with proxy_opener(gw).open(f"http://PLAIN.test.:{plain_server.port}/hello", timeout=10) as r:
        assert r.status == 200 and r.read() == b"plain hello /hello"
    [rec] = new_records(gw, before)
    assert (rec["decision"], rec["host"], rec["path"]) == ("allowed", "plain.test", "/hello")


# --- IP literals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["127.0.0.2", "2130706434", "127.2", "[::1]"])
def test_unlisted_ip_literal_is_denied(gw, tls_server, spelling):
    before = len(egress_records(gw))
    sock, status, body = connect(gw, f"{spelling}:{tls_server.port}")
    sock.close()
    assert status == 403 and b"IP address not listed" in body
    assert new_records(gw, before)[0]["decision"] == "denied"


@pytest.mark.parametrize("spelling", ["127.0.0.1", "2130706433"])
def test_listed_ip_literal_in_any_spelling_is_the_same_address(gw, tls_server, spelling):
    before = len(egress_records(gw))
    sock, status, _ = connect(gw, f"{spelling}:{tls_server.port}")
    assert status == 200
    der, status, _, body = tls_request(sock, sni="127.0.0.1", cafile=tls_server.ca, request=get("/", "127.0.0.1"))
    assert der == tls_server.cert_der and status == 200
    [rec] = new_records(gw, before)
    assert (rec["decision"], rec["host"], rec["rule"]) == ("tunnelled", "127.0.0.1", "egress.allow[3]: 127.0.0.1")


def test_plain_http_to_an_ip_literal_is_denied(gw, plain_server):
    with pytest.raises(urllib.error.HTTPError) as e:
        proxy_opener(gw).open(f"http://127.0.0.2:{plain_server.port}/", timeout=10)
    assert e.value.code == 403


# --- domain fronting ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["evil.test", "tunnel.test", "EVIL.TEST.:443"])
def test_host_header_of_another_host_inside_a_decrypted_tunnel_is_refused(gw, module_fake, header):
    module_fake.clear()
    before = len(egress_records(gw))
    sock, status, _ = connect(gw, "api.anthropic.com:443")
    assert status == 200
    _, status, headers, body = tls_request(sock, sni="api.anthropic.com", cafile=gw.ca_cert,
                                           request=post("/v1/messages", header))
    assert status == 403
    error = json.loads(body)
    assert error["type"] == "error" and error["error"]["type"] == "permission_error"
    assert "domain fronting" in error["error"]["message"] and str(gw.rules_path) not in error["error"]["message"]
    assert module_fake.requests == []
    rec = new_records(gw, before, 2)[-1]
    assert (rec["decision"], rec["host"], rec["rule"]) == ("fronting", "api.anthropic.com", "Host header differs from the CONNECT target")
    assert rec["host_header"] == header.lower().split(":")[0].rstrip(".")
    assert "sk-ant-e2e-secret" not in gw.usage_log.read_text()


def test_sni_of_another_host_inside_a_decrypted_tunnel_is_refused(gw, module_fake):
    module_fake.clear()
    before = len(egress_records(gw))
    sock, status, _ = connect(gw, "api.anthropic.com:443")
    _, status, _, body = tls_request(sock, sni="evil.test", cafile=gw.ca_cert, request=post("/v1/messages", "api.anthropic.com"))
    assert status == 403 and json.loads(body)["error"]["type"] == "permission_error"
    assert module_fake.requests == []
    recs = new_records(gw, before, 3)
    assert [r["decision"] for r in recs] == ["allowed", "fronting", "fronting"]  # CONNECT, ClientHello, request
    assert recs[1]["sni"] == "evil.test" and recs[1]["method"] == "TLS"


def test_sni_of_another_host_in_an_untouched_tunnel_never_reaches_the_server(gw, tls_server):
    connections = tls_server.connections
    before = len(egress_records(gw))
    sock, status, _ = connect(gw, f"tunnel.test:{tls_server.port}")
    assert status == 200
    with pytest.raises(ssl.SSLCertVerificationError):  # the gateway took the handshake: it is not the server
        tls_request(sock, sni="evil.test", cafile=tls_server.ca, request=get("/", "evil.test"))
    sock, status, _ = connect(gw, f"tunnel.test:{tls_server.port}")
    _, status, _, body = tls_request(sock, sni="evil.test", cafile=gw.ca_cert, request=get("/", "evil.test"))
    assert status == 403 and b"domain fronting" in body
    assert tls_server.connections == connections
    decisions = [r["decision"] for r in new_records(gw, before, 5)]
    assert decisions == ["tunnelled", "fronting", "tunnelled", "fronting", "fronting"]


# --- blocked paths -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/event_logging/batch", "/%61pi/event_logging/batch", "/v1/../api/x?k=v"])
@pytest.mark.parametrize("target", ["api.anthropic.com:443", "Api.Anthropic.Com.:443"])
def test_blocked_path_on_an_inspected_host(gw, module_fake, path, target):
    module_fake.clear()
    before = len(egress_records(gw))
    sock, status, _ = connect(gw, target)
    _, status, _, body = tls_request(sock, sni="api.anthropic.com", cafile=gw.ca_cert, request=post(path, "api.anthropic.com"))
    assert status == 403
    text = body.decode()
    assert "egress.block[0]: api.anthropic.com /api/*" in text and str(gw.rules_path) not in text
    assert module_fake.requests == []
    rec = new_records(gw, before, 2)[-1]
    assert (rec["decision"], rec["host"], rec["path"]) == ("blocked", "api.anthropic.com", path.split("?")[0])


# --- the Anthropic SDK with scripts/agent-env --------------------------------------------------------------------


@pytest.mark.parametrize("call", ["create", "stream"])
def test_sdk_works_in_egress_mode_with_the_helpers_bundle(gw, module_fake, tmp_path, call):
    env = agent_env(gw, tmp_path)
    assert env["HTTPS_PROXY"] == gw.proxy_url and env["NO_PROXY"].split(",")[:2] == ["localhost", "127.0.0.1"]
    assert Path(env["NODE_EXTRA_CA_CERTS"]) == gw.ca_cert.resolve()
    bundle = Path(env["SSL_CERT_FILE"]).read_text()
    assert gw.ca_cert.read_text().strip() in bundle and bundle.count("BEGIN CERTIFICATE") > 10  # system CAs too
    module_fake.clear()
    before = len(egress_records(gw))
    result = sdk_client.run(call, env={"HTTPS_PROXY": env["HTTPS_PROXY"], "SSL_CERT_FILE": env["SSL_CERT_FILE"]})
    assert result["ok"], result
    assert result["message"]["content"][0]["text"] == DEFAULT_TEXT
    assert len(module_fake.messages_requests()) == 1
    [rec] = new_records(gw, before)
    assert (rec["decision"], rec["host"]) == ("allowed", "api.anthropic.com")


def test_sdk_without_the_gateway_ca_cannot_talk_to_an_inspected_host(gw, module_fake):
    """The bundle is what makes the test above pass: certifi alone does not trust the gateway."""
    module_fake.clear()
    result = sdk_client.run("create", env={"HTTPS_PROXY": gw.proxy_url})
    assert not result["ok"] and result["error"] == "APIConnectionError"
    assert module_fake.requests == []


def test_denied_api_host_gives_the_sdk_a_native_permission_error(module_fake, tmp_path):
    gw2 = start_gateway(module_fake.url, "  default: deny\n  allow: [tunnel.test]\n")
    try:
        env = agent_env(gw2, tmp_path)
        module_fake.clear()
        result = sdk_client.run("create", env={"HTTPS_PROXY": env["HTTPS_PROXY"], "SSL_CERT_FILE": env["SSL_CERT_FILE"]})
        assert not result["ok"]
        assert (result["status"], result["type"], result["error"]) == (403, "permission_error", "PermissionDeniedError")
        assert "api.anthropic.com" in result["message"] and str(gw2.rules_path) not in result["message"]
        assert module_fake.requests == []
        decisions = [(r["decision"], r["method"]) for r in egress_records(gw2, 2)]
        assert decisions == [("denied", "CONNECT"), ("denied", "POST")]
    finally:
        gw2.stop()


def test_with_eager_connections_refused_hosts_are_never_contacted(module_fake, tls_server, tmp_path):
    """mitmproxy's default connection_strategy=eager connects at CONNECT time and does TLS with the server
    before the client's handshake; the harness uses lazy, so check the refusals under eager too."""
    # api.anthropic.com "resolves" to the TLS server too: a connection to the denied host would show there
    hosts = f"{TEST_HOSTS},api.anthropic.com=127.0.0.1:{tls_server.port}"
    gw2 = start_gateway(module_fake.url, "  default: deny\n  allow: [tunnel.test]\n", eager=True, hosts=hosts)
    try:
        # tunnelled: works as before (eager opened the connection at CONNECT)
        sock, status, _ = connect(gw2, f"tunnel.test:{tls_server.port}")
        der, status, _, body = tls_request(sock, sni="tunnel.test", cafile=tls_server.ca, request=get("/", "tunnel.test"))
        assert der == tls_server.cert_der and body == TLSServer.BODY
        # a fronting SNI is never shown to the server: the gateway takes the handshake itself
        snis = list(tls_server.snis)
        sock, status, _ = connect(gw2, f"tunnel.test:{tls_server.port}")
        _, status, _, body = tls_request(sock, sni="evil.test", cafile=gw2.ca_cert, request=get("/", "evil.test"))
        assert status == 403 and b"domain fronting" in body
        assert "evil.test" not in tls_server.snis[len(snis):]
        # a denied API host: never connected to, although mitmproxy's eager TLS asks for a connection
        connections = tls_server.connections
        env = agent_env(gw2, tmp_path)
        result = sdk_client.run("create", env={"HTTPS_PROXY": env["HTTPS_PROXY"], "SSL_CERT_FILE": env["SSL_CERT_FILE"]})
        assert (result["status"], result["type"]) == (403, "permission_error"), result
        assert tls_server.connections == connections
        assert "api.anthropic.com:443 killed before connect: refused by the egress policy (denied" in gw2.output()
    finally:
        gw2.stop()


def test_agent_env_fails_clearly_before_the_gateway_made_its_ca(tmp_path):
    done = subprocess.run([str(AGENT_ENV), "--confdir", str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and done.stdout == ""
    assert f"no gateway CA at {tmp_path / 'none' / 'mitmproxy-ca-cert.pem'}" in done.stderr
    assert "first starts" in done.stderr


def test_base_url_mode_is_not_affected(module_fake):
    gw2 = Gateway(egress_rules(module_fake.url, "  default: deny\n"), regular=True).start()
    try:
        module_fake.clear()
        result = sdk_client.run("create", base_url=gw2.base_url)
        assert result["ok"], result
        assert len(gw2.records(count=1)) == 1  # its usage record, and no egress record
        assert gw2.records(timeout=0, count=0, kind="egress") == []
    finally:
        gw2.stop()


# --- the real Claude Code -------------------------------------------------------------------------------------


QUIET = {}  # run_claude's defaults: CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1, telemetry off
CHATTY = dict.fromkeys(("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "DISABLE_TELEMETRY", "DISABLE_AUTOUPDATER",
                        "DISABLE_ERROR_REPORTING", "DISABLE_BUG_COMMAND"), "")


@pytest.mark.parametrize("traffic", [QUIET, CHATTY], ids=["quiet", "all-traffic"])
def test_claude_code_in_egress_mode(module_fake, tmp_path, traffic):
    from realclients import run_claude

    egress = """\
  default: deny
  allow: [api.anthropic.com]
  inspect: [api.anthropic.com]
  block:
    - {host: api.anthropic.com, path: "/api/*"}
"""
    gw2 = start_gateway(module_fake.url, egress)
    try:
        env = agent_env(gw2, tmp_path)
        module_fake.clear()
        done = run_claude(
            "Say hello", env_extra={**{k: env[k] for k in ("HTTPS_PROXY", "NO_PROXY", "NODE_EXTRA_CA_CERTS")}, **traffic},
            timeout=180,
        )
        assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}\ngateway:\n{gw2.output()[-4000:]}"
        assert done.stdout.strip() == DEFAULT_TEXT
        assert module_fake.messages_requests(), "the answer must have come from the fake upstream"
        usage = gw2.records(count=1, kind="usage")  # written off the request path, after the egress decisions
        egress_recs = gw2.records(count=1, kind="egress")
        assert any(r["decision"] == "allowed" and r["host"] == "api.anthropic.com" for r in egress_recs)
        assert usage and all(r["host"] == "api.anthropic.com" and r["mode"] == "regular" for r in usage)
        assert all((r["user_agent"] or "").startswith("claude-cli/") for r in usage)  # no client rules here: "unknown"
        # whatever else it tried went as the policy says: only api.anthropic.com got through, decrypted
        for r in egress_recs:
            if r["decision"] in ("allowed", "tunnelled"):
                assert r["host"] == "api.anthropic.com" and r["decision"] == "allowed", r
            else:
                assert r["decision"] in ("denied", "blocked"), r
        # its calls under api.anthropic.com/api/ (settings, policy limits, event logging) got the block's 403
        assert any(r["decision"] == "blocked" and r["path"].startswith("/api/") for r in egress_recs)
        print("Claude Code egress decisions:", json.dumps([{k: r.get(k) for k in ("decision", "method", "host", "path")}
                                                          for r in egress_recs]))
    finally:
        gw2.stop()
