"""The rule file parser: plain typed data out, file:line:reason for anything wrong."""

from pathlib import Path

import pytest

from llm_gateway.policy import rules
from llm_gateway.policy.failover import serving
from llm_gateway.policy.rules import RulesError
from llm_gateway.policy.spec import Upstream

ROOT = Path(__file__).resolve().parents[3]

FULL = """\
apis:
  - name: anthropic
    hosts: [api.anthropic.com, "*.example.com"]
    paths: ["/v1/messages", "/anthropic/v1/messages"]
routes:
  - match: {host: api.anthropic.com, mode: regular}
    upstream: http://127.0.0.1:4000/anthropic/
  - upstream: https://gateway.example.com
clients:
  - name: litellm
    user_agent: "litellm/*"
    headers: ["x-litellm-*"]
    stream: "off"
  - name: cc
    header_values: {X-App: cli}
    system_prompt: "You are Claude Code"
egress:
  default: allow
  allow: [api.anthropic.com, "*.github.com:443", "API.Example.COM."]
  inspect: [api.anthropic.com]
  block:
    - {host: api.anthropic.com, path: "/api/*"}
usage:
  log: logs/usage.jsonl
errors:
  unwrap: false
  max_message: 500
pricing:
  - {model: "claude-opus-4*", input: 15, output: 75, cache_write_5m: 18.75, cache_write_1h: 30, cache_read: 1.5}
"""


def test_full_file_becomes_plain_data(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(FULL)
    r = rules.load(path)
    assert r.source == str(path)
    assert r.apis[0].name == "anthropic"
    assert r.apis[0].hosts[1].match("EU.Example.com")
    assert r.routes[0].upstream == Upstream("http", "127.0.0.1", 4000, "/anthropic")
    assert r.routes[0].mode == "regular" and r.routes[0].host.match("api.anthropic.com")
    assert r.routes[1].upstream == Upstream("https", "gateway.example.com", 443, "")
    assert str(r.routes[1].upstream) == "https://gateway.example.com"
    assert r.clients[0].name == "litellm" and r.clients[0].stream == "off"
    assert r.clients[0].user_agent[0].match("LiteLLM/1.91.5")
    assert r.clients[1].header_values[0][0] == "x-app" and r.clients[1].header_values[0][1].match("CLI")
    assert r.clients[1].system_prompt == ("You are Claude Code",)
    assert r.clients[1].stream == "as-sent"
    assert r.egress.default == "allow"
    assert r.egress.allow[1].port == 443 and r.egress.allow[1].match("api.github.com", 443)
    assert not r.egress.allow[1].match("api.github.com", 80)
    assert r.egress.allow[2].match("api.example.com", 443)  # lower-cased, trailing dot removed
    assert r.egress.block[0].path.match("/api/event_logging/batch")
    assert r.usage.log == str(tmp_path / "logs" / "usage.jsonl")
    assert r.errors.unwrap is False and r.errors.max_message == 500
    assert r.pricing[0].cache_read == 1.5 and r.pricing[0].model.match("claude-opus-4-8")


def test_default_rule_file_loads():
    r = rules.load(ROOT / "rules.yaml")
    assert any(a.name == "anthropic" for a in r.apis)
    assert r.usage.log and r.usage.log.endswith("usage.jsonl")


@pytest.mark.parametrize("text", ["", "\n\n", "# all rules commented out\n#apis: []\n", "---\n"])
def test_empty_file_is_refused(text):
    """An emptied rule file would switch every rule off at once: it is refused like a broken one."""
    with pytest.raises(RulesError, match=r"^x.yaml:1: the rule file is empty"):
        rules.parse(text, "x.yaml")


@pytest.mark.parametrize("value, mode", [("off", "off"), ("on", "on"), ("no", "off"), ("yes", "on"),
                                         ("false", "off"), ("true", "on"), ('"off"', "off"), ("as-sent", "as-sent")])
def test_stream_accepts_what_yaml_makes_of_on_and_off(value, mode):
    """`stream: off` unquoted is YAML 1.1's boolean false: take it as the author meant it."""
    r = rules.parse(f"clients:\n  - name: x\n    user_agent: x\n    stream: {value}\n", "x.yaml")
    assert r.clients[0].stream == mode


@pytest.mark.parametrize(
    "text, line, reason",
    [
        ("apis: [\n", 2, "YAML syntax error"),
        ("apis:\n  - name: a\n    hosts: [x]\n    paths: [/v1]\n    colour: red\n", 5, "unknown key 'colour'"),
        ("aips: []\n", 1, "unknown key 'aips'"),
        ("apis:\n  - name: a\n    hosts: 3\n    paths: [/v1]\n", 3, "must be a non-empty string"),
        ("apis:\n  - name: a\n    hosts: [\"api[.com\"]\n    paths: [/v1]\n", 3, "bad glob"),
        ("apis:\n  - name: a\n    paths: [/v1]\n", 2, "needs 'hosts'"),
        ("apis:\n  - name: a\n    hosts: [x]\n    paths: [/v1]\n    provider: azure\n", 5,
         "provider must be one of anthropic, bedrock"),
        ("clouds:\n  bedrock: {region: narnia}\n", 2, "clouds.bedrock.region 'narnia' is not an AWS region name"),
        ("clouds:\n  azure: {}\n", 2, "unknown key 'azure'"),
        ("routes:\n  - upstream: ftp://x\n", 2, "http(s)://host[:port][/prefix]"),
        ("routes:\n  - upstream: http://\n", 2, "http(s)://host[:port][/prefix]"),
        ("routes:\n  - upstream: http://x:99999\n", 2, "http(s)://host[:port][/prefix]"),
        ("routes:\n  - upstream: http://x/a?b=1\n", 2, "no query"),
        ("routes:\n  - upstream: http://u:p@x\n", 2, "credentials"),
        ("routes:\n  - match: {host: x, colour: y}\n    upstream: http://x\n", 2, "unknown key 'colour'"),
        ("clients:\n  - name: x\n    stream: sometimes\n", 3, "must be one of on, off, as-sent"),
        ("clients:\n  - user_agent: x\n", 2, "needs 'name'"),
        ("egress:\n  default: maybe\n", 2, "must be one of deny, allow"),
        ("egress:\n  allow: [\"host:http\"]\n", 2, "bad port"),
        ("errors:\n  unwrap: yes please\n", 2, "true or false"),
        ("pricing:\n  - {model: x, input: -1, output: 1, cache_write_5m: 1, cache_write_1h: 1, cache_read: 1}\n", 2, "non-negative"),
        ("apis: {}\n", 1, "must be a list"),
        ("- 1\n", 1, "must be a mapping"),
        ("usage:\n  log: a\nusage:\n  log: b\n", 3, "duplicate key"),
        ("usage:\n  cache_sessions: 0\n", 2, "whole number of at least 1"),
        ("usage:\n  cache_sessions: 2.5\n", 2, "whole number of at least 1"),
        ("usage:\n  cache_ttl_5m: soon\n", 2, "usage.cache_ttl_5m must be a non-negative number"),
    ],
)
def test_refusals_name_file_line_and_reason(text, line, reason):
    with pytest.raises(RulesError) as e:
        rules.parse(text, "conf/rules.yaml")
    assert str(e.value).startswith(f"conf/rules.yaml:{line}: "), str(e.value)
    assert reason in str(e.value)


def test_api_provider_names_the_wire_format():
    found = rules.parse("apis:\n  - {name: a, hosts: [x], paths: [/v1]}\n  - {name: b, hosts: [y], paths: [/m], provider: bedrock}\n"
                        "  - {name: c, hosts: [z], paths: [/p], provider: gcp.vertex_ai}\n").apis
    assert [api.provider for api in found] == ["anthropic", "aws.bedrock", "gcp.vertex_ai"]


def test_clouds_section():
    from llm_gateway.policy.clouds import CLOUD_PLATFORM_SCOPE, bedrock_region

    found = rules.parse("apis: []\nclouds:\n  bedrock: {region: eu-central-1, profile: gw}\n  vertex: {}\n").clouds
    assert (found.bedrock.region, found.bedrock.profile, found.vertex.scopes) == ("eu-central-1", "gw", (CLOUD_PLATFORM_SCOPE,))
    assert rules.parse("apis: []\n").clouds.bedrock is None
    assert bedrock_region("bedrock-runtime.us-west-2.amazonaws.com") == "us-west-2"
    assert bedrock_region("bedrock-runtime-fips.us-east-1.amazonaws.com") == "us-east-1" and bedrock_region("127.0.0.1") is None


def test_cache_watch_keys():
    api = "apis:\n  - {name: a, hosts: [x], paths: [/v1/messages]}\n"  # a rule file with nothing else is refused
    r = rules.parse(api + "usage:\n  cache_sessions: 20\n  cache_ttl_5m: 2.5\n  cache_ttl_1h: 30\n")
    assert (r.usage.log, r.usage.cache_sessions, r.usage.cache_ttl_5m, r.usage.cache_ttl_1h) == (None, 20, 2.5, 30.0)
    d = rules.parse(api).usage
    assert (d.cache_sessions, d.cache_ttl_5m, d.cache_ttl_1h) == (5000, 300.0, 3600.0)


def test_unreadable_file(tmp_path):
    with pytest.raises(RulesError, match="cannot read"):
        rules.load(tmp_path / "missing.yaml")


def test_upstream_host_header():
    assert Upstream("http", "litellm", 4000, "/anthropic").host_header == "litellm:4000"
    assert Upstream("https", "api.anthropic.com", 443).host_header == "api.anthropic.com"
    assert Upstream("http", "::1", 8080).host_header == "[::1]:8080"


def test_a_route_may_list_its_upstreams_each_with_its_translation():
    r = rules.parse(
        "routes:\n"
        "  - match: {api: anthropic}\n"
        "    upstream:\n"
        "      - http://127.0.0.1:4000/anthropic\n"
        "      - {url: \"https://bedrock-runtime.us-east-1.amazonaws.com\", provider: bedrock, region: us-east-1}\n",
        "t.yaml",
    )
    [route] = r.routes
    assert route.upstream == Upstream("http", "127.0.0.1", 4000, "/anthropic") and route.provider == "anthropic"
    [bedrock] = route.fallbacks
    assert (str(bedrock.upstream), bedrock.provider, bedrock.region) == (
        "https://bedrock-runtime.us-east-1.amazonaws.com", "aws.bedrock", "us-east-1")
    assert serving(route, 0) is route and serving(route, 1) is bedrock


@pytest.mark.parametrize(
    "text,line,reason",
    [
        ("routes:\n  - upstream: []\n", 2, "routes[0].upstream: the list needs at least one upstream"),
        ("routes:\n  - upstream:\n      - http://a\n      - ftp://b\n", 4, "routes[0].upstream[1] must look like"),
        ("routes:\n  - upstream:\n      - http://a\n      - {url: http://b, colour: x}\n", 4, "unknown key 'colour' in routes[0].upstream[1]"),
        ("routes:\n  - upstream:\n      - http://a\n      - {provider: bedrock}\n", 4, "routes[0].upstream[1] needs 'url'"),
        ("routes:\n  - provider: bedrock\n    upstream: [http://a]\n", 2, "put provider in the upstream's own entry"),
        ("routes:\n  - upstream:\n      - {url: http://a, provider: vertex, region: us-east5}\n", 3, "needs region and project"),
    ],
)
def test_a_wrong_upstream_list_is_refused_with_its_line(text, line, reason):
    with pytest.raises(rules.RulesError) as e:
        rules.parse(text, "t.yaml")
    assert str(e.value).startswith(f"t.yaml:{line}: ") and reason in str(e.value), str(e.value)
