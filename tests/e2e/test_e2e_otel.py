"""End to end: OpenTelemetry GenAI spans and metrics from a real mitmdump to a local OTLP/HTTP receiver.

The receiver (tests/otlp.py) decodes the real protobuf payloads of the SDK's OTLP/HTTP exporter. Clients are
real: the Anthropic SDK, Claude Code and a LiteLLM proxy; the upstream is the fake. Each span is compared with
the usage record of the same exchange (tokens, cost, cache break), so the two can never disagree.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import anthropic
import pytest

import realclients
import sdk_client
from conftest import routed_rules
from fakes.upstream import Scenario
from harness import Gateway, free_port
from otlp import Receiver

pytestmark = pytest.mark.e2e

MODEL = "claude-test-1"
PRICING = """\
pricing:
  - {model: "claude-test-*", input: 3, output: 15, cache_write_5m: 3.75, cache_write_1h: 6, cache_read: 0.3}
"""
USAGE = {"input_tokens": 7, "output_tokens": 11, "cache_creation_input_tokens": 300, "cache_read_input_tokens": 4000}
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
SECONDS_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]


def otel_env(endpoint: str, **extra: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "300", "OTEL_SERVICE_NAME": "gateway-under-test",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=e2e", **extra}


@pytest.fixture(scope="module")
def receiver():
    with Receiver() as r:
        yield r


@pytest.fixture(scope="module")
def gw(module_fake, receiver):
    port = free_port()
    with Gateway(routed_rules(module_fake.url, PRICING), env=otel_env(receiver.url),
                 extra_args=("--set", f"gateway_metrics_port={port}")) as gateway:
        gateway.metrics_url = f"http://127.0.0.1:{port}/-/metrics"
        yield gateway


def span_of(receiver: Receiver, record: dict) -> dict:
    return receiver.wait_span(lambda s: s["attributes"].get("llm_gateway.request_id") == record["request_id"])


def assert_tokens_match(span: dict, record: dict) -> None:
    a = span["attributes"]
    prompt = record["input_tokens"] + record["cache_read_input_tokens"] + record["cache_creation_input_tokens"]
    assert a["gen_ai.usage.input_tokens"] == prompt
    assert a["gen_ai.usage.output_tokens"] == record["output_tokens"]
    assert a["gen_ai.usage.cache_read.input_tokens"] == record["cache_read_input_tokens"]
    assert a["gen_ai.usage.cache_creation.input_tokens"] == record["cache_creation_input_tokens"]


@pytest.mark.parametrize("call", ["create", "stream"])
def test_sdk_exchange_is_one_genai_span_continuing_the_callers_trace(gw, module_fake, receiver, call):
    module_fake.clear()
    module_fake.script(Scenario(text="Hello from the fake", usage=USAGE, stop_reason="end_turn"))
    trace_id, parent_id = f"{time.time_ns():032x}"[-32:], "00f067aa0ba902b7"
    result = sdk_client.run(call, base_url=gw.base_url, model=MODEL, headers={
        "traceparent": f"00-{trace_id}-{parent_id}-01", "x-session-id": f"sess-{call}"})
    assert result["ok"], result
    seen = module_fake.messages_requests()[-1]
    record = gw.wait_record(lambda r: r["request_id"] == seen.request_id)
    span = span_of(receiver, record)
    a = span["attributes"]
    assert (span["name"], span["kind"]) == (f"chat {MODEL}", "SPAN_KIND_CLIENT")
    assert (span["trace_id"], span["parent_span_id"]) == (trace_id, parent_id)  # the caller's trace, continued
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.request.model"] == MODEL and a["gen_ai.response.model"] == record["model"]
    assert a["gen_ai.response.id"] == result["message"]["id"]
    assert a["gen_ai.response.finish_reasons"] == ["end_turn"]
    assert a["gen_ai.request.stream"] is (call == "stream")
    assert a["gen_ai.conversation.id"] == record["session"] == f"sess-{call}"
    assert a["gen_ai.request.max_tokens"] == 64
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == int(module_fake.url.rsplit(":", 1)[1])
    assert a["llm_gateway.client.name"] == record["client"]
    assert a["llm_gateway.mode"] == "base_url"
    assert a["llm_gateway.cost.usd"] == pytest.approx(record["cost_usd"]) and record["cost_usd"] > 0
    assert a["http.response.status_code"] == 200 and "error.type" not in a
    assert_tokens_match(span, record)
    assert ("gen_ai.response.time_to_first_chunk" in a) is (call == "stream")
    assert span["status"]["code"] == 0  # unset: success
    # no text by default
    assert not any(k.startswith(("gen_ai.input", "gen_ai.output", "gen_ai.system")) for k in a)
    assert span["resource"]["service.name"] == "gateway-under-test"
    assert span["resource"]["deployment.environment.name"] == "e2e"
    # the span lasts from the request's arrival (the record's ts) to the end of the answer (after the record's)
    started = datetime.fromisoformat(record["ts"]).timestamp()
    assert span["start_ns"] // 1_000_000 == int(started * 1000)
    assert span["end_ns"] - span["start_ns"] >= (record["duration_ms"] - 0.1) * 1e6


def test_egress_mode_span_names_the_mode_and_the_upstream(gw, module_fake, receiver):
    module_fake.clear()
    module_fake.script(Scenario(text="through the proxy", usage=USAGE))
    result = sdk_client.run("create", model=MODEL, env={"HTTPS_PROXY": gw.proxy_url,
                                                        "SSL_CERT_FILE": str(gw.ca_bundle())})
    assert result["ok"], result
    record = gw.wait_record(lambda r: r["request_id"] == module_fake.messages_requests()[-1].request_id)
    a = span_of(receiver, record)["attributes"]
    assert record["mode"] == "regular" and a["llm_gateway.mode"] == "egress"
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == int(module_fake.url.rsplit(":", 1)[1])
    assert_tokens_match(span_of(receiver, record), record)


def test_forced_stream_is_named_on_the_span(module_fake, receiver):
    """A client rule forces the upstream stream on: the client asked for JSON, the gateway converted."""
    clients = [{"name": "forced-sdk", "user_agent": ["anthropic/python *"], "stream": "on"}]
    with Gateway(routed_rules(module_fake.url, clients=clients), env=otel_env(receiver.url)) as gw:
        module_fake.clear()
        module_fake.script(Scenario(text="converted", usage=USAGE, request_id="req_otel_forced"))
        assert sdk_client.run("create", base_url=gw.base_url, model=MODEL)["ok"]
        record = gw.wait_record(lambda r: r["request_id"] == "req_otel_forced")
        a = span_of(receiver, record)["attributes"]
        assert (record["stream_requested"], record["stream_upstream"], record["converted"]) == (False, True, "sse->json")
        assert a["llm_gateway.stream.forced"] is True and a["llm_gateway.stream.converted"] == "sse->json"
        assert a["gen_ai.request.stream"] is False and a["gen_ai.response.time_to_first_chunk"] >= 0
        assert a["llm_gateway.client.name"] == "forced-sdk"


def test_failed_exchange_has_error_type(gw, module_fake, receiver):
    module_fake.clear()
    module_fake.script(Scenario.error(429, "rate_limit_error", "slow down", request_id="req_otel_429"))
    result = sdk_client.run("stream", base_url=gw.base_url, model=MODEL)
    assert (result["ok"], result["status"]) == (False, 429), result
    record = gw.wait_record(lambda r: r["request_id"] == "req_otel_429")
    span = span_of(receiver, record)
    assert span["attributes"]["error.type"] == record["error_type"] == "rate_limit_error"
    assert span["attributes"]["http.response.status_code"] == 429
    assert span["status"] == {"code": 2, "message": "rate_limit_error"}  # STATUS_CODE_ERROR
    points = receiver.wait_points("gen_ai.client.operation.duration",
                                  lambda p: p["attributes"].get("error.type") == "rate_limit_error")
    assert points[-1]["count"] >= 1


def test_a_hostile_request_keeps_its_span_and_the_batch(gw, module_fake, receiver):
    """A model with a lone surrogate (JSON "\\ud83d", which json reads) and max_tokens past 64 bits, through the
    real gateway: its span arrives with the text replaced, and so does the honest span exported with it."""
    module_fake.clear()
    body = b'{"model":"claude-test-\\ud83d","max_tokens":100000000000000000000000,"messages":[{"role":"user","content":"x"}]}'
    request = urllib.request.Request(f"{gw.base_url}/v1/messages", data=body, method="POST", headers={
        "content-type": "application/json", "x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"})
    try:
        urllib.request.urlopen(request, timeout=30).close()
    except urllib.error.HTTPError:
        pass  # the fake upstream may refuse such a body: the span is the point, not the answer
    module_fake.clear()
    module_fake.script(Scenario(text="plain", request_id="req_otel_honest"))
    assert sdk_client.run("create", base_url=gw.base_url, model=MODEL)["ok"]
    span_of(receiver, gw.wait_record(lambda r: r["request_id"] == "req_otel_honest"))
    hostile = receiver.wait_span(lambda s: s["name"].startswith("chat claude-test-") and s["name"] != f"chat {MODEL}")
    assert hostile["name"] == "chat claude-test-?" and "gen_ai.request.max_tokens" not in hostile["attributes"]


def test_stream_cut_short_ends_the_span_with_its_error(gw, module_fake, receiver):
    module_fake.clear()
    module_fake.script(Scenario(text="one two three four five six", truncate_after=4, request_id="req_otel_cut"))
    client = anthropic.Anthropic(base_url=gw.base_url, api_key="sk-ant-test", max_retries=0)
    with pytest.raises(anthropic.APIStatusError):
        with client.messages.stream(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}]) as s:
            s.get_final_message()
    record = gw.wait_record(lambda r: r["request_id"] == "req_otel_cut")
    span = span_of(receiver, record)
    assert span["attributes"]["error.type"] == record["error_type"] == "api_error"
    assert span["attributes"]["llm_gateway.reason"] == record["reason"]


def test_cache_break_is_a_span_event_with_its_money(gw, module_fake, receiver):
    module_fake.clear()
    client = anthropic.Anthropic(base_url=gw.base_url, api_key="sk-ant-test", max_retries=0,
                                 default_headers={"x-session-id": "sess-break"})
    system = [{"type": "text", "text": "You are a careful agent. " * 400, "cache_control": {"type": "ephemeral"}}]
    warm = {"input_tokens": 5, "output_tokens": 3, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 9000}
    cold = {"input_tokens": 5, "output_tokens": 3, "cache_creation_input_tokens": 9000, "cache_read_input_tokens": 0}
    module_fake.script(Scenario(text="warm", usage=warm), Scenario(text="cold", usage=cold))
    for text in ("You are a careful agent. ", "You are a hasty agent. "):  # the system prompt changed: a break
        system[0]["text"] = text * 400
        client.messages.create(model=MODEL, max_tokens=8, system=system, messages=[{"role": "user", "content": "go"}])
    seen = module_fake.messages_requests()[-1]
    record = gw.wait_record(lambda r: r["request_id"] == seen.request_id)
    assert record["cache_break"] is True, record
    span = span_of(receiver, record)
    [event] = [e for e in span["events"] if e["name"] == "llm_gateway.cache_break"]
    e = event["attributes"]
    assert e["llm_gateway.cache_break.reason"] == record["cache_break_reason"]
    assert e["llm_gateway.cache_break.detail"] == record["cache_break_detail"]
    assert e["llm_gateway.cache_break.tokens_lost"] == record["cache_break_tokens_lost"] == 9000
    assert e["llm_gateway.cache_break.cost_usd"] == pytest.approx(record["cache_break_cost_usd"])
    assert span["attributes"]["llm_gateway.cache_break"] is True
    assert_tokens_match(span, record)


def test_metrics_arrive_in_the_conventions_names_without_a_session(gw, module_fake, receiver):
    module_fake.clear()
    module_fake.script(Scenario(text="metrics", usage=USAGE))
    assert sdk_client.run("stream", base_url=gw.base_url, model=MODEL, headers={"x-session-id": "sess-metrics"})["ok"]
    tokens = receiver.wait_points("gen_ai.client.token.usage")
    kinds = {p["attributes"]["gen_ai.token.type"] for p in tokens}
    assert kinds == {"input", "output"}
    assert tokens[-1]["unit"] == "{token}" and tokens[-1]["bounds"] == TOKEN_BUCKETS
    duration = receiver.wait_points("gen_ai.client.operation.duration")
    assert duration[-1]["unit"] == "s" and duration[-1]["bounds"] == SECONDS_BUCKETS
    first = receiver.wait_points("gen_ai.client.operation.time_to_first_chunk")
    assert first[-1]["unit"] == "s" and first[-1]["kind"] == "histogram"
    for p in tokens + duration + first:
        assert p["attributes"]["gen_ai.operation.name"] == "chat"
        assert p["attributes"]["gen_ai.provider.name"] == "anthropic"
        assert not any("conversation" in k or "session" in k for k in p["attributes"]), p
        assert "sess-metrics" not in p["attributes"].values()
    # the input histogram holds the whole prompt of this exchange (input + cache read + cache write)
    prompt = USAGE["input_tokens"] + USAGE["cache_read_input_tokens"] + USAGE["cache_creation_input_tokens"]
    assert any(p["attributes"]["gen_ai.token.type"] == "input" and p["sum"] >= prompt for p in tokens)
    # the Prometheus exposition stays, and counts what was exported
    text = urllib.request.urlopen(gw.metrics_url, timeout=5).read().decode()
    assert "llm_gateway_requests_total" in text and 'llm_gateway_otel_spans_total{result="exported"}' in text


def test_claude_code_span_carries_its_session_and_agent(gw, module_fake, receiver):
    module_fake.clear()
    module_fake.script(Scenario(text="Hi from upstream", usage=USAGE))
    done = realclients.run_claude("hello", base_url=gw.base_url)
    assert done.returncode == 0, done.stderr
    [seen] = [q for q in module_fake.requests if q.path_only == "/v1/messages"]
    record = gw.wait_record(lambda r: r["request_id"] == seen.request_id)
    span = span_of(receiver, record)
    a = span["attributes"]
    assert a["llm_gateway.client.name"] == "claude-code" == record["client"]
    assert a["gen_ai.conversation.id"] == seen.headers.get("x-claude-code-session-id") == record["session"]
    agent = seen.headers.get("x-claude-code-agent-id")
    assert a.get("llm_gateway.agent.id") == agent
    assert a.get("llm_gateway.agent.parent_id") == seen.headers.get("x-claude-code-parent-agent-id")
    assert a["gen_ai.request.model"] == seen.json["model"] and a["gen_ai.request.stream"] is True
    assert_tokens_match(span, record)
    assert a["llm_gateway.cost.usd"] == pytest.approx(record["cost_usd"])


def test_claude_code_subagent_span_carries_its_agent_id(gw, module_fake, receiver):
    """Claude Code delegates to a subagent (its `Agent` tool): the subagent's requests carry
    x-claude-code-agent-id, and so do their spans; the main loop's have none."""
    module_fake.clear()
    delegate = {"type": "tool_use", "id": "toolu_otel_1", "name": "Agent",
                "input": {"description": "say hi", "prompt": "say hi", "subagent_type": "general-purpose"}}
    module_fake.script(Scenario(content=[delegate]), *(Scenario(text=f"done {i}") for i in range(4)))
    done = realclients.run_claude("delegate", base_url=gw.base_url, args=["--allowedTools", "Agent"])
    assert done.returncode == 0, done.stderr
    seen = [q for q in module_fake.requests if q.path_only == "/v1/messages"]
    sub = [q for q in seen if q.headers.get("x-claude-code-agent-id")]
    main = [q for q in seen if not q.headers.get("x-claude-code-agent-id")]
    assert sub and main, [dict(q.headers.items()) for q in seen]
    for q in sub + main[:1]:
        record = gw.wait_record(lambda r, q=q: r["request_id"] == q.request_id)
        a = span_of(receiver, record)["attributes"]
        assert a.get("llm_gateway.agent.id") == q.headers.get("x-claude-code-agent-id")
        assert a.get("llm_gateway.agent.parent_id") == q.headers.get("x-claude-code-parent-agent-id")
        assert a["gen_ai.conversation.id"] == q.headers.get("x-claude-code-session-id") == record["session"]


def test_litellm_client_through_the_gateway(module_fake, receiver):
    """A LiteLLM proxy as the gateway's client (its Anthropic api_base is the gateway)."""
    with Gateway(routed_rules(module_fake.url, PRICING + "otel: {enabled: true}\n"),
                 env=otel_env(receiver.url, OTEL_EXPORTER_OTLP_ENDPOINT="", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=
                              receiver.url + "/v1/traces", OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=receiver.url +
                              "/v1/metrics")) as gw:
        with realclients.LiteLLMProxy(realclients.LITELLM_VERSIONS[-1], models=[MODEL],
                                      routed_api_base=gw.base_url) as proxy:
            module_fake.clear()
            module_fake.script(Scenario(text="via litellm", usage=USAGE))
            result = sdk_client.run("create", base_url=proxy.url, env={"ANTHROPIC_API_KEY": proxy.master_key},
                                    model=MODEL)
            assert result["ok"], result
            seen = module_fake.messages_requests()[-1]
            record = gw.wait_record(lambda r: r["request_id"] == seen.request_id)
            span = span_of(receiver, record)
            assert span["attributes"]["llm_gateway.client.name"] == "litellm" == record["client"]
            assert_tokens_match(span, record)


def test_content_is_captured_only_when_switched_on(module_fake, receiver):
    with Gateway(routed_rules(module_fake.url, "otel: {enabled: true, capture_content: true}\n"),
                 env=otel_env(receiver.url, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url)) as gw:
        module_fake.clear()
        module_fake.script(Scenario(text="the secret answer", request_id="req_otel_content"))
        assert sdk_client.run("create", base_url=gw.base_url, model=MODEL)["ok"]
        record = gw.wait_record(lambda r: r["request_id"] == "req_otel_content")
        a = span_of(receiver, record)["attributes"]
        assert '"content":"hello"' in a["gen_ai.input.messages"]
        assert "the secret answer" in a["gen_ai.output.messages"]


def test_off_by_default_nothing_is_exported(module_fake):
    receiver = Receiver().start()  # a receiver of its own: the module's gateway still sends its metrics
    port = free_port()
    with Gateway(routed_rules(module_fake.url), env={"OTEL_EXPORTER_OTLP_ENDPOINT": ""},
                 extra_args=("--set", f"gateway_metrics_port={port}")) as gw:
        module_fake.script(Scenario(text="quiet"))
        assert sdk_client.run("create", base_url=gw.base_url, model=MODEL)["ok"]
        gw.wait_record(lambda r: r["status"] == 200)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/-/metrics", timeout=5).read().decode()
    receiver.stop()
    assert "llm_gateway_otel" not in text
    assert receiver.requests == [] and receiver.spans == []


def test_refused_otel_settings_leave_the_gateway_serving(module_fake, receiver):
    env = otel_env(receiver.url, OTEL_BSP_MAX_QUEUE_SIZE="2", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="512")
    with Gateway(routed_rules(module_fake.url), env=env) as gw:
        module_fake.script(Scenario(text="still here"))
        assert sdk_client.run("create", base_url=gw.base_url, model=MODEL)["ok"]
        assert "OpenTelemetry export off: the OTEL_* settings were refused" in gw.output()


def test_receiver_down_the_gateway_keeps_serving(module_fake):
    """Export to a port nobody listens on: every request is answered, failures are counted, the stop is prompt."""
    port, dead = free_port(), free_port()
    env = otel_env(f"http://127.0.0.1:{dead}", OTEL_EXPORTER_OTLP_TIMEOUT="1", OTEL_BSP_MAX_QUEUE_SIZE="8",
                   OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4")
    with Gateway(routed_rules(module_fake.url), env=env, extra_args=("--set", f"gateway_metrics_port={port}")) as gw:
        module_fake.clear()
        client = anthropic.Anthropic(base_url=gw.base_url, api_key="sk-ant-test", max_retries=0)
        for i in range(30):
            module_fake.script(Scenario(text=f"answer {i}"))
            if i % 2:
                with client.messages.stream(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}]) as s:
                    assert s.get_final_message().content[0].text == f"answer {i}"
            else:
                answer = client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}])
                assert answer.content[0].text == f"answer {i}"
        assert len(gw.wait_records(lambda r: r["status"] == 200, count=30)) == 30
        deadline, text, counts = time.monotonic() + 30, "", {}
        while time.monotonic() < deadline:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/-/metrics", timeout=5).read().decode()
            counts = {line.split("{")[1].split('"')[1]: float(line.rsplit(" ", 1)[1])
                      for line in text.splitlines() if line.startswith("llm_gateway_otel_spans_total{")}
            if counts.get("failed", 0) >= 1 and counts.get("dropped", 0) >= 1:
                break
            time.sleep(0.2)
        assert counts.get("failed", 0) >= 1 and counts.get("dropped", 0) >= 1, text
        assert counts.get("exported", 0) == 0
        output = gw.output()
        assert output.count("OpenTelemetry export to ") == 1 and "failing:" in output  # one line, not one a retry
        assert "Transient error" not in output
        assert gw.stop() == 0  # a clean exit on SIGTERM, not the harness's SIGKILL after waiting


def test_bench_otel_flag_measures_export_on_and_receiver_down(tmp_path):
    """`scripts/bench --otel` runs its two set-ups (no timing asserted; the figures are docs/observability.md's)."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    setups = ("mitmdump", "gateway", "gateway-otel", "gateway-otel-down")
    done = subprocess.run(
        [str(root / "scripts" / "bench"), "--quick", "--otel", "--only", "messages-1", "--setups", ",".join(setups),
         "--seconds", "0.3", "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["errors"] == {}
    for setup in setups:
        [run] = results["results"]["messages-1"][setup]
        assert run["rps"] > 0, (setup, run)
    assert "| gateway, OpenTelemetry export on, receiver down (--otel) |" in done.stdout
    alive = [pid for pid in results["info"]["pids"] if Path(f"/proc/{pid}").exists()]
    assert not alive, f"left running: {alive}"


def test_rule_reload_turns_export_on_and_off(module_fake):
    """`otel.enabled` and `otel.capture_content` follow a rule reload: for the requests after it."""
    receiver = Receiver().start()
    try:
        with Gateway(routed_rules(module_fake.url, "otel: {enabled: false}\n"), env=otel_env(receiver.url)) as gw:
            def ask(request_id: str) -> dict:
                module_fake.script(Scenario(text="answer", request_id=request_id))
                assert sdk_client.run("create", base_url=gw.base_url, model=MODEL)["ok"]
                return gw.wait_record(lambda r: r["request_id"] == request_id)

            ask("req_reload_off")
            for i, section in enumerate(["otel: {enabled: true, capture_content: true}\n", "otel: {enabled: false}\n"]):
                mark = len(gw.output())
                gw.write_rules(routed_rules(module_fake.url, section))
                gw.wait_for_output("rules reloaded", after=mark)
                if i == 0:  # the SDK is built in the background on the first request after the reload
                    ask("req_reload_building")
                    gw.wait_for_output("OpenTelemetry export on", after=mark)
                ask(f"req_reload_{i}")
            span = span_of(receiver, {"request_id": "req_reload_0"})
            assert '"content":"hello"' in span["attributes"]["gen_ai.input.messages"]
            ask("req_reload_last")  # its span would be in the same batch as any late one
            time.sleep(1)  # OTEL_BSP_SCHEDULE_DELAY is 100 ms: time for a span that should not exist to arrive
            ids = {s["attributes"].get("llm_gateway.request_id") for s in receiver.spans}
            assert ids <= {"req_reload_0", "req_reload_building"} and "req_reload_0" in ids
    finally:
        receiver.stop()
