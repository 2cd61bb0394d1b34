"""Claude on Amazon Bedrock and Google Vertex AI through a real mitmdump: the cloud clients' own traffic observed in
egress mode, with the repository's default rules.yaml; and base-URL mode, where the gateway holds the cloud
credentials (its own AWS keys, a Google service account whose token endpoint is the fake) and agents a gateway token.

The real Anthropic SDK clients (`AnthropicBedrock`, `AnthropicVertex`, tests/cloud_client.py) sign their requests
(SigV4 from AWS_* keys; a Vertex bearer token) and go through HTTPS_PROXY, trusting the gateway CA. The cloud
host names resolve to the fake (tests/fakes/clouds.py, TLS with a CA of its own that the gateway trusts as an
upstream CA) through tests/fakes/resolve.py, so the gateway decrypts, reads and forwards exactly what it would
send to the cloud.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cloud_client import BEDROCK_MODEL, VERTEX_MODEL, run
from e2e.test_e2e_egress import RESOLVE, make_ca_and_leaf
from fakes.clouds import FAKE_HEADER, USAGE, FakeCloud
from fakes.upstream import DEFAULT_TEXT, Scenario, message_to_events, sse_frame
from harness import ROOT, Gateway
from realclients import run_claude

pytestmark = pytest.mark.e2e

BEDROCK_HOST = "bedrock-runtime.us-east-1.amazonaws.com"
CONTROL_HOST = "bedrock.us-east-1.amazonaws.com"  # Claude Code's Bedrock mode asks the control plane first
VERTEX_HOST = "us-east5-aiplatform.googleapis.com"
AWS_KEY_ID = "AKIAFAKEGATEWAYTEST1"
AWS_SECRET = "fake-aws-secret-never-logged-0123456789abcd"
VERTEX_TOKEN = "ya29.fake-google-token-never-logged-0123456789"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    ca, cert, key = make_ca_and_leaf(tmp_path_factory.mktemp("cloud-tls"), [BEDROCK_HOST, VERTEX_HOST, CONTROL_HOST])
    with FakeCloud(cert, key) as fake:
        fake.ca = ca
        yield fake


@pytest.fixture(scope="module")
def gw(cloud):
    hosts = ",".join(f"{host}=127.0.0.1:{cloud.port}" for host in (BEDROCK_HOST, VERTEX_HOST, CONTROL_HOST))
    gateway = Gateway(
        (ROOT / "rules.yaml").read_text(), reverse_to=None,
        extra_args=("-s", str(RESOLVE), "--set", f"ssl_verify_upstream_trusted_ca={cloud.ca}"),
        env={"LLM_GATEWAY_TEST_HOSTS": hosts},
    ).start()
    yield gateway
    gateway.stop()


def egress_env(gw: Gateway) -> dict[str, str]:
    return {"HTTPS_PROXY": gw.proxy_url, "SSL_CERT_FILE": str(gw.ca_bundle()), "AWS_ACCESS_KEY_ID": AWS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_REGION": "us-east-1", "VERTEX_TEST_TOKEN": VERTEX_TOKEN}


def usage_records(gw: Gateway) -> list[dict]:
    if not gw.usage_log.exists():
        return []
    return [r for r in map(json.loads, gw.usage_log.read_text().splitlines()) if r.get("kind") == "usage"]


def mark(gw: Gateway) -> int:
    """How many usage records there are once the ones still on their way landed (written up to 0.1 s late)."""
    time.sleep(0.3)
    return len(usage_records(gw))


def new_record(gw: Gateway, before: int) -> dict:
    [record] = gw.wait_records(lambda r: True, count=before + 1)[before:]
    return record


CASES = [
    ("bedrock", "create", "aws.bedrock", BEDROCK_HOST, BEDROCK_MODEL),
    ("bedrock", "stream", "aws.bedrock", BEDROCK_HOST, BEDROCK_MODEL),
    ("vertex", "create", "gcp.vertex_ai", VERTEX_HOST, VERTEX_MODEL),
    ("vertex", "stream", "gcp.vertex_ai", VERTEX_HOST, VERTEX_MODEL),
]


@pytest.mark.parametrize("which,call,provider,host,model", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_cloud_sdk_client_in_egress_mode_gives_one_priced_record(gw, cloud, which, call, provider, host, model):
    before = mark(gw)
    sent = len(cloud.requests)
    out = run(which, call, env=egress_env(gw))
    assert out["ok"], out
    assert out["message"]["content"][0]["text"] == DEFAULT_TEXT
    assert out["message"]["usage"]["cache_read_input_tokens"] == USAGE["cache_read_input_tokens"]
    # the request reached the cloud as the client signed it
    [request] = cloud.requests[sent:]
    if which == "bedrock":
        assert request["headers"]["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={AWS_KEY_ID}/")
    else:
        assert request["headers"]["authorization"] == f"Bearer {VERTEX_TOKEN}"
    record = new_record(gw, before)
    assert (record["provider"], record["host"], record["mode"], record["status"]) == (provider, host, "regular", 200)
    assert record["api"] == which and record["complete"] is True and record["error_type"] is None
    assert record["stream_requested"] is (call == "stream")
    assert record["model"] == "claude-sonnet-4-5-20250929"  # the model the answer names
    assert (record["input_tokens"], record["output_tokens"], record["cache_read_input_tokens"]) == (
        USAGE["input_tokens"], USAGE["output_tokens"], USAGE["cache_read_input_tokens"])
    assert record["cost_usd"] and record["cost_usd"] > 0 and record["price_source"].startswith("genai-prices")
    assert record["saved_usd"] > 0


def test_bedrock_throttling_reaches_the_client_and_the_record(gw, cloud):
    before = mark(gw)
    out = run("bedrock", "create", env=egress_env(gw), headers={FAKE_HEADER: "throttle"})
    assert not out["ok"] and out["status"] == 429 and out["error"] == "RateLimitError", out
    record = new_record(gw, before)
    assert (record["provider"], record["status"], record["error_type"]) == ("aws.bedrock", 429, "rate_limit_error")


def test_bedrock_exception_frame_mid_stream_is_recorded(gw, cloud):
    before = mark(gw)
    out = run("bedrock", "stream", env=egress_env(gw), headers={FAKE_HEADER: "throttle-mid-stream"})
    assert not out["ok"], out  # the SDK raises on the exception frame, which passed unchanged
    record = new_record(gw, before)
    assert (record["provider"], record["status"], record["error_type"]) == ("aws.bedrock", 200, "rate_limit_error")
    assert record["complete"] is False and record["input_tokens"] == USAGE["input_tokens"]


def test_vertex_google_error_is_recorded(gw, cloud):
    before = mark(gw)
    out = run("vertex", "create", env=egress_env(gw), headers={FAKE_HEADER: "throttle"})
    assert not out["ok"] and out["status"] == 429, out
    assert out["body"]["error"]["status"] == "RESOURCE_EXHAUSTED"  # the cloud's own shape, for its own client
    record = new_record(gw, before)
    assert (record["provider"], record["status"], record["error_type"]) == ("gcp.vertex_ai", 429, "rate_limit_error")


def test_no_cloud_secret_signature_or_token_in_records_or_log(gw, cloud):
    run("bedrock", "stream", env=egress_env(gw))
    run("vertex", "create", env=egress_env(gw))
    signatures = [r["headers"]["authorization"].rsplit("Signature=", 1)[-1] for r in cloud.requests
                  if r["headers"].get("authorization", "").startswith("AWS4")]
    assert signatures
    texts = gw.usage_log.read_text() + gw.output()
    for secret in [AWS_SECRET, VERTEX_TOKEN, *signatures]:
        assert secret not in texts


def test_claude_code_on_bedrock_in_egress_mode(gw, cloud, tmp_path):
    """CLAUDE_CODE_USE_BEDROCK=1 behind HTTPS_PROXY: its control-plane call is tunnelled (the client trusts the
    cloud's own CA there), its InvokeModel calls are read, and its streamed turn is one priced record."""
    before = mark(gw)
    bundle = tmp_path / "cas.pem"
    bundle.write_text(gw.ca_cert.read_text() + "\n" + cloud.ca.read_text())
    done = run_claude("say hi", env_extra={
        "HTTPS_PROXY": gw.proxy_url, "NODE_EXTRA_CA_CERTS": str(bundle), "CLAUDE_CODE_USE_BEDROCK": "1",
        "AWS_ACCESS_KEY_ID": AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_REGION": "us-east-1"}, timeout=120)
    assert done.returncode == 0 and DEFAULT_TEXT in done.stdout, done.stderr[-2000:]
    gw.wait_records(lambda r: r["client"] == "claude-code" and r["stream_requested"], count=1)
    records = usage_records(gw)[before:]
    assert records and {(r["provider"], r["client"]) for r in records} == {("aws.bedrock", "claude-code")}
    [turn] = [r for r in records if r["stream_requested"]]
    assert turn["path"].endswith("/invoke-with-response-stream") and turn["complete"] is True and turn["status"] == 200
    assert turn["session"] and turn["cache_read_input_tokens"] == USAGE["cache_read_input_tokens"]
    assert turn["cost_usd"] > 0
    assert AWS_SECRET not in gw.usage_log.read_text() + gw.output()


# --- base-URL mode: the gateway holds the cloud credentials ---------------------------------------------------------

GATEWAY_TOKEN = "gw-token-team-a-0123456789abcdef0123456789"
GW_AWS_KEY_ID = "AKIAGATEWAYHELDKEY01"
GW_AWS_SECRET = "gateway-held-aws-secret-0123456789abcdefgh"
GW_AWS_SESSION = "gateway-held-aws-session-token-0123456789"


@pytest.fixture(scope="module")
def token_endpoint():
    with FakeCloud() as fake:  # Google's token endpoint, plain HTTP on 127.0.0.1
        yield fake


def service_account(folder, token_endpoint: FakeCloud):
    """A Google service-account key file whose token endpoint is the fake (the JWT grant is signed for real)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    account = folder / "service-account.json"
    account.write_text(json.dumps({
        "type": "service_account", "project_id": "demo-project", "private_key_id": "k1", "private_key": pem.decode(),
        "client_email": "gateway@demo-project.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": f"{token_endpoint.url}/token"}))
    return account


@pytest.fixture(scope="module")
def held(cloud, token_endpoint, tmp_path_factory):
    """A gateway whose base-URL listener goes to the fake clouds and which holds AWS keys and a Google service account."""
    account = service_account(tmp_path_factory.mktemp("held"), token_endpoint)
    rules = (ROOT / "rules.yaml").read_text() + f"""
clouds:
  bedrock: {{region: us-east-1}}
  vertex: {{}}
credentials:
  upstream:
    - {{name: main, key_env: GW_TEST_ANTHROPIC_KEY}}
  tokens:
    - {{name: team-a, sha256: {hashlib.sha256(GATEWAY_TOKEN.encode()).hexdigest()}}}
"""
    env = {"AWS_ACCESS_KEY_ID": GW_AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": GW_AWS_SECRET, "AWS_SESSION_TOKEN": GW_AWS_SESSION,
           "GOOGLE_APPLICATION_CREDENTIALS": str(account), "GW_TEST_ANTHROPIC_KEY": "sk-ant-api03-held-key-never-logged"}
    env["LLM_GATEWAY_TEST_HOSTS"] = ",".join(f"{host}=127.0.0.1:{cloud.port}" for host in (BEDROCK_HOST, VERTEX_HOST))
    gateway = Gateway(rules, reverse_to=cloud.url, extra_args=(
        "-s", str(RESOLVE), "--set", f"ssl_verify_upstream_trusted_ca={cloud.ca}"), env=env).start()
    yield gateway
    gateway.stop()


def test_with_key_custody_on_client_signed_egress_requests_pass_untouched(held, cloud):
    """The base-URL listener wants gateway tokens; a request its client signed itself, through the egress listener,
    is not a token to check nor a credential to replace: it reaches the cloud as signed."""
    before = mark(held)
    sent = len(cloud.requests)
    out = run("bedrock", "stream", env=egress_env(held))
    assert out["ok"], out
    [request] = cloud.requests[sent:]
    assert request["headers"]["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={AWS_KEY_ID}/")
    record = new_record(held, before)
    assert (record["mode"], record["provider"], record["principal"], record["status"]) == ("regular", "aws.bedrock", None, 200)


@pytest.mark.parametrize("which,call,provider", [c[:3] for c in CASES], ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_cloud_sdk_client_with_a_gateway_token_is_signed_by_the_gateway(held, cloud, which, call, provider):
    before = mark(held)
    sent = len(cloud.requests)
    env = {"AWS_BEARER_TOKEN_BEDROCK": GATEWAY_TOKEN, "AWS_REGION": "us-east-1", "VERTEX_TEST_TOKEN": GATEWAY_TOKEN}
    out = run(which, call, env=env, base_url=held.base_url)
    assert out["ok"], out
    [request] = cloud.requests[sent:]
    auth = request["headers"]["authorization"]
    if which == "bedrock":
        assert auth.startswith(f"AWS4-HMAC-SHA256 Credential={GW_AWS_KEY_ID}/") and "/us-east-1/bedrock/aws4_request" in auth
        assert request["headers"]["x-amz-security-token"] == GW_AWS_SESSION
    else:
        assert auth.startswith("Bearer ya29.minted-") and request["path"].startswith("/v1/projects/demo-project/")
    assert GATEWAY_TOKEN not in json.dumps(request["headers"])
    record = new_record(held, before)
    assert (record["provider"], record["mode"], record["principal"], record["status"]) == (provider, "reverse", "team-a", 200)
    assert record["cache_read_input_tokens"] == USAGE["cache_read_input_tokens"] and record["cost_usd"] > 0


def test_google_token_is_cached_not_minted_per_request(held, cloud, token_endpoint):
    env = {"VERTEX_TEST_TOKEN": GATEWAY_TOKEN}
    for _ in range(2):
        assert run("vertex", "create", env=env, base_url=held.base_url)["ok"]
    assert token_endpoint.tokens_minted == 1


def test_a_cloud_request_without_a_gateway_token_is_refused(held, cloud):
    sent = len(cloud.requests)
    out = run("bedrock", "create", env={"AWS_BEARER_TOKEN_BEDROCK": "not-a-gateway-token", "AWS_REGION": "us-east-1"},
              base_url=held.base_url)
    assert not out["ok"] and out["status"] == 401, out
    assert len(cloud.requests) == sent


def test_claude_code_on_bedrock_with_the_gateway_holding_the_credentials(held, cloud):
    """ANTHROPIC_BEDROCK_BASE_URL + CLAUDE_CODE_SKIP_BEDROCK_AUTH=1: Claude Code signs nothing; its gateway token
    goes in a custom header; the gateway signs every request with its own AWS credentials."""
    before = mark(held)
    sent = len(cloud.requests)
    done = run_claude("say hi", env_extra={
        "CLAUDE_CODE_USE_BEDROCK": "1", "ANTHROPIC_BEDROCK_BASE_URL": held.base_url, "CLAUDE_CODE_SKIP_BEDROCK_AUTH": "1",
        "AWS_REGION": "us-east-1", "ANTHROPIC_CUSTOM_HEADERS": f"x-api-key: {GATEWAY_TOKEN}"}, timeout=120)
    assert done.returncode == 0 and DEFAULT_TEXT in done.stdout, (done.stdout[-1000:], done.stderr[-2000:], held.output()[-3000:])
    assert all(r["headers"]["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={GW_AWS_KEY_ID}/")
               for r in cloud.requests[sent:])
    held.wait_records(lambda r: r["client"] == "claude-code" and r["stream_requested"], count=1)
    records = usage_records(held)[before:]
    assert {(r["provider"], r["client"], r["principal"]) for r in records} == {("aws.bedrock", "claude-code", "team-a")}


def test_held_secrets_reach_no_record_or_log(held, cloud, token_endpoint):
    texts = held.usage_log.read_text() + held.output()
    minted = [f"ya29.minted-{n:04d}-secret" for n in range(1, token_endpoint.tokens_minted + 1)]
    signatures = [r["headers"]["authorization"].rsplit("Signature=", 1)[-1] for r in cloud.requests
                  if r["headers"].get("authorization", "").startswith(f"AWS4-HMAC-SHA256 Credential={GW_AWS_KEY_ID}")]
    assert minted and signatures
    for secret in [GW_AWS_SECRET, GW_AWS_SESSION, GATEWAY_TOKEN, *minted, *signatures]:
        assert secret not in texts


# --- translation: an Anthropic request served by Bedrock ------------------------------------------------------------


@pytest.fixture(scope="module")
def translating(cloud):
    """A base-URL listener whose Anthropic requests a `provider: bedrock` route sends to the fake Bedrock."""
    rules = (ROOT / "rules.yaml").read_text().replace("routes: []", f"""routes:
  - match: {{api: anthropic}}
    upstream: {cloud.url}
    provider: bedrock
    region: us-east-1""")
    env = {"AWS_ACCESS_KEY_ID": GW_AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": GW_AWS_SECRET}
    gateway = Gateway(rules, reverse_to=cloud.url, regular=False,
                      extra_args=("--set", f"ssl_verify_upstream_trusted_ca={cloud.ca}"), env=env).start()
    yield gateway
    gateway.stop()


def post(gw: Gateway, body: dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{gw.base_url}/v1/messages", data=json.dumps(body).encode(), method="POST", headers={
        "content-type": "application/json", "x-api-key": "sk-ant-api03-client-key", "anthropic-version": "2023-06-01",
        **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers.items()), answer.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


MESSAGES = [{"role": "user", "content": "hello"}]
PING = b'event: ping\ndata: {"type": "ping"}\n\n'  # as Anthropic's API sends it


def api_events(message: dict) -> bytes:
    """The SSE bytes Anthropic's API streams `message` as: its events, and a ping right after message_start."""
    frames = [b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(data, separators=(",", ":")).encode())
              for name, data in message_to_events(message, Scenario(ping=False))]
    return frames[0] + PING + b"".join(frames[1:])


def test_translated_stream_gives_the_client_anthropics_own_events(translating, cloud):
    before = mark(translating)
    sent = len(cloud.requests)
    status, headers, raw = post(translating, {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True,
                                              "messages": MESSAGES, "tags": {"team": "a"}},
                                {"anthropic-beta": "interleaved-thinking-2025-05-14,request-tags-2026-08-21"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), raw
    # byte for byte the events the API itself would send for this Message, its ping after message_start included
    assert raw == api_events(cloud.last_message)
    [request] = cloud.requests[sent:]
    assert request["path"] == "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke-with-response-stream"
    assert request["headers"]["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={GW_AWS_KEY_ID}/")
    assert "x-api-key" not in request["headers"] and "anthropic-beta" not in request["headers"]
    body = json.loads(request["body"])
    assert body["anthropic_version"] == "bedrock-2023-05-31" and body["anthropic_beta"] == ["interleaved-thinking-2025-05-14"]
    assert not {"model", "stream", "tags"} & set(body)  # the tags field left together with its beta
    record = new_record(translating, before)
    assert (record["provider"], record["translated"], record["status"], record["complete"]) == ("aws.bedrock", True, 200, True)
    assert record["cache_read_input_tokens"] == USAGE["cache_read_input_tokens"] and record["cost_usd"] > 0


def test_a_silent_bedrock_stream_gets_pings_and_the_same_message(translating, cloud):
    """Bedrock silent longer than the ping interval (10 s) after a content_block_start: the client sees an
    `event: ping` in the gap, and without the pings the events are those of the Message Bedrock built."""
    status, headers, raw = post(translating, {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True,
                                              "messages": MESSAGES}, {FAKE_HEADER: "pause-11.5"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), raw
    events = raw.split(b"\n\n")[:-1]
    first_block = next(i for i, e in enumerate(events) if e.startswith(b"event: content_block_start\n"))
    assert events[1] + b"\n\n" == PING  # right after message_start, as the API does
    assert PING in b"\n\n".join(events[first_block + 1:])  # and during the silence that followed
    assert raw.replace(PING, b"") == api_events(cloud.last_message).replace(PING, b"")
    record = translating.wait_record(lambda r: r["status"] == 200 and r["complete"] and r["output_tokens"] == USAGE["output_tokens"])
    assert record["translated"] is True


@pytest.mark.parametrize("call", ["create", "stream"])
def test_the_anthropic_sdk_gets_the_message_bedrock_built(translating, cloud, call):
    import anthropic

    from sdk_client import without_nulls

    client = anthropic.Anthropic(base_url=translating.base_url, api_key="sk-ant-api03-client-key", max_retries=0)
    request = {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": MESSAGES}
    if call == "create":
        message = client.messages.create(**request)
    else:
        with client.messages.stream(**request) as stream:
            message = stream.get_final_message()
    assert without_nulls(message.model_dump(mode="json")) == without_nulls(cloud.last_message)
    assert cloud.requests[-1]["path"].startswith("/model/us.anthropic.claude-haiku-4-5-20251001-v1:0/")


def test_throttling_becomes_a_native_429(translating, cloud):
    status, headers, raw = post(translating, {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": MESSAGES},
                                {FAKE_HEADER: "throttle"})
    assert status == 429 and headers.get("x-should-retry") == "true"
    assert json.loads(raw) == {"type": "error", "error": {"type": "rate_limit_error",
                                                          "message": "Too many requests, please wait before trying again."},
                               "request_id": json.loads(raw).get("request_id")}


def test_throttling_mid_stream_becomes_a_native_error_event(translating, cloud):
    status, _, raw = post(translating, {"model": "claude-sonnet-4-5", "max_tokens": 8, "stream": True, "messages": MESSAGES},
                          {FAKE_HEADER: "throttle-mid-stream"})
    assert status == 200
    assert raw.startswith(b"event: message_start\n")
    assert raw.endswith(b'event: error\ndata: {"type":"error","error":{"type":"rate_limit_error",'
                        b'"message":"Too many tokens, please wait before trying again."}}\n\n')
    record = translating.wait_record(lambda r: r["status"] == 200 and r["error_type"] == "rate_limit_error")
    assert (record["complete"], record["translated"], record["input_tokens"]) == (False, True, USAGE["input_tokens"])


def count(gw: Gateway, path: str = "/v1/messages/count_tokens") -> tuple[int, dict, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{gw.base_url}{path}", method="POST", headers={"content-type": "application/json"},
                                     data=b'{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}],"tools":[]}')
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers.items()), answer.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


def test_count_tokens_goes_to_bedrocks_count_tokens(translating, cloud):
    status, _, raw = count(translating)
    assert (status, json.loads(raw)) == (200, {"input_tokens": USAGE["input_tokens"]}), (raw, cloud.requests[-1])
    assert cloud.requests[-1]["path"] == "/model/anthropic.claude-sonnet-4-5-20250929-v1:0/count-tokens"


@pytest.fixture(scope="module")
def translating_vertex(cloud, token_endpoint, tmp_path_factory):
    """A base-URL listener whose Anthropic requests a `provider: vertex` route sends to the fake Vertex."""
    rules = (ROOT / "rules.yaml").read_text().replace("routes: []", f"""routes:
  - match: {{api: anthropic}}
    upstream: {cloud.url}
    provider: vertex
    region: us-east5
    project: demo-project""")
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(service_account(tmp_path_factory.mktemp("vertex"), token_endpoint))}
    gateway = Gateway(rules, reverse_to=cloud.url, regular=False,
                      extra_args=("--set", f"ssl_verify_upstream_trusted_ca={cloud.ca}"), env=env).start()
    yield gateway
    gateway.stop()


def test_translated_to_vertex_the_client_gets_the_stream_vertex_sent(translating_vertex, cloud):
    sent = len(cloud.requests)
    status, headers, raw = post(translating_vertex, {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True,
                                                     "messages": MESSAGES, "tags": {"team": "a"}},
                                {"anthropic-beta": "interleaved-thinking-2025-05-14,request-tags-2026-08-21"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), raw
    assert raw == b"".join(sse_frame(name, data) for name, data in message_to_events(cloud.last_message, Scenario(ping=True)))
    [request] = cloud.requests[sent:]
    assert request["path"] == ("/v1/projects/demo-project/locations/us-east5/publishers/anthropic/models/"
                               "claude-sonnet-4-5@20250929:streamRawPredict")
    assert request["headers"]["authorization"].startswith("Bearer ya29.minted-")
    assert request["headers"]["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    body = json.loads(request["body"])
    assert body["anthropic_version"] == "vertex-2023-10-16" and body["stream"] is True and not {"model", "tags"} & set(body)
    record = translating_vertex.wait_record(lambda r: r["stream_requested"] and r["status"] == 200)
    assert (record["provider"], record["translated"], record["complete"]) == ("gcp.vertex_ai", True, True)
    assert record["cost_usd"] > 0


def test_translated_to_vertex_the_sdk_gets_the_message(translating_vertex, cloud):
    import anthropic

    from sdk_client import without_nulls

    client = anthropic.Anthropic(base_url=translating_vertex.base_url, api_key="sk-ant-api03-client-key", max_retries=0)
    message = client.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=MESSAGES)
    assert without_nulls(message.model_dump(mode="json")) == without_nulls(cloud.last_message)
    assert cloud.requests[-1]["path"].endswith("/models/claude-haiku-4-5@20251001:rawPredict")


def test_translated_to_vertex_count_tokens(translating_vertex, cloud):
    status, _, raw = count(translating_vertex)
    assert (status, json.loads(raw)) == (200, {"input_tokens": USAGE["input_tokens"]})
    assert cloud.requests[-1]["path"].endswith("/publishers/anthropic/models/count-tokens:rawPredict")
    assert json.loads(cloud.requests[-1]["body"])["model"] == "claude-sonnet-4-5@20250929"


def test_translated_to_vertex_a_google_error_becomes_native(translating_vertex, cloud):
    status, headers, raw = post(translating_vertex, {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": MESSAGES},
                                {FAKE_HEADER: "throttle"})
    assert status == 429 and headers.get("x-should-retry") == "true"
    error = json.loads(raw)
    assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
    assert error["error"]["message"].startswith("Quota exceeded")
