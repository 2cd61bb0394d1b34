"""Prometheus metrics from finished exchanges and egress records, and the probe/metrics endpoints."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from mitmproxy.test import taddons, tutils
from prometheus_client.parser import text_string_to_metric_families

import gwtest
from harness import free_port
from llm_gateway.addons import endpoints as endpoints_mod
from llm_gateway.pipeline import exchange
from llm_gateway.addons import metrics as metrics_mod
from llm_gateway.addons.endpoints import Endpoints
from llm_gateway.addons.metrics import Metrics
from llm_gateway.addons.recordlog import RecordLog

USAGE = {"input_tokens": 21, "output_tokens": 9, "cache_creation_input_tokens": 7, "cache_read_input_tokens": 13}


def finished(*, client="claude-code", model="claude-sonnet-4-5", session="sess-1", status=200, usage=USAGE,
             error_type=None, unwrapped=False, cache_break=False, mode="reverse", complete=True):
    """A flow whose exchange went through the whole chain, as Metrics sees it after Usage."""
    flow = gwtest.api_flow(mode=mode)
    rules = gwtest.rule_file().rules
    ex = exchange.start(flow, exchange.Exchange(rules=rules, api="anthropic", mode=mode, method="POST",
                                                host="api.anthropic.com", path="/v1/messages"))
    ex.client, ex.model_answered, ex.session = client, model, session
    ex.usage = dict(usage) if usage is not None else None
    ex.error_type, ex.unwrapped, ex.cache_break = error_type, unwrapped, cache_break
    ex.status = status  # what the client got, as answer.py leaves it
    ex.complete = complete and status is not None and status < 400
    if status is not None:
        flow.response = tutils.tresp(status_code=status)
    else:
        flow.response = None
    return flow


def families(m: Metrics) -> dict:
    """name -> {(label items): value}, parsed from the exposition with prometheus_client's own parser."""
    out: dict = {}
    for family in text_string_to_metric_families(m.exposition()[1].decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(m: Metrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


# -- counting exchanges ---------------------------------------------------------------------------------


def test_tokens_by_kind_and_requests_by_client_model_status():
    m = Metrics()
    m.response(finished())
    m.response(finished(usage={**USAGE, "output_tokens": 100}))
    m.response(finished(client="opencode", model="claude-haiku-4-5"))
    labels = {"client": "claude-code", "model": "claude-sonnet-4-5"}
    assert value(m, "llm_gateway_requests_total", **labels, status="200") == 2
    assert value(m, "llm_gateway_tokens_total", **labels, kind="input") == 42
    assert value(m, "llm_gateway_tokens_total", **labels, kind="output") == 109
    assert value(m, "llm_gateway_tokens_total", **labels, kind="cache_read") == 26
    assert value(m, "llm_gateway_tokens_total", **labels, kind="cache_write") == 14
    assert value(m, "llm_gateway_tokens_total", client="opencode", model="claude-haiku-4-5", kind="input") == 21


def test_an_exchange_counts_once_even_if_error_follows_response():
    m = Metrics()
    flow = finished()
    m.response(flow)
    m.error(flow)
    m.response(flow)
    assert value(m, "llm_gateway_requests_total", client="claude-code", model="claude-sonnet-4-5", status="200") == 1


def test_non_api_flows_are_not_counted():
    m = Metrics()
    flow = gwtest.api_flow(host="example.com", resp=True)
    m.response(flow)
    m.error(flow)
    assert not any(f.samples for f in text_string_to_metric_families(m.exposition()[1].decode()))


def test_cache_hit_ratio_is_read_over_all_prompt_tokens_so_far():
    m = Metrics()
    m.response(finished(usage={"input_tokens": 10, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 0,
                               "output_tokens": 1}))
    m.response(finished(usage={"input_tokens": 50, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 10,
                               "output_tokens": 1}))
    assert value(m, "llm_gateway_cache_hit_ratio", client="claude-code", model="claude-sonnet-4-5") == pytest.approx(
        30 / 100
    )


def test_cache_breaks_errors_and_unwrapped_errors():
    m = Metrics()
    m.response(finished(cache_break=True, usage={**USAGE, "cache_read_input_tokens": 0}))
    m.response(finished(status=429, usage=None, error_type="rate_limit_error"))
    m.response(finished(status=401, usage=None, error_type="authentication_error", unwrapped=True))
    m.response(finished(status=500, usage=None, error_type="made_up_by_a_proxy_" + "x" * 50))
    m.error(finished(status=None, usage=None))
    labels = {"client": "claude-code", "model": "claude-sonnet-4-5"}
    assert value(m, "llm_gateway_cache_breaks_total", **labels) == 1
    assert value(m, "llm_gateway_cache_break_reasons_total", client="claude-code", reason="unknown") is None
    assert value(m, "llm_gateway_errors_total", **labels, error_type="rate_limit_error") == 1
    assert value(m, "llm_gateway_errors_total", **labels, error_type="authentication_error") == 1
    assert value(m, "llm_gateway_errors_total", **labels, error_type="other") == 1  # unknown types do not grow labels
    assert value(m, "llm_gateway_unwrapped_errors_total", **labels, error_type="authentication_error") == 1
    assert value(m, "llm_gateway_unwrapped_errors_total", **labels, error_type="rate_limit_error") is None
    assert value(m, "llm_gateway_requests_total", **labels, status="none") == 1
    # no usage, no tokens
    assert value(m, "llm_gateway_tokens_total", **labels, kind="input") == 21


def test_cache_breaks_by_reason_are_labelled_by_client_and_reason_only():
    m = Metrics()
    for reason in ("system_changed", "system_changed", "ttl_expired", "not-a-reason"):
        flow = finished(cache_break=True, usage={**USAGE, "cache_read_input_tokens": 0})
        exchange.of(flow).cache_break_reason = reason
        m.response(flow)
    assert value(m, "llm_gateway_cache_break_reasons_total", client="claude-code", reason="system_changed") == 2
    assert value(m, "llm_gateway_cache_break_reasons_total", client="claude-code", reason="ttl_expired") == 1
    assert value(m, "llm_gateway_cache_break_reasons_total", client="claude-code", reason="not-a-reason") is None
    assert m.cache_break_reasons._labelnames == ("client", "reason")


def test_never_labelled_by_session():
    m = Metrics()
    for i in range(5):
        m.response(finished(session=f"session-{i}-secretish"))
    text = m.exposition()[1].decode()
    assert "secretish" not in text
    label_names = {k for samples in families(m).values() for labels in samples for k, _ in labels}
    assert label_names == {"client", "model", "status", "kind", "principal"}


def test_client_and_model_labels_are_bounded():
    m = Metrics()
    for i in range(metrics_mod.MAX_VALUES + 20):
        m.response(finished(client=f"client-{i}", model=f"model-{i}"))
    requests = families(m)["llm_gateway_requests_total"]
    clients = {dict(labels)["client"] for labels in requests}
    models = {dict(labels)["model"] for labels in requests}
    assert len(clients) == len(models) == metrics_mod.MAX_VALUES + 1
    assert "other" in clients and "other" in models
    assert requests[(("client", "other"), ("model", "other"), ("status", "200"))] == 20
    # a known value keeps its own label after the cap
    m.response(finished(client="client-0", model="model-0"))
    assert value(m, "llm_gateway_requests_total", client="client-0", model="model-0", status="200") == 2


def test_label_values_from_requests_are_escaped():
    m = Metrics()
    m.response(finished(client="evil\rclient", model='claude\nllm_gateway_requests_total{client="x"} 999'))
    body = m.exposition()[1].decode()
    assert "\r" not in body and not any(line.startswith('llm_gateway_requests_total{client="x"}') for line in body.splitlines())
    model = 'claude\\nllm_gateway_requests_total{client="x"} 999'
    assert value(m, "llm_gateway_requests_total", client="evil\\rclient", model=model, status="200") == 1


def test_missing_client_and_model_read_unknown():
    m = Metrics()
    m.response(finished(client="", model=None))
    assert value(m, "llm_gateway_requests_total", client="unknown", model="unknown", status="200") == 1


# -- egress decisions, from the records -----------------------------------------------------------------


def test_egress_decisions_are_counted_from_records_written_or_not():
    records = RecordLog()
    m = Metrics(records)
    rules = gwtest.rule_file().rules  # no usage.log: nothing is written, observers still see every record
    with taddons.context(records) as tctx:
        tctx.configure(records, gateway_log="")
        for decision in ("allowed", "denied", "denied", "tunnelled", "fronting", "Not A Label!"):
            records.write({"kind": "egress", "decision": decision, "host": "x"}, rules)
        records.write({"kind": "usage", "decision": "allowed"}, rules)  # not an egress record
        records.write({"kind": "egress"}, rules)  # no decision
    assert records.written == 0
    assert value(m, "llm_gateway_egress_decisions_total", decision="allowed") == 1
    assert value(m, "llm_gateway_egress_decisions_total", decision="denied") == 2
    assert value(m, "llm_gateway_egress_decisions_total", decision="tunnelled") == 1
    assert value(m, "llm_gateway_egress_decisions_total", decision="fronting") == 1
    assert value(m, "llm_gateway_egress_decisions_total", decision="other") == 1


def test_a_failing_observer_does_not_stop_the_record(tmp_path, caplog):
    records = RecordLog()
    records.observers.append(lambda record: 1 / 0)
    log = tmp_path / "records.jsonl"
    with taddons.context(records) as tctx:
        tctx.configure(records, gateway_log=str(log))
        with caplog.at_level(logging.ERROR):
            records.write({"kind": "egress", "decision": "denied"}, gwtest.rule_file().rules)
    assert log.read_text().count("\n") == 1
    assert "record observer" in caplog.text


# -- endpoints ------------------------------------------------------------------------------------------


@pytest.fixture
def endpoints():
    rf = gwtest.rule_file()
    m = Metrics()
    m.response(finished())
    return Endpoints(rf, m)


def test_answers(endpoints):
    assert endpoints.answer("GET", "/-/healthz") == (200, endpoints_mod.TEXT, b"ok\n")
    status, _, body = endpoints.answer("GET", "/-/ready?verbose=1")
    assert status == 200 and body.startswith(b"ready")
    endpoints.rule_file.loaded = False
    status, _, body = endpoints.answer("GET", "/-/ready")
    assert status == 503 and b"no rules" in body
    status, content_type, body = endpoints.answer("GET", "/-/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    assert b'llm_gateway_requests_total{client="claude-code",model="claude-sonnet-4-5",status="200"} 1.0' in body
    # a scraper that asks for OpenMetrics (Prometheus does) gets it
    status, content_type, body = endpoints.answer("GET", "/-/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    assert endpoints.answer("GET", "/metrics")[0] == 404  # only on the metrics port
    assert endpoints.answer("GET", "/metrics", port=True)[0] == 200
    assert endpoints.answer("POST", "/-/ready")[0] == 405
    assert endpoints.answer("GET", "/-/other")[0] == 404


def test_reverse_listener_answers_without_forwarding(endpoints):
    with taddons.context(endpoints) as tctx:
        tctx.configure(endpoints)
        flow = gwtest.api_flow(mode="reverse", path="/-/ready")
        flow.request.method = "GET"
        endpoints.requestheaders(flow)
        assert flow.response.status_code == 200
        assert flow.response.content.startswith(b"ready")
        assert flow.response.headers["cache-control"] == "no-store"

        head = gwtest.api_flow(mode="reverse", path="/-/metrics")
        head.request.method = "HEAD"
        endpoints.requestheaders(head)
        assert head.response.status_code == 200 and head.response.content == b""


def test_egress_mode_and_other_paths_are_left_alone(endpoints):
    with taddons.context(endpoints) as tctx:
        regular = gwtest.api_flow(mode="regular", path="/-/ready")  # a path on the host the agent asked for
        endpoints.requestheaders(regular)
        assert regular.response is None
        api = gwtest.api_flow(mode="reverse")
        endpoints.requestheaders(api)
        assert api.response is None
        tctx.configure(endpoints, gateway_status_paths=False)
        off = gwtest.api_flow(mode="reverse", path="/-/ready")
        endpoints.requestheaders(off)
        assert off.response is None


async def http_get(port: int, request: bytes) -> tuple[int, dict, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


async def test_metrics_port_serves_probes_and_exposition(endpoints):
    port = free_port()
    with taddons.context(endpoints) as tctx:
        tctx.configure(endpoints, gateway_metrics_port=port)
        endpoints.running()
        await asyncio.sleep(0.05)
        status, headers, body = await http_get(port, b"GET /-/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, body) == (200, b"ok\n") and headers["Content-Length"] == "3"
        status, headers, body = await http_get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        parsed = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert parsed["llm_gateway_requests"].samples[0].value == 1
        assert (await http_get(port, b"HEAD /-/ready HTTP/1.1\r\n\r\n"))[::2] == (200, b"")
        endpoints.rule_file.loaded = False
        assert (await http_get(port, b"GET /-/ready HTTP/1.0\r\n\r\n"))[0] == 503
        assert (await http_get(port, b"GET /nope HTTP/1.0\r\n\r\n"))[0] == 404
        # junk and hang-ups are dropped without taking the port down
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"NOT HTTP\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert (await http_get(port, b"GET /-/healthz HTTP/1.1\r\n\r\n"))[0] == 200

        endpoints.done()
        await asyncio.sleep(0.05)
        with pytest.raises(OSError):
            await http_get(port, b"GET /-/healthz HTTP/1.1\r\n\r\n")


async def test_metrics_port_in_use_is_an_error(endpoints, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with taddons.context(endpoints) as tctx:
            tctx.configure(endpoints, gateway_metrics_port=port)
            with caplog.at_level(logging.ERROR):
                endpoints.running()
            assert f"cannot listen at 127.0.0.1:{port}" in caplog.text
            endpoints.done()


async def test_metrics_port_follows_option_changes(endpoints):
    first, second = free_port(), free_port()
    with taddons.context(endpoints) as tctx:
        tctx.configure(endpoints, gateway_metrics_port=first)
        endpoints.running()
        await asyncio.sleep(0.05)
        assert (await http_get(first, b"GET /-/healthz HTTP/1.1\r\n\r\n"))[0] == 200
        tctx.configure(endpoints, gateway_metrics_port=second)
        await asyncio.sleep(0.05)
        assert (await http_get(second, b"GET /-/healthz HTTP/1.1\r\n\r\n"))[0] == 200
        with pytest.raises(OSError):
            await http_get(first, b"GET /-/healthz HTTP/1.1\r\n\r\n")
        tctx.configure(endpoints, gateway_metrics_port=0)
        await asyncio.sleep(0.05)
        with pytest.raises(OSError):
            await http_get(second, b"GET /-/healthz HTTP/1.1\r\n\r\n")
        endpoints.done()


def test_principal_counters_are_bounded_and_name_no_token():
    m = Metrics()
    for i in range(metrics_mod.MAX_VALUES + 3):
        ex = finished(client="claude-code")
        exchange.of(ex).principal = f"team-{i}"
        m.response(ex)
    m.response(finished(client="claude-code"))  # no principal: counted as "none"
    requests = families(m)["llm_gateway_principal_requests_total"]
    principals = {dict(labels)["principal"] for labels in requests}
    assert len(principals) == metrics_mod.MAX_VALUES + 1 and {"other", "team-0"} <= principals
    assert value(m, "llm_gateway_principal_requests_total", principal="other", status="200") == 4
    assert value(m, "llm_gateway_principal_tokens_total", principal="team-0", kind="input") > 0


def test_the_label_sets_kept_for_speed_are_bounded_and_count_as_fresh_ones(monkeypatch):
    """Raw (client, model, principal, status) sets are kept with their children, at most MAX_LABEL_SETS;
    once the cache starts over, the counts go on from where they were."""
    monkeypatch.setattr(metrics_mod, "MAX_LABEL_SETS", 3)
    m = Metrics()
    for i in range(10):
        m.response(finished(model=f"model-{i % 5}"))
        assert len(m._label_sets) <= 3
    requests = families(m)["llm_gateway_requests_total"]
    assert {dict(labels)["model"]: n for labels, n in requests.items()} == {f"model-{i}": 2 for i in range(5)}
