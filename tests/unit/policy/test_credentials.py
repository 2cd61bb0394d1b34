"""Key custody (policy/credentials.py, policy/spec.py, addons/credentials.py, mitm/serializers.py): the rule section, the decision, the key files,
the addon on flows, and the last-moment placing of the upstream key into the wire bytes only."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http2
from mitmproxy.test import taddons

from gwtest import BASE_RULES, api_flow, rule_file
from llm_gateway.addons import credentials
from llm_gateway.policy import credentials as policy_credentials
from llm_gateway.policy import spec as policy_spec
from llm_gateway.tools import mint_token
from llm_gateway.pipeline import exchange
from llm_gateway.mitm import serializers
from llm_gateway.policy import rules
from llm_gateway.addons.clients import ClientDetector
from llm_gateway.policy.spec import token_hash
from llm_gateway.addons.routing import ApiRouter
from secretvolume import write_secret

TOKEN_A = "llmgw-team-a-token-0123456789"
TOKEN_B = "llmgw-team-b-token-9876543210"
OAUTH = "sk-ant-oat01-subscription-abcdef"
KEY = "sk-ant-api03-REALKEY-0000"


def creds_rules(key_file: Path, *, tokens: bool = True, extra: str = "") -> str:
    section = f"""\
clients:
  - name: claude-code
    headers: [x-claude-code-session-id]
credentials:
  upstream:
    - {{name: main, key_file: {key_file}}}
    - {{name: alt, key_env: LLMGW_TEST_ALT_KEY, header: authorization}}
"""
    if tokens:
        section += f"""\
  tokens:
    - {{name: team-a, sha256: "{token_hash(TOKEN_A)}"}}
    - {{name: team-b, sha256: "{token_hash(TOKEN_B).upper()}", upstream: alt, client: claude-code}}
"""
    section += """\
  pass_through:
    - {name: subscription, bearer: "sk-ant-oat*", header_values: {anthropic-beta: "*oauth-*"}}
"""
    return BASE_RULES + section + extra


# ------------------------------------------------------------------------------------------ the rules


def test_section_becomes_plain_data(tmp_path):
    r = rules.parse(creds_rules(tmp_path / "k"), str(tmp_path / "rules.yaml"))
    c = r.credentials
    assert [u.name for u in c.upstream] == ["main", "alt"]
    assert c.upstream[0].key_file == str(tmp_path / "k") and c.upstream[1].header == "authorization"
    assert [(t.name, t.upstream, t.client) for t in c.tokens] == [("team-a", "main", None), ("team-b", "alt", "claude-code")]
    assert c.tokens[1].sha256 == token_hash(TOKEN_B)  # stored lower-case
    assert c.token_for(TOKEN_A).name == "team-a" and c.token_for("nope") is None
    assert rules.parse(BASE_RULES).credentials is None


def test_relative_key_file_is_relative_to_the_rule_file(tmp_path):
    text = "credentials:\n  upstream:\n    - {name: main, key_file: secrets/key}\n"
    assert rules.parse(text, str(tmp_path / "rules.yaml")).credentials.upstream[0].key_file == str(tmp_path / "secrets/key")


@pytest.mark.parametrize(
    "section, line, reason",
    [
        ("credentials:\n  upstream: []\n", 2, "at least one key"),
        ("credentials:\n  upstream:\n    - {name: m, key: sk-ant-x}\n", 3, "never goes in the rule file"),
        ("credentials:\n  upstream:\n    - {name: m}\n", 3, "exactly one of key_file, key_env"),
        ("credentials:\n  upstream:\n    - {name: m, key_file: a, key_env: B}\n", 3, "exactly one"),
        ("credentials:\n  upstream:\n    - {name: m, key_env: B, header: bearer}\n", 3, "must be one of"),
        ("credentials:\n  upstream:\n    - {name: m, key_env: B}\n    - {name: m, key_env: C}\n", 3, "names 'm' twice"),
        ("credentials:\n  upstream:\n    - {name: m, key_env: B}\n  tokens:\n    - {name: t, sha256: abc}\n", 5, "64 hex"),
        ("credentials:\n  upstream:\n    - {name: m, key_env: B}\n  tokens:\n"
         f"    - {{name: t, sha256: '{'a' * 64}', upstream: x}}\n", 5, "not a credentials.upstream name"),
        ("credentials:\n  upstream:\n    - {name: m, key_env: B}\n  tokens:\n"
         f"    - {{name: t, sha256: '{'a' * 64}', client: nobody}}\n", 5, "not a name from the clients section"),
        ("credentials:\n  upstream:\n    - {name: m, key_env: B}\n  tokens:\n"
         f"    - {{name: t, sha256: '{'a' * 64}'}}\n    - {{name: u, sha256: '{'A' * 64}'}}\n", 5, "same sha256 twice"),
        ("credentials:\n  upstream:\n    - {name: m, key_env: B}\n  pass_through:\n    - {name: p}\n", 5, "bearer or api_key"),
        ("credentials:\n  upstream:\n    - {name: 'a b', key_env: B}\n", 3, "letters, digits"),
        ("credentials:\n  upstream:\n    - {name: m, key_env: B}\n  keys: []\n", 4, "unknown key 'keys'"),
    ],
)
def test_refusals_name_the_line_and_never_a_key(section, line, reason):
    with pytest.raises(rules.RulesError) as e:
        rules.parse(section, "r.yaml")
    assert str(e.value).startswith(f"r.yaml:{line}:") and reason in str(e.value)
    assert "sk-ant-x" not in str(e.value)


# --------------------------------------------------------------------------------------- the decision


@pytest.fixture
def creds(tmp_path):
    return rules.parse(creds_rules(tmp_path / "k")).credentials


def decide(creds, headers: dict[str, str], client: str = "unknown") -> policy_credentials.Decision:
    h = {k.lower(): v for k, v in headers.items()}
    return policy_credentials.decide(creds, policy_credentials.presented(h), h, client)


def test_a_token_in_either_header_is_swapped_for_its_upstream(creds):
    for headers in ({"x-api-key": TOKEN_A}, {"authorization": f"Bearer {TOKEN_A}"}, {"Authorization": f"bearer  {TOKEN_A} "}):
        d = decide(creds, headers)
        assert (d.action, d.principal, d.upstream.name) == ("swap", "team-a", "main")


def test_a_token_tied_to_a_client_is_refused_for_another(creds):
    assert decide(creds, {"x-api-key": TOKEN_B}, "claude-code").upstream.name == "alt"
    d = decide(creds, {"x-api-key": TOKEN_B}, "anthropic-python")
    assert d.action == "refuse" and TOKEN_B not in d.why


@pytest.mark.parametrize("headers, why", [
    ({}, "no gateway token"),
    ({"x-api-key": "llmgw-wrong"}, "unknown gateway token"),
    ({"authorization": f"Basic {TOKEN_A}"}, "no gateway token"),  # only Bearer carries a token
    ({"authorization": f"Bearer {OAUTH}"}, "unknown gateway token"),  # OAuth without its beta header
])
def test_unknown_or_missing_tokens_are_refused(creds, headers, why):
    d = decide(creds, headers)
    assert (d.action, d.principal, d.why) == ("refuse", None, why)


def test_pass_through_needs_every_matcher(creds):
    d = decide(creds, {"authorization": f"Bearer {OAUTH}", "anthropic-beta": "oauth-2025-04-20,x"})
    assert (d.action, d.principal) == ("pass", "subscription")


def test_without_tokens_the_upstream_key_replaces_anything(tmp_path):
    c = rules.parse(creds_rules(tmp_path / "k", tokens=False)).credentials
    for headers in ({}, {"x-api-key": "sk-ant-agents-own"}, {"authorization": "Bearer whatever"}):
        d = decide(c, headers)
        assert (d.action, d.principal, d.upstream.name) == ("swap", None, "main")


# ------------------------------------------------------------------------------------------- the keys


def spec(path: Path) -> policy_spec.UpstreamKey:
    return policy_spec.UpstreamKey("main", key_file=str(path))


def test_read_key_strips_and_refuses_without_showing_content(tmp_path, monkeypatch):
    key = tmp_path / "k"
    key.write_text(f"  {KEY}\n")
    assert policy_credentials.read_key(spec(key)) == KEY
    key.write_text("sk-ant with space\n")
    with pytest.raises(ValueError) as e:
        policy_credentials.read_key(spec(key))
    assert "cannot carry" in str(e.value) and "with space" not in str(e.value)
    with pytest.raises(ValueError, match="cannot read file"):
        policy_credentials.read_key(spec(tmp_path / "missing"))
    monkeypatch.setenv("LLMGW_K", KEY)
    assert policy_credentials.read_key(policy_spec.UpstreamKey("e", key_env="LLMGW_K")) == KEY
    monkeypatch.setenv("LLMGW_K", "")
    with pytest.raises(ValueError, match="environment variable LLMGW_K is empty"):
        policy_credentials.read_key(policy_spec.UpstreamKey("e", key_env="LLMGW_K"))


def test_key_store_follows_a_secret_swap_and_keeps_the_last_good_key(tmp_path, caplog):
    path = write_secret(tmp_path, "api-key", KEY + "\n")
    store = policy_credentials.KeyStore()
    store.use((spec(path),))
    assert store.key("main") == KEY
    store.refresh()
    assert store.reloads == 0
    write_secret(tmp_path, "api-key", "sk-ant-api03-ROTATED")
    store.refresh()
    assert store.key("main") == "sk-ant-api03-ROTATED" and store.reloads == 1
    with caplog.at_level(logging.ERROR):
        write_secret(tmp_path, "api-key", "")
        store.refresh()
    assert store.key("main") == "sk-ant-api03-ROTATED"
    assert "is empty (keeping the key read before)" in caplog.text and "ROTATED" not in caplog.text


def test_key_store_reads_again_when_the_rules_change_the_spec(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("sk-a")
    b.write_text("sk-b")
    store = policy_credentials.KeyStore()
    store.use((spec(a),))
    store.use((spec(b),))
    assert store.key("main") == "sk-b"
    store.use(())
    assert store.key("main") is None


# ------------------------------------------------------------------------------------------ the addon


class Chain:
    """The parts of the gateway's chain key custody sits in: routing, detection, custody."""

    def __init__(self, text: str) -> None:
        self.rf = rule_file(text)
        self.custody = credentials.KeyCustody(self.rf)
        self.parts = [ApiRouter(self.rf), ClientDetector(), self.custody]

    def run(self, hook: str, flow) -> None:
        for part in self.parts:
            if hasattr(part, hook):
                getattr(part, hook)(flow)


@pytest.fixture
def chain(tmp_path, monkeypatch):
    (tmp_path / "k").write_text(KEY)
    monkeypatch.setenv("LLMGW_TEST_ALT_KEY", "sk-alt-key")
    c = Chain(creds_rules(tmp_path / "k"))
    with taddons.context(*c.parts):
        c.custody.load(None)
        c.custody._sync()
        yield c


def sent_head(flow) -> bytes:
    """The request head as mitmproxy's HTTP/1 client layer writes it."""
    return http1.assemble_request_head(flow.request)


def test_the_flow_never_holds_the_token_or_the_key_but_the_wire_does(chain):
    f = api_flow(headers={"x-api-key": TOKEN_A, "authorization": f"Bearer {TOKEN_A}"})
    chain.run("requestheaders", f)
    assert TOKEN_A not in str(f.request.headers)  # before mitmweb's view first shows it
    chain.run("request", f)
    ex = exchange.of(f)
    assert ex.principal == "team-a" and f.metadata["gateway"]["principal"] == "team-a"
    assert "authorization" not in f.request.headers
    assert f.request.headers["x-api-key"].startswith("[upstream key main; masked by the gateway; ref ")
    head = sent_head(f)
    assert f"x-api-key: {KEY}\r\n".encode() in head and TOKEN_A.encode() not in head
    assert KEY not in str(f.request.headers) and KEY not in repr(f.get_state())  # restored after serialising
    chain.run("error", f)  # sent (or never will be): the placeholder is forgotten, the wire would carry it as is
    assert KEY.encode() not in sent_head(f)


def test_http2_serialisation_carries_the_key_too(chain):
    f = api_flow(headers={"x-api-key": TOKEN_A})
    f.request.http_version = "HTTP/2.0"
    chain.run("requestheaders", f)
    chain.run("request", f)

    class Ctx:
        class options:
            normalize_outbound_headers = True

    gen = _http2.format_h2_request_headers(Ctx, type("Event", (), {"request": f.request})())
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        headers = dict(stop.value)
    assert headers[b"x-api-key"] == KEY.encode() and KEY not in str(f.request.headers)


def test_a_placeholder_bound_for_one_host_is_not_replaced_for_another(chain):
    f = api_flow(headers={"x-api-key": TOKEN_A})
    chain.run("requestheaders", f)
    chain.run("request", f)
    f.request.host = "evil.example"
    assert KEY.encode() not in sent_head(f)


def test_upstream_header_authorization_and_tied_token(chain):
    f = api_flow(headers={"x-api-key": TOKEN_B, "x-claude-code-session-id": "s1"})
    chain.run("requestheaders", f)
    chain.run("request", f)
    assert "x-api-key" not in f.request.headers
    assert b"authorization: Bearer sk-alt-key\r\n" in sent_head(f)


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "llmgw-wrong"}, {"x-api-key": TOKEN_B}])
def test_refused_requests_get_a_native_401_and_go_nowhere(chain, headers):
    f = api_flow(headers=headers)
    held = serializers.held()
    chain.run("requestheaders", f)
    chain.run("request", f)
    assert f.response.status_code == 401
    assert f.response.headers["x-should-retry"] == "false"  # a wrong token stays wrong: no client retries it
    assert f.response.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": credentials.UNAUTHENTICATED_MESSAGE}}
    assert exchange.of(f).principal is None and serializers.held() == held


def test_pass_through_forwards_the_clients_own_credential_masked_in_the_flow(chain):
    f = api_flow(headers={"authorization": f"Bearer {OAUTH}", "anthropic-beta": "oauth-2025-04-20"})
    chain.run("requestheaders", f)
    chain.run("request", f)
    assert exchange.of(f).principal == "subscription" and OAUTH not in str(f.request.headers)
    assert f"authorization: Bearer {OAUTH}\r\n".encode() in sent_head(f)
    assert KEY.encode() not in sent_head(f)


def test_missing_upstream_key_is_a_500_not_a_forward(chain, tmp_path):
    chain.custody.store.keys.clear()
    (tmp_path / "k").unlink()
    f = api_flow(headers={"x-api-key": TOKEN_A})
    chain.run("requestheaders", f)
    chain.run("request", f)
    assert f.response.status_code == 500 and "no upstream key 'main'" in f.response.text


def test_flows_without_credentials_rules_are_untouched():
    c = Chain(BASE_RULES)
    with taddons.context(*c.parts):
        f = api_flow(headers={"x-api-key": "sk-ant-own"})
        c.run("requestheaders", f)
        c.run("request", f)
        assert f.request.headers["x-api-key"] == "sk-ant-own" and f.response is None


def test_an_echoed_key_is_masked_in_bodies_headers_and_stream_events(chain):
    from mitmproxy.test import tutils

    from llm_gateway.protocol.sse import Event

    f = api_flow(headers={"x-api-key": TOKEN_A})
    chain.run("requestheaders", f)
    chain.run("request", f)
    f.response = tutils.tresp(status_code=401, content=f'{{"error":"invalid x-api-key: {KEY}"}}'.encode())
    f.response.headers["x-echo"] = KEY
    chain.run("responseheaders", f)
    chain.run("response", f)
    assert KEY not in f.response.text and KEY not in str(f.response.headers)
    [tap] = [t for t in exchange.of(f).sse_taps if isinstance(t, credentials.ScrubTap)]
    event = tap.on_event(Event(f'event: error\ndata: {{"message":"{KEY}"}}\n\n'.encode()))
    assert KEY.encode() not in event.raw and b"masked by the gateway" in event.raw


# ------------------------------------------------------------------------------------------ minting


def test_mint_prints_the_token_once_and_a_line_that_parses(capsys):
    assert mint_token.main(["team-a", "--upstream", "main"]) == 0
    out = capsys.readouterr().out.splitlines()
    token, line = out[1], out[3]
    assert token.startswith("llmgw-") and out.count(token) == 1 and token not in line
    text = f"credentials:\n  upstream:\n    - {{name: main, key_env: X}}\n  tokens:\n    {line}\n"
    [t] = rules.parse(text).credentials.tokens
    assert (t.name, t.sha256, t.upstream) == ("team-a", token_hash(token), "main")


def test_mint_refuses_a_bad_name():
    with pytest.raises(SystemExit):
        mint_token.main(["bad name"])


def test_off_api_paths_of_api_hosts_lose_tokens_but_pass_through_passes(chain):
    f = api_flow(path="/api/claude_code/settings", headers={"x-api-key": TOKEN_A})
    chain.run("requestheaders", f)
    chain.run("request", f)
    assert exchange.of(f) is None and f.response is None
    assert "x-api-key" not in f.request.headers and TOKEN_A.encode() not in sent_head(f) and KEY.encode() not in sent_head(f)
    f = api_flow(path="/api/oauth/profile", headers={"authorization": f"Bearer {OAUTH}", "anthropic-beta": "oauth-1"})
    chain.run("requestheaders", f)
    assert OAUTH not in str(f.request.headers) and f"Bearer {OAUTH}".encode() in sent_head(f)
    f = api_flow(host="example.com", path="/x", headers={"x-api-key": TOKEN_A})
    chain.run("requestheaders", f)
    assert f.request.headers["x-api-key"] == TOKEN_A  # not an API host: none of the gateway's business


def test_a_token_sent_to_a_path_the_gateway_answers_itself_leaves_the_flow(chain):
    from mitmproxy import http

    f = api_flow(path="/-/metrics", headers={"authorization": f"Bearer {TOKEN_A}"})
    f.response = http.Response.make(200, b"metrics")  # as Endpoints answers, before custody's hook
    chain.run("requestheaders", f)
    assert TOKEN_A not in str(f.request.headers)


def test_the_mint_token_command(tmp_path):
    import subprocess

    script = Path(__file__).resolve().parents[3] / "scripts" / "mint-token"
    done = subprocess.run([str(script), "ci-pool", "--client", "claude-code"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    token, line = done.stdout.splitlines()[1], done.stdout.splitlines()[3]
    assert line == f'- {{name: ci-pool, sha256: "{token_hash(token)}", client: claude-code}}'
    bad = subprocess.run([str(script), "no spaces please"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "token name" in bad.stderr and not bad.stdout
