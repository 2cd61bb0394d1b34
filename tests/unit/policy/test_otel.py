"""The `otel` rule section and the OTEL_* switches: when spans are exported and when they may hold text."""

from __future__ import annotations

import pytest

from gwtest import BASE_RULES
from llm_gateway.policy import rules
from llm_gateway.policy.otel import Otel, capturing, exporting
from llm_gateway.policy.rules import RulesError


def test_the_section_is_read():
    found = rules.parse(BASE_RULES + "otel:\n  enabled: true\n  capture_content: false\n", "r.yaml").otel
    assert found == Otel(enabled=True, capture_content=False)
    assert rules.parse(BASE_RULES, "r.yaml").otel == Otel()  # not said: the environment decides


@pytest.mark.parametrize("text, reason", [
    ("otel:\n  enabled: yes please\n", "r.yaml:6: otel.enabled must be true or false"),
    ("otel:\n  enable: true\n", "r.yaml:6: unknown key 'enable' in otel (allowed: enabled, capture_content)"),
    ("otel: [true]\n", "r.yaml:5: otel must be a mapping"),
])
def test_a_bad_section_is_refused_with_file_line_and_reason(text, reason):
    with pytest.raises(RulesError) as found:
        rules.parse(BASE_RULES + text, "r.yaml")
    assert str(found.value).startswith(reason), found.value


@pytest.mark.parametrize("otel, environ, on", [
    (Otel(), {}, False),  # off by default
    (Otel(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.example:4318"}, True),
    (Otel(), {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector.example:4318/v1/traces"}, True),
    (Otel(), {"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
    (Otel(enabled=True), {}, True),  # the SDK's default endpoint
    (Otel(enabled=False), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.example:4318"}, False),
    (Otel(enabled=True), {"OTEL_SDK_DISABLED": "true"}, False),
    (Otel(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c.example:4318", "OTEL_SDK_DISABLED": "TRUE"}, False),
])
def test_exporting(otel, environ, on):
    assert exporting(otel, environ) is on


@pytest.mark.parametrize("otel, value, on", [
    (Otel(), None, False), (Otel(), "true", True), (Otel(), "SPAN_ONLY", True), (Otel(), "NO_CONTENT", False),
    (Otel(), "false", False), (Otel(capture_content=True), None, True), (Otel(capture_content=False), "true", False),
])
def test_capturing(otel, value, on):
    environ = {} if value is None else {"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": value}
    assert capturing(otel, environ) is on
