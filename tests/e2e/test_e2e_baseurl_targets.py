"""The base-URL listener never forwards a request target naming another host, nor a gateway token (issue 30),
through a real mitmdump: an agent writes the request line itself (absolute-form, RFC 9112 section 3.2.2) and
the fake upstream records what arrived."""

from __future__ import annotations

import json
import socket
import time

import pytest

from conftest import routed_rules
from fakes.upstream import Scenario
from llm_gateway.policy import credentials as policy_credentials
from llm_gateway.policy.spec import token_hash
from secretvolume import write_secret

pytestmark = pytest.mark.e2e

TOKEN, _ = policy_credentials.mint("team-a")
KEY = "sk-ant-api03-TARGETTESTKEY-" + token_hash(TOKEN)[:12]
BODY = json.dumps({"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).encode()


def raw(port: int, target: str, host: str = "127.0.0.1") -> int:
    """One request with `target` on the request line exactly as given; the status it got."""
    head = (f"POST {target} HTTP/1.1\r\nHost: {host}\r\nx-api-key: {TOKEN}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(BODY)}\r\nconnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + BODY)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def rules(key_file) -> str:
    return routed_rules("http://127.0.0.1:9", f"""\
credentials:
  upstream: [{{name: main, key_file: {key_file}}}]
  tokens: [{{name: team-a, sha256: "{token_hash(TOKEN)}"}}]
""")


def test_an_absolute_form_target_goes_upstream_in_origin_form(fake, gateway_factory, tmp_path):
    gw = gateway_factory(rules(write_secret(tmp_path / "s", "api-key", KEY)), reverse_to=fake.url, regular=False)
    status = raw(gw.reverse_port, "http://other.example/v1/messages")
    assert status == 200
    [seen] = fake.messages_requests()
    assert seen.path == "/v1/messages", f"the upstream got the target {seen.path!r}"
    assert seen.headers.get("x-api-key") == KEY


def test_a_gateway_token_on_a_non_api_path_is_never_forwarded(fake, gateway_factory, tmp_path):
    """The base-URL target (here 127.0.0.1) is not in apis.hosts: the token still stops at the gateway."""
    gw = gateway_factory(rules(write_secret(tmp_path / "s", "api-key", KEY)), reverse_to=fake.url, regular=False)
    raw(gw.reverse_port, "/api/hello")
    [seen] = [r for r in fake.requests if r.path.startswith("/api/hello")]
    assert TOKEN not in json.dumps(dict(seen.headers.items())), "the gateway token went upstream"
    assert KEY not in json.dumps(dict(seen.headers.items()))


def test_an_upgrade_that_is_not_websocket_never_turns_the_connection_into_a_raw_relay(fake, gateway_factory, tmp_path):
    """An upstream answers `Upgrade: h2c` with 101: mitmproxy would relay every later byte of the connection
    raw, so the next request (no token) would reach the upstream unjudged."""
    gw = gateway_factory(rules(write_secret(tmp_path / "s", "api-key", KEY)), reverse_to=fake.url, regular=False)
    fake.script(Scenario.raw(101, b"", headers=[("upgrade", "h2c"), ("connection", "upgrade")]))
    upgrade = (f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {TOKEN}\r\ncontent-type: application/json\r\n"
               f"upgrade: h2c\r\nconnection: upgrade\r\ncontent-length: {len(BODY)}\r\n\r\n").encode() + BODY
    unjudged = (f"POST /v1/messages HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                f"content-length: {len(BODY)}\r\n\r\n").encode() + BODY
    with socket.create_connection(("127.0.0.1", gw.reverse_port), timeout=10) as s:
        s.sendall(upgrade)
        first = s.recv(65536)
        head, _, body = first.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length and (more := s.recv(65536)):
            body += more
        first = head + b"\r\n\r\n" + body
        try:
            s.sendall(unjudged)
            time.sleep(1)
            rest = s.recv(65536)
        except OSError:
            rest = b""
    assert first.startswith(b"HTTP/1.1 502"), first[:200]
    assert b'"type":"api_error"' in first.replace(b" ", b"")
    assert len(fake.messages_requests()) == 1, f"a request passed the relay unjudged: {rest[:200]!r}"


def test_a_bare_cr_in_a_request_header_is_refused(fake, gateway_factory, tmp_path):
    """`x-evil: a\\rx-injected: 1`: forwarded as it came, Python's http.server (the fake) reads two headers."""
    gw = gateway_factory(rules(write_secret(tmp_path / "s", "api-key", KEY)), reverse_to=fake.url, regular=False)
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {TOKEN}\r\nx-evil: a\rx-injected: 1\r\n"
            f"content-type: application/json\r\ncontent-length: {len(BODY)}\r\nconnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", gw.reverse_port), timeout=10) as s:
        s.sendall(head + BODY)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"invalid_request_error" in answer
    assert fake.requests == [], "nothing went upstream"
