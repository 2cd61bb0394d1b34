"""The OtelExport addon off: the OpenTelemetry SDK is never imported (zero cost). What it exports when on is
proven end to end against a real OTLP/HTTP receiver in tests/e2e/test_e2e_otel.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_off_by_default_the_sdk_is_never_imported():
    code = textwrap.dedent("""
        import sys, os
        os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None); os.environ.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
        from mitmproxy.test import taddons
        from gwtest import api_flow, flow_addons, rule_file
        from llm_gateway.addons.otel import OtelExport
        rf = rule_file()
        addons = flow_addons(rf)
        [otel] = [a for a in addons if isinstance(a, OtelExport)]
        with taddons.context(*addons) as tctx:
            otel.running()
            flow = api_flow(resp=True)
            for hook in ("requestheaders", "request", "responseheaders", "response"):
                for a in addons:
                    if hasattr(a, hook):
                        getattr(a, hook)(flow)
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PYTHONPATH": f"{ROOT / 'addons'}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.fixture
def sdk(monkeypatch):
    """The addon's real SDK exporting over OTLP/HTTP to a local receiver (tests/otlp.py), spans only."""
    from otlp import Receiver

    from llm_gateway.addons.otel import _Sdk
    with Receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
        built = _Sdk(os.environ, None)
        built.receiver = receiver
        yield built
        built.shutdown()


def exchange_span(sdk, model, body=None, headers=None):
    from gwtest import rule_file
    from llm_gateway.pipeline import genai
    from llm_gateway.pipeline.exchange import Exchange
    ex = Exchange(rule_file().rules, "anthropic", "reverse", "POST", "gw", "/v1/messages", started=time.time())
    ex.model_requested, ex.client, ex.body = model, "sdk", body
    headers = headers or {}
    span = sdk.start(genai.span_name(ex), headers, genai.start_attributes(ex, headers, "gw", 443), time.time_ns())
    ex.status, ex.complete = 200, True
    sdk.end(span, genai.end_attributes(ex), None, None)


def test_a_hostile_request_cannot_cost_the_batch_its_span_is_in(sdk):
    """A lone surrogate in the model (JSON "\\ud83d"), in a header, and max_tokens past 64 bits: the span goes out
    with the text replaced and the number left out, and the honest span of the same batch goes out too."""
    exchange_span(sdk, "claude-honest")
    exchange_span(sdk, "claude-\ud83d", body={"max_tokens": 10**30, "temperature": 0.5},
                  headers={"x-claude-code-agent-id": "agent-\udcff"})
    sdk.tracer_provider.force_flush(5000)
    honest = sdk.receiver.wait_span(lambda s: s["name"] == "chat claude-honest")
    hostile = sdk.receiver.wait_span(lambda s: s["name"].startswith("chat claude-") and s is not honest)
    assert hostile["name"] == "chat claude-?" and hostile["attributes"]["gen_ai.request.model"] == "claude-?"
    assert hostile["attributes"]["llm_gateway.agent.id"] == "agent-?"
    assert "gen_ai.request.max_tokens" not in hostile["attributes"]
    assert hostile["attributes"]["gen_ai.request.temperature"] == 0.5
    assert sdk.exported._value.get() == 2 and sdk.failed._value.get() == 0


def test_hostile_trace_headers_never_reach_the_log(sdk, caplog):
    """traceparent, tracestate and baggage are the client's: garbage starts a new trace, silently (a warning per
    request would let any client write the gateway's log, baggage values and all)."""
    caplog.set_level("DEBUG")
    from mitmproxy.http import Headers
    good = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for fields in ([(b"traceparent", b"x" * 600)], [(b"traceparent", good), (b"tracestate", b"\xff=secret-1,,")],
                   [(b"traceparent", good), (b"baggage", b"token=secret-2," * 1000)]):
        span = sdk.start("chat x", Headers(fields), {}, time.time_ns())
        span.end()
    assert [r.getMessage()[:200] for r in caplog.records if r.levelno >= 30] == []
    assert "secret" not in caplog.text


def test_captured_text_is_bounded_on_the_wire(sdk):
    """Without OTEL_(SPAN_)ATTRIBUTE_VALUE_LENGTH_LIMIT a span's text is held to the gateway's own bound (an
    agent's answer or prompt would otherwise be queued and sent whole, on every request)."""
    from llm_gateway.pipeline import genai
    span = sdk.start("chat big", {}, genai.content_attributes({"messages": [{"role": "user", "content": "q" * 200_000}]},
                                                               sdk.content_limit), time.time_ns())
    answer = {"type": "message", "content": [{"type": "text", "text": "a" * 200_000}], "stop_reason": "end_turn"}
    sdk.end(span, genai.output_attributes(answer), None, None)
    sdk.tracer_provider.force_flush(5000)
    a = sdk.receiver.wait_span(lambda s: s["name"] == "chat big")["attributes"]
    assert sdk.content_limit == genai.CONTENT_MAX_CHARS
    assert len(a["gen_ai.output.messages"]) == len(a["gen_ai.input.messages"]) == genai.CONTENT_MAX_CHARS


def test_the_standard_length_limit_wins(monkeypatch):
    from llm_gateway.policy.otel import length_limit
    assert length_limit({}, 16384) == (16384, False)
    assert length_limit({"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "100"}, 16384) == (100, True)
    assert length_limit({"OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "50", "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "100"},
                        16384) == (50, True)
    assert length_limit({"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "lots"}, 16384) == (16384, False)


def test_export_turned_on_by_a_reload_builds_the_sdk_off_the_event_loop(monkeypatch):
    """The SDK takes about a second to import and build: a request arriving after a reload turned export on
    must not wait for it (nor every other connection of the event loop); its exchange has no span, later ones do."""
    from mitmproxy.test import taddons

    from gwtest import api_flow, call, flow_addons, rule_file
    from llm_gateway.addons.otel import OtelExport
    from llm_gateway.pipeline import exchange
    from otlp import Receiver
    with Receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
        rf = rule_file()
        addons = flow_addons(rf)
        [otel] = [a for a in addons if isinstance(a, OtelExport)]

        def run(flow):
            for hook in ("requestheaders", "request"):
                for a in addons:
                    if hasattr(a, hook):
                        call(getattr(a, hook), flow)
            return exchange.of(flow)

        with taddons.context(*addons):
            first = run(api_flow(mode="reverse"))
            assert otel.sdk is None and first.span is None and otel.building is not None
            otel.building.join(timeout=60)
            assert otel.sdk is not None and run(api_flow(mode="reverse")).span is not None
            otel.done()


def test_an_otlp_protocol_other_than_http_protobuf_is_named_in_a_warning(caplog):
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc is the SDK default elsewhere: said, not silently sent as HTTP to 4317."""
    from llm_gateway.addons.otel import _Sdk
    sdk = _Sdk({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_METRICS_EXPORTER": "none"}, None)
    sdk.shutdown()
    assert "OTEL_EXPORTER_OTLP_PROTOCOL='grpc' is not supported" in caplog.text
    caplog.clear()
    _Sdk({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_METRICS_EXPORTER": "none"}, None).shutdown()
    assert "not supported" not in caplog.text


def test_a_hung_receiver_does_not_hold_the_stop(monkeypatch):
    """A receiver that takes the export request and never answers: the stop returns while that request is still
    waiting for its answer (OTEL_EXPORTER_OTLP_TIMEOUT, 20 s here), not after it gave up."""
    import socket

    from llm_gateway.addons.otel import _Sdk
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "20")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
        sdk = _Sdk(os.environ, None)
        span = sdk.start("chat hung", {}, {}, time.time_ns())
        sdk.end(span, {}, None, None)
        server.settimeout(10)
        conn, _ = server.accept()
        with conn:
            assert conn.recv(65536).startswith(b"POST /v1/traces")
            started = time.monotonic()
            sdk.shutdown()
            # The receiver never answers: a stop that waited for the export would take its whole 20 s timeout.
            # (Whether the exporter's session is closed meanwhile depends on how far its flush got on a busy
            # machine, so the connection's state is no evidence either way; the bound is generous, not a speed.)
            assert time.monotonic() - started < 15


def test_metric_series_by_model_are_bounded_as_the_prometheus_labels(monkeypatch):
    """A client naming a new model on every request must not make a metric series each (held until the stop)."""
    from gwtest import rule_file
    from otlp import Receiver

    from llm_gateway.util.labels import MAX_VALUES, OTHER
    from llm_gateway.addons.otel import _Sdk
    from llm_gateway.pipeline.exchange import Exchange
    with Receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        sdk = _Sdk(os.environ, None)
        for i in range(MAX_VALUES + 20):
            ex = Exchange(rule_file().rules, "anthropic", "reverse", "POST", "gw", "/v1/messages", started=time.time())
            ex.model_requested, ex.status, ex.complete = f"model-{i}", 200, True
            sdk.measure(ex, "gw", 443)
        sdk.meter_provider.force_flush(5000)
        points = receiver.wait_points("gen_ai.client.operation.duration")
        models = {p["attributes"]["gen_ai.request.model"] for p in points}
        assert len(models) == MAX_VALUES + 1 and OTHER in models and "model-0" in models
        sdk.shutdown()


def test_a_malformed_headers_entry_is_reported_without_its_credential(monkeypatch, caplog):
    from llm_gateway.addons.otel import _Sdk
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key:sk-secret-123")  # a colon for the "="
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    _Sdk(os.environ, None).shutdown()
    assert "OTEL_EXPORTER_OTLP_HEADERS: an entry is not name=value" in caplog.text
    assert "sk-secret-123" not in caplog.text


@pytest.mark.parametrize("variables, expected", [
    ({"OTEL_RESOURCE_ATTRIBUTES": "k8s.service.name=billing"}, "llm-gateway"),
    ({"OTEL_SERVICE_NAME": ""}, "llm-gateway"),
    ({"OTEL_RESOURCE_ATTRIBUTES": "team=a, service.name=gw-eu"}, "gw-eu"),
    ({"OTEL_SERVICE_NAME": "gw-us"}, "gw-us"),
])
def test_service_name_defaults_to_the_gateways_unless_one_is_given(monkeypatch, variables, expected):
    from llm_gateway.addons.otel import _Sdk
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**variables, "OTEL_METRICS_EXPORTER": "none"}.items():
        monkeypatch.setenv(name, value)
    sdk = _Sdk(os.environ, None)
    sdk.shutdown()
    assert sdk.tracer_provider.resource.attributes["service.name"] == expected


def test_traces_exporter_none_sends_metrics_only(monkeypatch):
    from gwtest import rule_file
    from otlp import Receiver

    from llm_gateway.addons.otel import _Sdk
    from llm_gateway.pipeline.exchange import Exchange
    with Receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
        sdk = _Sdk(os.environ, None)
        span = sdk.start("chat quiet", {}, {}, time.time_ns())
        sdk.end(span, {}, None, None)
        ex = Exchange(rule_file().rules, "anthropic", "reverse", "POST", "gw", "/v1/messages", started=time.time())
        ex.model_requested, ex.status, ex.complete = "claude-x", 200, True
        sdk.measure(ex, "gw", 443)
        sdk.tracer_provider.force_flush(5000)
        sdk.meter_provider.force_flush(5000)
        assert receiver.wait_points("gen_ai.client.operation.duration")
        sdk.shutdown()
        assert receiver.spans == [] and not any(path == "/v1/traces" for path, _ in receiver.requests)
