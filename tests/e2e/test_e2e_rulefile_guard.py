"""A rule file is taken only when it is whole, and a reload never weakens key custody by accident (issue 30),
through a real mitmdump: the file is edited in place (not swapped) as a careless `cat > rules.yaml` would, and a
version with the `credentials` section cut off is refused while the last good rules keep answering 401."""

from __future__ import annotations

import http.client
import json
import time

import pytest

from conftest import routed_rules
from llm_gateway.policy import credentials as policy_credentials
from llm_gateway.policy.spec import token_hash
from secretvolume import write_secret

pytestmark = pytest.mark.e2e

TOKEN, _ = policy_credentials.mint("team-a")
KEY = "sk-ant-api03-GUARDTESTKEY-" + token_hash(TOKEN)[:12]
BODY = json.dumps({"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})


def custody(key_file) -> str:
    return f"""\
credentials:
  upstream: [{{name: main, key_file: {key_file}}}]
  tokens: [{{name: team-a, sha256: "{token_hash(TOKEN)}"}}]
"""


def post(port: int, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/messages", body=BODY, headers={"content-type": "application/json", **headers})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def test_a_reload_that_turns_key_custody_off_is_refused_unless_said_so(fake, gateway_factory, tmp_path):
    key_file = write_secret(tmp_path / "s", "api-key", KEY)
    gw = gateway_factory(routed_rules(fake.url, custody(key_file)), regular=False)
    assert post(gw.reverse_port, {}) == 401
    mark = len(gw.output())
    gw.write_rules(routed_rules(fake.url))  # the credentials section cut off
    gw.wait_for_output("turns key custody off", after=mark)
    assert "allow_custody_off: true" in gw.output()[mark:]
    assert post(gw.reverse_port, {}) == 401, "the last good rules stay: no key for a caller without a token"
    mark = len(gw.output())
    tokens_gone = custody(key_file).split("  tokens:")[0]
    gw.write_rules(routed_rules(fake.url, tokens_gone))
    gw.wait_for_output("leaves the upstream keys without gateway tokens", after=mark)
    assert post(gw.reverse_port, {}) == 401
    assert fake.messages_requests() == [], "nothing went upstream"
    mark = len(gw.output())
    gw.write_rules(routed_rules(fake.url, "allow_custody_off: true\n"))  # the operator says so
    gw.wait_for_output("rules reloaded", after=mark)
    assert post(gw.reverse_port, {"x-api-key": "the-callers-own"}) == 200
    assert [q.headers.get("x-api-key") for q in fake.messages_requests()] == ["the-callers-own"]


def test_a_file_written_in_place_is_read_only_once_whole(fake, gateway_factory):
    """Each round writes a valid YAML prefix (the file as an editor flushing its first block would leave it),
    holds it 0.4 s (under the 0.5 s watch interval, so a watcher that reads any change at once catches it most
    times), then the rest. Only whole versions may be loaded: one reload per round."""
    whole = routed_rules(fake.url)
    prefix = whole.split("routes:")[0]  # apis without their routes: API requests would go to the real host
    gw = gateway_factory(whole, regular=False)
    mark = len(gw.output())
    rounds = 3
    for _ in range(rounds):
        with open(gw.rules_path, "w") as f:  # in place: same inode, as `cat > rules.yaml` writes
            f.write(prefix)
            f.flush()
            time.sleep(0.4)
            f.write(whole[len(prefix):])
        time.sleep(1.6)
    reloads = gw.output()[mark:].count("rules reloaded")
    assert reloads == rounds, f"{reloads} reloads for {rounds} whole versions: a half-written file was loaded"
    assert post(gw.reverse_port, {"x-api-key": "the-callers-own"}) == 200
