"""End to end through a real mitmdump: both listeners, routing, rule reloads, start-up refusal."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

import sdk_client
from conftest import routed_rules
from fakes.upstream import FakeUpstream
from harness import Gateway, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gw(module_fake):
    with Gateway(routed_rules(module_fake.url)) as gateway:
        yield gateway


def egress_env(gw: Gateway) -> dict[str, str]:
    return {"HTTPS_PROXY": gw.proxy_url, "SSL_CERT_FILE": str(gw.ca_bundle())}


@pytest.mark.parametrize("mode", ["base-url", "egress"])
@pytest.mark.parametrize("call", ["create", "stream"])
def test_request_reaches_upstream_and_comes_back_unchanged(gw, module_fake, mode, call):
    module_fake.clear()
    if mode == "base-url":
        result = sdk_client.run(call, base_url=gw.base_url)
    else:
        result = sdk_client.run(call, env=egress_env(gw))
    assert result["ok"], result
    [seen] = module_fake.requests
    assert seen.path_only == "/v1/messages"
    assert seen.json["messages"] == [{"role": "user", "content": "hello"}]
    assert seen.stream is (call == "stream")
    assert "x-api-key" in seen.headers or "authorization" in seen.headers  # credentials forwarded untouched
    assert sdk_client.without_nulls(result["message"]) == sdk_client.without_nulls(seen.message)


def test_non_api_paths_pass_untouched(gw, module_fake):
    import urllib.request

    module_fake.clear()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{gw.base_url}/v1/models")
    # /v1/models is not API traffic: not routed to the fake, so mitmproxy tried the real (unreachable) host
    assert e.value.code == 502
    assert module_fake.requests == []


def test_broken_rules_stop_startup_naming_file_and_line(tmp_path):
    gw = Gateway("apis:\n  - name: a\n    hosts: [x]\n    paths: [/v1]\n    colour: red\n")
    try:
        gw.start()  # mitmdump may report its listeners before it checks the start-up errors
    except RuntimeError:
        pass
    assert gw.proc.wait(15) != 0
    assert f"{gw.rules_path}:5: unknown key 'colour'" in gw.output()


def test_rule_edits_take_effect_and_broken_edits_keep_the_old_rules(gateway_factory):
    with FakeUpstream() as first, FakeUpstream() as second:
        gw = gateway_factory(routed_rules(first.url))
        assert sdk_client.run("create", base_url=gw.base_url)["ok"]
        assert len(first.requests) == 1

        mark = len(gw.output())
        gw.write_rules(routed_rules(second.url))
        gw.wait_for_output("rules reloaded", after=mark)
        assert sdk_client.run("create", base_url=gw.base_url)["ok"]
        assert len(second.requests) == 1 and len(first.requests) == 1

        mark = len(gw.output())
        gw.write_rules(routed_rules(first.url) + "bogus: [\n")
        gw.wait_for_output("keeping the last good rules", after=mark)
        assert str(gw.rules_path) in gw.output()[mark:]
        assert sdk_client.run("create", base_url=gw.base_url)["ok"]
        assert len(second.requests) == 2 and len(first.requests) == 1


def test_scripts_gateway_brings_up_both_listeners(tmp_path):
    """The README's command, with its defaults moved to free ports and a throwaway confdir."""
    ports = [free_port(), free_port()]
    proc = subprocess.Popen(
        ["scripts/gateway", "--egress-port", str(ports[0]), "--base-port", str(ports[1]), "--confdir", str(tmp_path)],
        cwd=sdk_client.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out = ""
        deadline = time.monotonic() + 30
        while out.count("listening at") < 2 and time.monotonic() < deadline:
            out += proc.stdout.readline()
        assert f"ANTHROPIC_BASE_URL=http://127.0.0.1:{ports[1]}" in out
        assert f"HTTPS_PROXY=http://127.0.0.1:{ports[0]}" in out
        assert f"HTTP(S) proxy listening at 127.0.0.1:{ports[0]}" in out
        assert f"reverse proxy to https://api.anthropic.com listening at 127.0.0.1:{ports[1]}" in out
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_scripts_gateway_routes_an_sdk_request_to_a_local_upstream_and_records_it(tmp_path, module_fake):
    """README: to reach another upstream keep the listener's target and add a route. The target itself may be
    unreachable (an air-gapped cluster behind LiteLLM; here a name that never resolves, RFC 2606): mitmproxy's
    default connection_strategy=eager connected to it first, failed, and dropped the client's request."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(routed_rules(module_fake.url).replace("api.anthropic.com", "api.anthropic.invalid"))
    log, port = tmp_path / "usage.jsonl", free_port()
    proc = subprocess.Popen(
        ["scripts/gateway", "--egress-port", "0", "--base-port", str(port), "--confdir", str(tmp_path),
         "--rules", str(rules), "--upstream", "https://api.anthropic.invalid", "--", "--set", f"gateway_log={log}"],
        cwd=sdk_client.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, deadline = "", time.monotonic() + 30
        while "listening at" not in out and time.monotonic() < deadline:
            out += proc.stdout.readline()
        module_fake.clear()
        result = sdk_client.run("create", base_url=f"http://127.0.0.1:{port}")
        assert result["ok"], result
        assert len(module_fake.requests) == 1
        deadline = time.monotonic() + 10
        while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        [record] = [json.loads(line) for line in log.read_text().splitlines()]
        assert record["status"] == 200 and record["client"] == "anthropic-python"
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


@pytest.mark.parametrize("mode", ["base-url", "egress"])
@pytest.mark.parametrize("use_async, client", [(False, "anthropic-python"), (True, "anthropic-python-async")])
def test_the_python_sdk_is_detected_sync_and_async(gw, module_fake, mode, use_async, client):
    module_fake.clear()
    if mode == "base-url":
        result = sdk_client.run("create", base_url=gw.base_url, use_async=use_async)
    else:
        result = sdk_client.run("create", env=egress_env(gw), use_async=use_async)
    assert result["ok"], result
    [seen] = module_fake.requests
    record = gw.wait_record(lambda r: r["request_id"] == seen.request_id)
    assert record["client"] == client
    assert "x-gateway-client" not in seen.headers


def test_override_header_names_the_client_and_is_stripped(gw, module_fake):
    module_fake.clear()
    result = sdk_client.run("create", base_url=gw.base_url, headers={"x-gateway-client": "nightly-batch"})
    assert result["ok"], result
    [seen] = module_fake.requests
    assert "x-gateway-client" not in seen.headers
    assert gw.wait_record(lambda r: r["request_id"] == seen.request_id)["client"] == "nightly-batch"


def test_an_option_given_twice_stops_startup_instead_of_running_without_rules(module_fake):
    """mitmproxy silently drops a script option set twice; the gateway makes it an error."""
    gw = Gateway(routed_rules(module_fake.url), extra_args=("--set", "gateway_log=/tmp/other.jsonl"))
    try:
        gw.start()
    except RuntimeError:
        pass
    assert gw.proc.wait(15) != 0
    assert "option gateway_log is set 2 times" in gw.output()


def test_plain_mitmdump_without_gateway_rules_loads_the_repository_rules(tmp_path):
    """README's "without the script" start: `mitmdump -s addons/gateway.py` with no gateway_rules loads the
    rules.yaml beside addons/, and answers its health probe."""
    import urllib.request

    from harness import BIN, GATEWAY_SCRIPT

    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "mitmdump"), "-s", str(GATEWAY_SCRIPT), "--mode", f"reverse:http://127.0.0.1:9@127.0.0.1:{port}",
         "--set", "flow_detail=0", "--set", "connection_strategy=lazy", "--set", f"gateway_log={tmp_path / 'usage.jsonl'}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
    )
    try:
        deadline, ready = time.monotonic() + 30, False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/healthz", timeout=2) as answer:
                    ready = answer.status == 200
            except OSError:
                time.sleep(0.2)
        assert ready, "the gateway did not start with its default rules"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    expected = GATEWAY_SCRIPT.parent.parent / "rules.yaml"
    assert f"rules loaded from {expected}" in output, output[-2000:]
