"""Key custody under attack, through a real mitmdump: an agent holding a gateway token tries to have the upstream
key sent in clear or to an endpoint outside the API paths. The fake upstream stands for api.anthropic.com (the
test resolver points the name at it), so what would have reached the real host is what it records."""

from __future__ import annotations

import http.client
import json

import pytest

from fakes.upstream import FakeUpstream
from gwtest import BASE_RULES
from harness import ROOT
from llm_gateway.policy import credentials as policy_credentials
from llm_gateway.policy.spec import token_hash
from secretvolume import write_secret

pytestmark = pytest.mark.e2e

TOKEN, _ = policy_credentials.mint("team-a")
KEY = "sk-ant-api03-ATTACKTESTKEY-" + token_hash(TOKEN)[:12]
BODY = json.dumps({"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})


def rules(key_file, extra: str = "") -> str:
    return BASE_RULES + f"""\
egress:
  default: deny
  allow: [api.anthropic.com]
  inspect: [api.anthropic.com]
credentials:
  upstream: [{{name: main, key_file: {key_file}}}]
  tokens: [{{name: team-a, sha256: "{token_hash(TOKEN)}"}}]
{extra}"""


def send(address: str, target: str) -> tuple[int, dict]:
    """One request as an agent writes it: `target` goes on the request line exactly as given."""
    host, port = address.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", target, body=BODY, headers={"x-api-key": TOKEN, "content-type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


@pytest.fixture
def upstream():
    with FakeUpstream() as fake:
        yield fake


def test_plain_http_through_the_proxy_gets_a_400_and_the_key_stays_home(gateway_factory, upstream, tmp_path):
    port = upstream.url.rsplit(":", 1)[1].rstrip("/")
    gw = gateway_factory(rules(write_secret(tmp_path / "s", "api-key", KEY)),
                         extra_args=("-s", str(ROOT / "tests" / "fakes" / "resolve.py")),
                         env={"LLM_GATEWAY_TEST_HOSTS": f"api.anthropic.com=127.0.0.1:{port}"})
    status, body = send(gw.proxy_url, "http://api.anthropic.com/v1/messages")
    assert status == 400 and body["error"]["type"] == "invalid_request_error", body
    assert upstream.requests == []
    assert KEY not in gw.output() and TOKEN not in gw.output()


def test_a_dot_segment_path_gets_a_400_in_both_modes(gateway_factory, upstream, tmp_path):
    route = f"routes:\n  - {{match: {{host: api.anthropic.com}}, upstream: '{upstream.url}'}}\n"
    gw = gateway_factory(rules(write_secret(tmp_path / "s", "api-key", KEY), route))
    for address, target in ((gw.base_url, "/v1/messages/../files"),
                            (gw.proxy_url, "http://api.anthropic.com/v1/messages/%2e%2e/files")):
        status, body = send(address, target)
        assert status == 400 and "'..' segments" in body["error"]["message"], (target, body)
    assert upstream.requests == []
    status, _ = send(gw.base_url, "/v1/messages")  # the same gateway, an ordinary request: the key goes
    assert status == 200 and [q.headers.get("x-api-key") for q in upstream.requests] == [KEY]
