"""The `otel` rule section and the standard `OTEL_*` switches: whether the gateway exports OpenTelemetry GenAI
spans and metrics, and whether they may hold prompt and answer text.

What the SDK reads itself (endpoint, headers, service name, resource attributes, sampler, batch sizes, export
interval) stays in the `OTEL_*` environment variables, as every OpenTelemetry SDK documents them; the rules hold
only the gateway's own switches:

    otel:
      enabled: true           # default: on when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set, else off
      capture_content: false  # default: OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT

`OTEL_SDK_DISABLED=true` (the SDK's own off switch) wins over both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The OTLP endpoint variables (OpenTelemetry "OTLP Exporter Configuration"): either one set means "export".
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
# The GenAI instrumentations' content switch (opentelemetry-python-contrib's genai utils): `true`, or one of the
# newer mode names; anything else (`false`, `NO_CONTENT`, unset) keeps text out.
CONTENT_VARIABLE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_CONTENT_ON = frozenset({"true", "1", "span_only", "span_and_event"})


@dataclass(frozen=True)
class Otel:
    enabled: bool | None = None  # None: not said in the rules, the environment decides
    capture_content: bool | None = None


def read(reader: Any, node: Any) -> Otel:
    """The `otel:` section, through policy/rules.py's `_Reader` (refusals keep file, line and reason)."""
    m = reader.mapping(node, "otel", {"enabled": False, "capture_content": False})
    return Otel(**{key: reader.boolean(value, f"otel.{key}") for key, value in m.items()})


def exporting(otel: Otel, environ: Mapping[str, str]) -> bool:
    """Whether spans and metrics are exported under these rules and this environment."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if otel.enabled is not None:
        return otel.enabled
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def capturing(otel: Otel, environ: Mapping[str, str]) -> bool:
    """Whether spans may carry prompt and answer text (`gen_ai.input.messages` and the like)."""
    if otel.capture_content is not None:
        return otel.capture_content
    return environ.get(CONTENT_VARIABLE, "").strip().lower() in _CONTENT_ON


# The SDK's attribute length limits (OpenTelemetry "Attribute Limits"), the span's own first.
LENGTH_VARIABLES = ("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT")


def length_limit(environ: Mapping[str, str], default: int) -> tuple[int, bool]:
    """(characters per attribute value, whether the environment set it): the standard limit when it is a
    positive integer, else `default` (the SDK sets no limit of its own)."""
    for name in LENGTH_VARIABLES:
        value = environ.get(name, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                continue
            if n > 0:
                return n, True
    return default, False
