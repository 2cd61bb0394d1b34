"""Key custody end to end: real clients holding only a gateway token, through a real mitmdump in both modes.

One gateway whose upstream key is a Kubernetes-style Secret volume; the Anthropic SDK and Claude Code get
their answers with the gateway token alone while the fake upstream sees only the upstream key; a wrong token
gets a native 401 the SDK raises as AuthenticationError; a new version of the Secret is in force without a
restart; a pass-through rule lets a subscription OAuth token through unchanged. Then the gateway is stopped and
everything it wrote (its log, records, the saved flows mitmweb would show, metrics, the report) is searched
for the token and both keys. A mitmweb test checks what its REST API serves while a request is in flight.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
import time
import urllib.request

import pytest
from mitmproxy import io as mio

import realclients
import sdk_client
from conftest import routed_rules
from fakes.upstream import Scenario
from harness import ROOT, Gateway
from llm_gateway.policy import credentials as policy_credentials
from llm_gateway.policy.spec import token_hash
from secretvolume import write_secret

pytestmark = pytest.mark.e2e

MARK = secrets.token_hex(6)
UPSTREAM_KEY = f"sk-ant-api03-UPSTREAMONE{MARK}"
ROTATED_KEY = f"sk-ant-api03-UPSTREAMTWO{MARK}"
TOKEN, _ = policy_credentials.mint("team-a")
OTHER_TOKEN = f"llmgw-NOTATOKEN{MARK}"
OAUTH = f"sk-ant-oat01-SUBSCRIPTION{MARK}"
SECRETS = {"upstream key": UPSTREAM_KEY, "rotated key": ROTATED_KEY, "gateway token": TOKEN, "wrong token": OTHER_TOKEN}
OAUTH_BETA = "oauth-2025-04-20"


def credentials_rules(fake_url: str, key_file) -> str:
    return routed_rules(fake_url, extra=f"""\
credentials:
  upstream:
    - {{name: main, key_file: {key_file}}}
  tokens:
    - {{name: team-a, sha256: "{token_hash(TOKEN)}"}}
  pass_through:
    - {{name: subscription, bearer: "sk-ant-oat*", header_values: {{anthropic-beta: "*oauth-*"}}}}
""")


def agent_env(gw: Gateway, token: str) -> dict[str, str]:
    """What `scripts/agent-env --token-file` prints for this gateway and token, as a dict."""
    token_file = gw.dir / "agent-token"
    token_file.write_text(token + "\n")
    done = subprocess.run(
        [str(ROOT / "scripts" / "agent-env"), "--proxy", gw.proxy_url, "--confdir", str(gw.confdir),
         "--bundle", str(gw.dir / "bundle.pem"), "--token-file", str(token_file)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "unset ANTHROPIC_AUTH_TOKEN" in done.stdout.splitlines()
    return dict(shlex.split(line[len("export "):])[0].split("=", 1)
                for line in done.stdout.splitlines() if line.startswith("export "))


def sdk(gw: Gateway, mode: str, call: str = "create", token: str = TOKEN, **kw) -> dict:
    if mode == "base-url":
        return sdk_client.run(call, base_url=gw.base_url, env={"ANTHROPIC_API_KEY": token}, **kw)
    env = agent_env(gw, token)
    assert env["ANTHROPIC_API_KEY"] == token
    return sdk_client.run(call, env={k: env[k] for k in ("HTTPS_PROXY", "SSL_CERT_FILE", "ANTHROPIC_API_KEY")}, **kw)


def claude(gw: Gateway, mode: str, env: dict[str, str]):
    if mode == "base-url":
        return realclients.run_claude("hello", base_url=gw.base_url, env_extra=env)
    agent = agent_env(gw, env["ANTHROPIC_API_KEY"])
    keep = ("HTTPS_PROXY", "NO_PROXY", "NODE_EXTRA_CA_CERTS", "ANTHROPIC_API_KEY")
    return realclients.run_claude("hello", env_extra={k: agent[k] for k in keep})


class Seen:
    """What the fake upstream received during one block."""

    def __init__(self, fake) -> None:
        self.fake, self.start = fake, len(fake.requests)

    def __enter__(self) -> "Seen":
        return self

    def __exit__(self, *exc) -> None:
        self.requests = self.fake.requests[self.start:]


@pytest.fixture(scope="module")
def traffic(tmp_path_factory, module_fake):
    tmp = tmp_path_factory.mktemp("custody")
    key_file = write_secret(tmp / "secret", "api-key", UPSTREAM_KEY + "\n")
    flows = tmp / "flows.mitm"
    got: dict = {}
    fake = module_fake
    with Gateway(credentials_rules(fake.url, key_file), extra_args=("-w", str(flows))) as gw:
        for mode in ("base-url", "egress"):
            for call in ("create", "stream"):
                with Seen(fake) as seen:
                    got[f"sdk-{mode}-{call}"] = sdk(gw, mode, call)
                got[f"sdk-{mode}-{call}-seen"] = seen.requests
            fake.script(Scenario(text="Hi from upstream"))
            with Seen(fake) as seen:
                got[f"claude-{mode}"] = claude(gw, mode, {"ANTHROPIC_API_KEY": TOKEN})
            got[f"claude-{mode}-seen"] = seen.requests
            with Seen(fake) as seen:
                got[f"wrong-{mode}"] = sdk(gw, mode, token=OTHER_TOKEN)
            got[f"wrong-{mode}-seen"] = seen.requests
        # Claude Code with the token as a bearer credential (ANTHROPIC_AUTH_TOKEN), no API key at all.
        fake.script(Scenario(text="Hi bearer"))
        with Seen(fake) as seen:
            got["claude-bearer"] = claude(gw, "base-url", {"ANTHROPIC_API_KEY": "", "ANTHROPIC_AUTH_TOKEN": TOKEN})
        got["claude-bearer-seen"] = seen.requests
        # A subscription user's OAuth token passes through, as the rule says.
        with Seen(fake) as seen:
            got["oauth"] = sdk_client.run("create", base_url=gw.base_url, env={"ANTHROPIC_API_KEY": ""},
                                          headers={"Authorization": f"Bearer {OAUTH}", "anthropic-beta": OAUTH_BETA})
        got["oauth-seen"] = seen.requests
        # The Secret gets a new version: the next request carries the new key, with no restart.
        write_secret(tmp / "secret", "api-key", ROTATED_KEY + "\n")
        gw.wait_for_output("upstream key main re-read", timeout=10)
        with Seen(fake) as seen:
            got["rotated"] = sdk(gw, "base-url")
        got["rotated-seen"] = seen.requests
        got["records"] = gw.records(count=11, timeout=10)
        with urllib.request.urlopen(f"{gw.base_url}/-/metrics", timeout=10) as r:
            got["metrics"] = r.read().decode()
        got["pid"] = gw.proc.pid
    yield gw, flows, got


def messages(requests) -> list:
    return [q for q in requests if q.path_only == "/v1/messages"]


@pytest.mark.parametrize("mode", ["base-url", "egress"])
@pytest.mark.parametrize("call", ["create", "stream"])
def test_the_sdk_with_only_a_gateway_token_gets_its_answer(traffic, mode, call):
    got = traffic[2]
    result = got[f"sdk-{mode}-{call}"]
    assert result["ok"], result
    [seen] = messages(got[f"sdk-{mode}-{call}-seen"])
    assert seen.headers.get("x-api-key") == UPSTREAM_KEY and seen.headers.get("authorization") is None
    [record] = [r for r in got["records"] if r["request_id"] == seen.request_id]
    assert record["principal"] == "team-a" and record["status"] == 200
    assert record["mode"] == ("reverse" if mode == "base-url" else "regular")


@pytest.mark.parametrize("mode", ["base-url", "egress"])
def test_claude_code_with_only_a_gateway_token_gets_its_answer(traffic, mode):
    got = traffic[2]
    done = got[f"claude-{mode}"]
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Hi from upstream"
    seen = messages(got[f"claude-{mode}-seen"])
    assert seen and all(q.headers.get("x-api-key") == UPSTREAM_KEY for q in seen)
    records = [r for r in got["records"] if r["request_id"] in {q.request_id for q in seen}]
    assert {(r["client"], r["principal"]) for r in records} == {("claude-code", "team-a")}


def test_claude_code_may_send_the_token_as_a_bearer_credential(traffic):
    got = traffic[2]
    done = got["claude-bearer"]
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Hi bearer"
    seen = messages(got["claude-bearer-seen"])
    assert seen and all(q.headers.get("x-api-key") == UPSTREAM_KEY and "authorization" not in q.headers for q in seen)


def test_the_upstream_only_ever_sees_the_upstream_key(traffic):
    got = traffic[2]
    every = [q for key, value in got.items() if key.endswith("-seen") and key != "oauth-seen" for q in value]
    assert len(messages(every)) >= 7
    for q in every:
        sent = json.dumps(list(q.headers.items()))
        assert TOKEN not in sent and OTHER_TOKEN not in sent
        assert q.headers.get("x-api-key") in (UPSTREAM_KEY, ROTATED_KEY)


@pytest.mark.parametrize("mode", ["base-url", "egress"])
def test_a_wrong_token_is_a_native_401_and_nothing_is_forwarded(traffic, mode):
    got = traffic[2]
    result = got[f"wrong-{mode}"]
    assert not result["ok"]
    assert (result["error"], result["status"], result["type"]) == ("AuthenticationError", 401, "authentication_error")
    assert OTHER_TOKEN not in result["message"]
    assert got[f"wrong-{mode}-seen"] == []
    refused = [r for r in got["records"] if r["status"] == 401 and r["mode"] == ("reverse" if mode == "base-url" else "regular")]
    assert refused and refused[0]["principal"] is None and refused[0]["error_type"] == "authentication_error"


def test_a_pass_through_credential_goes_upstream_unchanged(traffic):
    got = traffic[2]
    assert got["oauth"]["ok"], got["oauth"]
    [seen] = messages(got["oauth-seen"])
    assert seen.headers.get("authorization") == f"Bearer {OAUTH}" and seen.headers.get("x-api-key") is None
    [record] = [r for r in got["records"] if r["request_id"] == seen.request_id]
    assert record["principal"] == "subscription"


def test_a_new_secret_version_is_used_without_a_restart(traffic):
    gw, _flows, got = traffic
    assert got["rotated"]["ok"], got["rotated"]
    [seen] = messages(got["rotated-seen"])
    assert seen.headers.get("x-api-key") == ROTATED_KEY
    assert gw.proc.pid == got["pid"] and gw.output().count("listening at") == 2  # the same process throughout


def test_metrics_count_by_principal(traffic):
    metrics = traffic[2]["metrics"]
    assert 'llm_gateway_principal_requests_total{principal="team-a",status="200"}' in metrics
    assert 'llm_gateway_principal_requests_total{principal="none",status="401"} 2.0' in metrics


# ------------------------------------------------------------------------------------- the secret scan


def assert_clean(where: str, text: str) -> None:
    found = [name for name, value in SECRETS.items() if value in text or value[-20:] in text]
    assert not found, f"{found} in {where}"


def test_no_key_or_token_in_anything_the_gateway_wrote(traffic):
    gw, flows, got = traffic
    assert_clean("mitmdump output", gw.output())
    assert_clean("the record log", gw.usage_log.read_text())
    assert_clean("the metrics", got["metrics"])
    for name in ("sdk-base-url-create", "wrong-egress", "oauth", "rotated"):
        assert_clean(f"what the client got ({name})", json.dumps(got[name]))
    report = subprocess.run(
        [sys.executable, "-m", "llm_gateway.tools.report", "--format", "json", str(gw.usage_log)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "addons")}, timeout=30,
    )
    assert report.returncode == 0 and "team-a" in gw.usage_log.read_text()
    assert_clean("the usage report", report.stdout + report.stderr)


def test_saved_flows_hold_masks_not_credentials(traffic):
    """The flows as mitmproxy stores them (what `-w` saves and mitmweb shows): requests, responses, metadata."""
    flows = traffic[1]
    with open(flows, "rb") as f:
        saved = list(mio.FlowReader(f).stream())
    api = [f for f in saved if f.metadata.get("gateway")]
    assert len(api) >= 10
    for f in saved:
        assert_clean(f"flow {f.id}", json.dumps(f.get_state(), default=repr))
    swapped = [f for f in api if f.metadata["gateway"]["principal"] == "team-a" and f.response.status_code == 200]
    assert swapped and all(f.request.headers["x-api-key"].startswith("[upstream key main; masked by the gateway")
                           for f in swapped)
    assert all("principal team-a" in f.comment for f in swapped)
    oauth = [f for f in api if f.metadata["gateway"]["principal"] == "subscription"]
    assert oauth and OAUTH not in oauth[0].request.headers["authorization"]


def test_mitmweb_never_serves_the_key_even_while_the_request_is_in_flight(module_fake, tmp_path):
    key_file = write_secret(tmp_path / "secret", "api-key", UPSTREAM_KEY)
    gw = Gateway(credentials_rules(module_fake.url, key_file), tool="mitmweb").start()
    try:
        def flows_json() -> str:
            req = urllib.request.Request(gw.web_url + "flows", headers={"Authorization": f"Bearer {gw.web_token}"})
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.read().decode()

        slow = Scenario(text="slow", delay=3.0).to_header()
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "sdk_client.py"), "create", "--base-url", gw.base_url,
             "--header", f"x-fake-scenario={slow}"],
            env={**os.environ, "ANTHROPIC_API_KEY": TOKEN}, stdout=subprocess.PIPE, text=True,
        )
        during = ""  # polled until the request is in flight (the fake holds it for 3 s), however slow the start
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and "upstream key main; masked by" not in during:
            during = flows_json()
            time.sleep(0.1)
        out, _ = proc.communicate(timeout=30)
        assert json.loads(out.strip().splitlines()[-1])["ok"]
        after = flows_json()
        assert "upstream key main; masked by the gateway" in during and "upstream key main" in after
        assert_clean("mitmweb's /flows during the request", during)
        assert_clean("mitmweb's /flows after the request", after)
    finally:
        gw.stop()


def test_claude_code_with_a_subscription_oauth_token_passes_through(gateway_factory, fake, tmp_path):
    """A subscription user: Claude Code sends `Authorization: Bearer sk-ant-oat…` with an `oauth-…` beta header;
    the pass-through rule forwards it unchanged, and the flow holds a mask."""
    key_file = write_secret(tmp_path / "secret", "api-key", UPSTREAM_KEY)
    gw = gateway_factory(credentials_rules(fake.url, key_file))
    fake.script(Scenario(text="Hi subscriber"))
    done = realclients.run_claude("hello", base_url=gw.base_url,
                                  env_extra={"ANTHROPIC_API_KEY": "", "CLAUDE_CODE_OAUTH_TOKEN": OAUTH})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Hi subscriber"
    seen = messages(fake.requests)
    assert seen and all(q.headers.get("authorization") == f"Bearer {OAUTH}" for q in seen)
    assert all("oauth-" in q.headers.get("anthropic-beta", "") and "x-api-key" not in q.headers for q in seen)
    assert {r["principal"] for r in gw.records(count=len(seen))} == {"subscription"}
    assert OAUTH not in gw.output()


@pytest.mark.parametrize("mode", ["base-url", "egress"])
def test_claude_code_with_a_wrong_token_stops_at_the_first_401(gateway_factory, fake, tmp_path, mode):
    """Claude Code retries a 401 up to its default 10 times with backoff (3 minutes) unless the answer says
    `x-should-retry: false`; with it, one request and a clear error. Counted in requests, not seconds: the
    gateway must have been asked exactly once."""
    key_file = write_secret(tmp_path / "secret", "api-key", UPSTREAM_KEY + "\n")
    gw = gateway_factory(credentials_rules(fake.url, key_file))
    retries = {"CLAUDE_CODE_MAX_RETRIES": "10"}  # Claude Code's own default (run_claude sets 0)
    if mode == "base-url":
        done = realclients.run_claude("hello", base_url=gw.base_url, env_extra={"ANTHROPIC_API_KEY": OTHER_TOKEN,
                                                                                 **retries}, timeout=90)
    else:
        agent = agent_env(gw, OTHER_TOKEN)
        keep = ("HTTPS_PROXY", "NO_PROXY", "NODE_EXTRA_CA_CERTS", "ANTHROPIC_API_KEY")
        done = realclients.run_claude("hello", env_extra={**{k: agent[k] for k in keep}, **retries}, timeout=90)
    assert done.returncode != 0
    assert "401" in done.stdout + done.stderr or "api key" in (done.stdout + done.stderr).lower(), done.stdout
    assert messages(fake.requests) == []  # nothing was forwarded
    gw.records(count=1, timeout=10)
    time.sleep(1.5)  # a retry would be sent within about a second (Claude Code's first backoff is 0.5-1 s)
    records = [r for r in gw.records(count=1, timeout=5) if r["path"] == "/v1/messages"]
    assert [(r["status"], r["error_type"]) for r in records] == [(401, "authentication_error")], records
