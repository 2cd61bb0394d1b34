"""Claude on Amazon Bedrock and Google Vertex AI through a real mitmdump: the cloud clients' own traffic observed in
egress mode, with the repository's default rules.yaml.

The real Anthropic SDK clients (`AnthropicBedrock`, `AnthropicVertex`, tests/cloud_client.py) sign their requests
(SigV4 from AWS_* keys; a Vertex bearer token) and go through HTTPS_PROXY, trusting the gateway CA. The cloud
host names resolve to the fake (tests/fakes/clouds.py, TLS with a CA of its own that the gateway trusts as an
upstream CA) through tests/fakes/resolve.py, so the gateway decrypts, reads and forwards exactly what it would
send to the cloud.
"""

from __future__ import annotations

import json

import pytest

from cloud_client import BEDROCK_MODEL, VERTEX_MODEL, run
from e2e.test_e2e_egress import RESOLVE, make_ca_and_leaf
from fakes.clouds import FAKE_HEADER, USAGE, FakeCloud
from fakes.upstream import DEFAULT_TEXT
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
    before = len(usage_records(gw))
    sent = len(cloud.requests)
    out = run(which, call, env=egress_env(gw))
    assert out["ok"], out
    assert out["message"]["content"][0]["text"] == DEFAULT_TEXT
    assert out["message"]["usage"]["cache_read_input_tokens"] == USAGE["cache_read_input_tokens"]
    # the request reached the cloud as the client signed it
    [request] = cloud.requests[sent:]
    if which == "bedrock":
        assert request["headers"]["Authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={AWS_KEY_ID}/")
    else:
        assert request["headers"]["Authorization"] == f"Bearer {VERTEX_TOKEN}"
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
    before = len(usage_records(gw))
    out = run("bedrock", "create", env=egress_env(gw), headers={FAKE_HEADER: "throttle"})
    assert not out["ok"] and out["status"] == 429 and out["error"] == "RateLimitError", out
    record = new_record(gw, before)
    assert (record["provider"], record["status"], record["error_type"]) == ("aws.bedrock", 429, "rate_limit_error")


def test_bedrock_exception_frame_mid_stream_is_recorded(gw, cloud):
    before = len(usage_records(gw))
    out = run("bedrock", "stream", env=egress_env(gw), headers={FAKE_HEADER: "throttle-mid-stream"})
    assert not out["ok"], out  # the SDK raises on the exception frame, which passed unchanged
    record = new_record(gw, before)
    assert (record["provider"], record["status"], record["error_type"]) == ("aws.bedrock", 200, "rate_limit_error")
    assert record["complete"] is False and record["input_tokens"] == USAGE["input_tokens"]


def test_vertex_google_error_is_recorded(gw, cloud):
    before = len(usage_records(gw))
    out = run("vertex", "create", env=egress_env(gw), headers={FAKE_HEADER: "throttle"})
    assert not out["ok"] and out["status"] == 429, out
    assert out["body"]["error"]["status"] == "RESOURCE_EXHAUSTED"  # the cloud's own shape, for its own client
    record = new_record(gw, before)
    assert (record["provider"], record["status"], record["error_type"]) == ("gcp.vertex_ai", 429, "rate_limit_error")


def test_no_cloud_secret_signature_or_token_in_records_or_log(gw, cloud):
    run("bedrock", "stream", env=egress_env(gw))
    run("vertex", "create", env=egress_env(gw))
    signatures = [r["headers"]["Authorization"].rsplit("Signature=", 1)[-1] for r in cloud.requests
                  if r["headers"].get("Authorization", "").startswith("AWS4")]
    assert signatures
    texts = gw.usage_log.read_text() + gw.output()
    for secret in [AWS_SECRET, VERTEX_TOKEN, *signatures]:
        assert secret not in texts


def test_claude_code_on_bedrock_in_egress_mode(gw, cloud, tmp_path):
    """CLAUDE_CODE_USE_BEDROCK=1 behind HTTPS_PROXY: its control-plane call is tunnelled (the client trusts the
    cloud's own CA there), its InvokeModel calls are read, and its streamed turn is one priced record."""
    before = len(usage_records(gw))
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
