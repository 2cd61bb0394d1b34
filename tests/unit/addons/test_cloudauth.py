"""addons/cloudauth.py: base-URL cloud requests signed with the gateway's credentials; none found, a native error."""

from __future__ import annotations

import asyncio
import json

import pytest

from gwtest import api_flow, rule_file
from llm_gateway.addons.cloudauth import CloudCredentials
from llm_gateway.addons.routing import ApiRouter
from llm_gateway.mitm import serializers

RULES = """\
apis:
  - {name: bedrock, provider: bedrock, hosts: ["bedrock-runtime.*.amazonaws.com"], paths: ["/model/*"]}
clouds:
  bedrock: {}
"""
PATH = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke"
SECRET = "unit-test-aws-secret-0123456789abcdefghij"


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata look-up from a test
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    return monkeypatch


async def sign(flow_host: str = "bedrock-runtime.eu-west-1.amazonaws.com"):
    rf = rule_file(RULES)
    f = api_flow(b'{"max_tokens":5,"messages":[],"anthropic_version":"bedrock-2023-05-31"}', mode="reverse",
                 host=flow_host, path=PATH, headers={"authorization": "Bearer gw-token"})
    router = ApiRouter(rf)
    router.requestheaders(f)
    router.request(f)
    auth = CloudCredentials(rf)
    auth.request(f)
    assert f.intercepted  # the first look-up runs in a thread while mitmproxy holds the flow
    await asyncio.gather(*auth._tasks)
    assert not f.intercepted
    return f, auth


async def test_signed_with_the_gateways_keys_which_stay_out_of_the_flow(aws_env):
    aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAUNITTESTKEY00001")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    f, auth = await sign()
    placeholder = f.request.headers["authorization"]
    assert "masked by the gateway" in placeholder and f.request.headers["x-amz-date"]
    real = serializers.real_headers(f.request)["authorization"]
    assert real.startswith("AWS4-HMAC-SHA256 Credential=AKIAUNITTESTKEY00001/") and "/eu-west-1/bedrock/aws4_request" in real
    assert SECRET not in json.dumps(f.get_state(), default=str)
    # the next request is signed at once: the credentials are held
    f2 = api_flow(b"{}", mode="reverse", host="bedrock-runtime.eu-west-1.amazonaws.com", path=PATH)
    ApiRouter(auth.rule_file).requestheaders(f2)
    ApiRouter(auth.rule_file).request(f2)
    auth.request(f2)
    assert not f2.intercepted and "masked by the gateway" in f2.request.headers["authorization"]


async def test_no_credentials_is_a_native_error_not_an_unsigned_request(aws_env, caplog):
    f, _ = await sign()
    assert f.response.status_code == 500 and f.response.headers["x-should-retry"] == "false"
    assert json.loads(f.response.content)["error"]["type"] == "api_error"
    assert "found no AWS credentials" in caplog.text
