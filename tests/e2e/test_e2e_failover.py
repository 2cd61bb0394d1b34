"""Failover through a real mitmdump: a route lists several upstreams; one that cannot be reached, or answers 529
overloaded (or any 5xx) before the first byte of its answer, hands the same request to the next one, which may
speak another provider's format (the fake Bedrock, signed by the gateway). The real Anthropic SDK gets the answer,
streaming and not; one usage record says who answered (`upstream`) and who failed (`failed_upstreams`). An answer
that began (its headers passed on) is never retried.
"""

from __future__ import annotations

import http.client
import json
import time

import anthropic
import pytest

from e2e.test_e2e_providers import (  # noqa: F401 - cloud, token_endpoint: the fixtures
    GW_AWS_KEY_ID, GW_AWS_SECRET, MESSAGES, cloud, post, service_account, token_endpoint)
from fakes.upstream import DEFAULT_TEXT, FakeUpstream, Scenario
from harness import ROOT, Gateway, free_port

pytestmark = pytest.mark.e2e

REQUEST = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": MESSAGES}


@pytest.fixture(scope="module")
def first(module_fake):
    return module_fake  # tests/conftest.py's: the first upstream of every chain here


@pytest.fixture(scope="module")
def second():
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def closed() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connect refused


def cloud_gateway(rules: str, reverse_to: str, fake_cloud, env: dict[str, str]) -> Gateway:
    """A started gateway in front of `reverse_to` that trusts the fake cloud's CA, with `env`'s credentials."""
    return Gateway(rules, reverse_to=reverse_to, regular=False,
                   extra_args=("--set", f"ssl_verify_upstream_trusted_ca={fake_cloud.ca}"), env=env).start()


def routed(upstreams: str) -> str:
    return (ROOT / "rules.yaml").read_text().replace("routes: []", f"""routes:
  - match: {{api: anthropic}}
    upstream:
{upstreams}""")


@pytest.fixture(scope="module")
def gw(first, second, closed):
    """Anthropic upstreams: a closed port, then `first`, then `second`."""
    rules = routed(f"      - {closed}\n      - {first.url}\n      - {second.url}\n")
    gateway = Gateway(rules, reverse_to=first.url, regular=False).start()
    yield gateway
    gateway.stop()


def records(gw: Gateway) -> list[dict]:
    time.sleep(0.3)  # records land up to 0.1 s after the exchange
    return gw.records(timeout=0)


def new_record(gw: Gateway, before: int) -> dict:
    [record] = gw.wait_records(lambda r: True, count=before + 1)[before:]
    return record


def sdk(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base_url, api_key="sk-ant-api03-client-key", max_retries=0)


@pytest.mark.parametrize("call", ["create", "stream"])
def test_overloaded_upstream_hands_the_request_to_the_next(gw, first, second, closed, call):
    before, to_first, to_second = len(records(gw)), len(first.messages_requests()), len(second.messages_requests())
    first.script(Scenario.error(529))
    client = sdk(gw)
    if call == "create":
        message = client.messages.create(**REQUEST)
    else:
        with client.messages.stream(**REQUEST) as stream:
            message = stream.get_final_message()
    assert message.content[0].text == DEFAULT_TEXT
    assert message.id == second.last_message["id"]
    # the same request reached both: the first answered 529, the second served it
    [tried] = first.messages_requests()[to_first:]
    [served] = second.messages_requests()[to_second:]
    assert served.json == tried.json and served.json.get("stream", False) is (call == "stream")
    assert served.body == tried.body
    record = new_record(gw, before)
    assert record["upstream"] == second.url and record["status"] == 200 and record["complete"] is True
    assert record["input_tokens"] and record["cost_usd"] > 0
    assert [f["upstream"] for f in record["failed_upstreams"]] == [closed, first.url]
    assert record["failed_upstreams"][0]["reason"].startswith("connect failed")
    assert record["failed_upstreams"][1]["reason"] == "HTTP 529"


def test_connect_failure_alone_goes_to_the_next(gw, first, second, closed):
    before, to_second = len(records(gw)), len(second.messages_requests())
    message = sdk(gw).messages.create(**REQUEST)
    assert message.id == first.last_message["id"]
    assert len(second.messages_requests()) == to_second
    record = new_record(gw, before)
    assert record["upstream"] == first.url and record["status"] == 200
    assert [f["upstream"] for f in record["failed_upstreams"]] == [closed]


def test_the_last_upstreams_error_reaches_the_client(gw, first, second):
    before = len(records(gw))
    first.script(Scenario.error(503))
    second.script(Scenario.error(529))
    status, headers, raw = post(gw, REQUEST)
    assert status == 529 and json.loads(raw)["error"]["type"] == "overloaded_error", raw
    record = new_record(gw, before)
    assert (record["upstream"], record["status"], record["error_type"]) == (second.url, 529, "overloaded_error")
    assert [f["reason"] for f in record["failed_upstreams"]][1:] == ["HTTP 503"]


def test_an_answer_that_began_is_not_retried(gw, first, second):
    before, to_second = len(records(gw)), len(second.messages_requests())
    first.script(Scenario(abort_after=3))
    with pytest.raises(http.client.IncompleteRead) as cut:  # the stream the first upstream began is cut, not restarted
        post(gw, {**REQUEST, "stream": True})
    assert b"message_start" in cut.value.partial and b"message_stop" not in cut.value.partial
    assert len(second.messages_requests()) == to_second  # never sent on
    record = new_record(gw, before)
    assert record["upstream"] == first.url and record["complete"] is False
    assert [f["reason"][:14] for f in record["failed_upstreams"]] == ["connect failed"]  # the closed port only


@pytest.fixture(scope="module")
def to_bedrock(first, cloud):  # noqa: F811 - the fake Bedrock from test_e2e_providers
    """Anthropic first, then the fake Bedrock (translated, signed by the gateway)."""
    rules = routed(f"      - {first.url}\n      - {{url: \"{cloud.url}\", provider: bedrock, region: us-east-1}}\n")
    env = {"AWS_ACCESS_KEY_ID": GW_AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": GW_AWS_SECRET}
    gateway = cloud_gateway(rules, first.url, cloud, env)
    yield gateway
    gateway.stop()


@pytest.mark.parametrize("call", ["create", "stream"])
def test_overloaded_anthropic_fails_over_to_bedrock(to_bedrock, first, cloud, call):  # noqa: F811
    from sdk_client import without_nulls

    before, sent = len(records(to_bedrock)), len(cloud.requests)
    first.script(Scenario.error(529))
    client = sdk(to_bedrock)
    if call == "create":
        message = client.messages.create(**REQUEST)
    else:
        with client.messages.stream(**REQUEST) as stream:
            message = stream.get_final_message()
    assert without_nulls(message.model_dump(mode="json")) == without_nulls(cloud.last_message)
    [request] = cloud.requests[sent:]
    suffix = "invoke-with-response-stream" if call == "stream" else "invoke"
    assert request["path"] == f"/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/{suffix}"
    assert request["headers"]["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={GW_AWS_KEY_ID}/")
    assert "x-api-key" not in request["headers"]
    record = new_record(to_bedrock, before)
    assert (record["upstream"], record["provider"], record["translated"], record["status"]) == (
        cloud.url, "aws.bedrock", True, 200)
    assert record["failed_upstreams"] == [{"upstream": first.url, "reason": "HTTP 529"}]
    assert record["cost_usd"] > 0


# --- key custody: each upstream gets the real key, placed for it; the agent holds a gateway token ----------------

UPSTREAM_KEY = "sk-ant-api03-FAILOVER-UPSTREAM-KEY-0123456789"
TOKEN = "llmgw-failover-token-0123456789abcdef"


@pytest.fixture(scope="module")
def held(first, second, tmp_path_factory):
    from llm_gateway.policy.spec import token_hash

    key_file = tmp_path_factory.mktemp("failover-key") / "key"
    key_file.write_text(UPSTREAM_KEY)
    rules = routed(f"      - {first.url}\n      - {second.url}\n") + f"""
credentials:
  upstream:
    - {{name: main, key_file: {key_file}}}
  tokens:
    - {{name: team-a, sha256: "{token_hash(TOKEN)}"}}
"""
    gateway = Gateway(rules, reverse_to=first.url, regular=False).start()
    yield gateway
    gateway.stop()


def test_with_key_custody_each_upstream_gets_the_real_key(held, first, second):
    before, to_first, to_second = len(records(held)), len(first.messages_requests()), len(second.messages_requests())
    client = anthropic.Anthropic(base_url=held.base_url, api_key=TOKEN, max_retries=0)
    first.script(Scenario.error(529))
    assert client.messages.create(**REQUEST).id == second.last_message["id"]
    assert client.messages.create(**REQUEST).id == first.last_message["id"]  # the same client connection, kept alive
    tried, served_first = first.messages_requests()[to_first:]
    [served] = second.messages_requests()[to_second:]
    assert tried.headers["x-api-key"] == served.headers["x-api-key"] == served_first.headers["x-api-key"] == UPSTREAM_KEY
    failed, plain = held.wait_records(lambda r: True, count=before + 2)[before:]
    assert (failed["principal"], failed["upstream"], failed["failed_upstreams"]) == (
        "team-a", second.url, [{"upstream": first.url, "reason": "HTTP 529"}])
    assert (plain["upstream"], plain["failed_upstreams"]) == (first.url, [])
    assert UPSTREAM_KEY not in held.output() and UPSTREAM_KEY not in held.usage_log.read_text()


# --- the gateway's own answer is not handed on -------------------------------------------------------------------


@pytest.fixture(scope="module")
def impatient(first, second):
    rules = routed(f"      - {first.url}\n      - {second.url}\n") + "\ntimeouts:\n  first_byte: 1\n  non_streaming: 1\n"
    gateway = Gateway(rules, reverse_to=first.url, regular=False).start()
    yield gateway
    gateway.stop()


def test_a_first_byte_timeout_answers_its_504_and_is_not_handed_on(impatient, first, second):
    before, to_second = len(records(impatient)), len(second.messages_requests())
    first.script(Scenario(hang=True))
    status, headers, raw = post(impatient, REQUEST)
    assert status == 504 and json.loads(raw)["error"]["type"] == "timeout_error", raw
    assert len(second.messages_requests()) == to_second
    record = new_record(impatient, before)
    assert (record["upstream"], record["failed_upstreams"], record["status"]) == (first.url, [], 504)


# --- an upstream that takes the connection and closes it before answering ---------------------------------------


@pytest.fixture(scope="module")
def closer():
    """Accepts on 127.0.0.1, reads the request, closes without a byte; stops with the module."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    server.close()


@pytest.fixture(scope="module")
def after_close(closer, second):
    gateway = Gateway(routed(f"      - {closer}\n      - {second.url}\n"), reverse_to=second.url, regular=False).start()
    yield gateway
    gateway.stop()


def test_an_upstream_closing_before_its_answer_hands_on(after_close, closer, second):
    before = len(records(after_close))
    with sdk(after_close).messages.stream(**REQUEST) as stream:
        message = stream.get_final_message()
    assert message.id == second.last_message["id"]
    record = new_record(after_close, before)
    assert record["upstream"] == second.url and record["status"] == 200 and record["complete"] is True
    [failed] = record["failed_upstreams"]
    assert failed["upstream"] == closer and failed["reason"].startswith("closed before answering"), failed


# --- Bedrock first (translated, signed), Anthropic next: the client's own request goes on -----------------------


@pytest.fixture(scope="module")
def from_bedrock(second, cloud):  # noqa: F811
    rules = routed(f"      - {{url: \"{cloud.url}\", provider: bedrock, region: us-east-1}}\n      - {second.url}\n")
    env = {"AWS_ACCESS_KEY_ID": GW_AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": GW_AWS_SECRET}
    gateway = cloud_gateway(rules, second.url, cloud, env)
    yield gateway
    gateway.stop()


def test_unavailable_bedrock_hands_the_clients_own_request_to_anthropic(from_bedrock, second, cloud):  # noqa: F811
    from fakes.clouds import FAKE_HEADER

    before, sent, to_second = len(records(from_bedrock)), len(cloud.requests), len(second.messages_requests())
    status, _, raw = post(from_bedrock, REQUEST, {FAKE_HEADER: "overloaded"})
    assert status == 200 and json.loads(raw)["id"] == second.last_message["id"], raw
    [tried] = cloud.requests[sent:]
    assert tried["path"].endswith("/invoke") and tried["headers"]["authorization"].startswith("AWS4-HMAC-SHA256")
    [served] = second.messages_requests()[to_second:]
    assert served.json == REQUEST and served.path_only == "/v1/messages"  # not Bedrock's body or path
    assert served.headers["x-api-key"] == "sk-ant-api03-client-key" and served.headers["anthropic-version"] == "2023-06-01"
    assert not {"authorization", "x-amz-date", "x-amz-security-token"} & {k.lower() for k in served.headers.keys()}
    record = new_record(from_bedrock, before)
    assert (record["upstream"], record["provider"], record["translated"]) == (second.url, "anthropic", False)
    assert record["failed_upstreams"] == [{"upstream": cloud.url, "reason": "HTTP 503"}]


def test_a_throttled_upstream_is_not_handed_on(from_bedrock, second, cloud):  # noqa: F811
    from fakes.clouds import FAKE_HEADER

    to_second = len(second.messages_requests())
    status, headers, raw = post(from_bedrock, REQUEST, {FAKE_HEADER: "throttle"})
    assert status == 429 and json.loads(raw)["error"]["type"] == "rate_limit_error", raw
    assert len(second.messages_requests()) == to_second


# --- three providers in a row: Anthropic overloaded, Bedrock unavailable, Vertex serves ---------------------------


@pytest.fixture(scope="module")
def chain(first, cloud, token_endpoint, tmp_path_factory):  # noqa: F811
    rules = routed(f"      - {first.url}\n"
                   f"      - {{url: \"{cloud.url}\", provider: bedrock, region: us-east-1}}\n"
                   f"      - {{url: \"{cloud.url}\", provider: vertex, region: us-east5, project: demo-project}}\n")
    env = {"AWS_ACCESS_KEY_ID": GW_AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": GW_AWS_SECRET,
           "GOOGLE_APPLICATION_CREDENTIALS": str(service_account(tmp_path_factory.mktemp("chain"), token_endpoint))}
    gateway = cloud_gateway(rules, first.url, cloud, env)
    yield gateway
    gateway.stop()


def test_anthropic_then_bedrock_fail_and_vertex_serves(chain, first, cloud):  # noqa: F811
    from fakes.clouds import FAKE_HEADER
    from sdk_client import without_nulls

    before, sent = len(records(chain)), len(cloud.requests)
    first.script(Scenario.error(529))
    client = anthropic.Anthropic(base_url=chain.base_url, api_key="sk-ant-api03-client-key", max_retries=0,
                                 default_headers={FAKE_HEADER: "overloaded"})  # the fake Bedrock answers 503
    with client.messages.stream(**REQUEST) as stream:
        message = stream.get_final_message()
    assert without_nulls(message.model_dump(mode="json")) == without_nulls(cloud.last_message)
    bedrock, vertex = cloud.requests[sent:]
    assert bedrock["path"].endswith("/invoke-with-response-stream")
    assert vertex["path"] == ("/v1/projects/demo-project/locations/us-east5/publishers/anthropic/models/"
                              "claude-sonnet-4-5@20250929:streamRawPredict")
    assert vertex["headers"]["authorization"].startswith("Bearer ya29.minted-")  # fetched while the flow waited
    record = new_record(chain, before)
    assert (record["upstream"], record["provider"], record["translated"], record["complete"]) == (
        cloud.url, "gcp.vertex_ai", True, True)
    assert record["failed_upstreams"] == [{"upstream": first.url, "reason": "HTTP 529"},
                                          {"upstream": cloud.url, "reason": "HTTP 503"}]


# --- the next upstream refused by the gateway itself: its native answer goes to the client ------------------------


@pytest.fixture(scope="module")
def no_aws(first, cloud, tmp_path_factory):  # noqa: F811
    """Anthropic, then Bedrock, with no AWS credentials anywhere the default chain looks."""
    nothing = tmp_path_factory.mktemp("no-aws") / "none"
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(nothing), "AWS_CONFIG_FILE": str(nothing), "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    rules = routed(f"      - {first.url}\n      - {{url: \"{cloud.url}\", provider: bedrock, region: us-east-1}}\n")
    gateway = cloud_gateway(rules, first.url, cloud, env)
    yield gateway
    gateway.stop()


def test_a_next_upstream_the_gateway_cannot_sign_for_answers_natively(no_aws, first, cloud):  # noqa: F811
    before, sent = len(records(no_aws)), len(cloud.requests)
    first.script(Scenario.error(529))
    status, headers, raw = post(no_aws, REQUEST)
    assert status == 500 and headers.get("x-should-retry") == "false", raw
    assert json.loads(raw)["error"]["type"] == "api_error" and "credentials" in json.loads(raw)["error"]["message"]
    assert len(cloud.requests) == sent
    record = new_record(no_aws, before)
    assert (record["upstream"], record["status"], record["error_type"]) == (cloud.url, 500, "api_error")
    assert record["failed_upstreams"] == [{"upstream": first.url, "reason": "HTTP 529"}]
