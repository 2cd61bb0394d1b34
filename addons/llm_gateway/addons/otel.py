"""OpenTelemetry export: one GenAI span per API exchange and the GenAI client metrics, over OTLP/HTTP.

Off by default, and then nothing of OpenTelemetry is imported: a request costs one dict lookup and one
comparison. On when the rules say `otel: {enabled: true}` or an `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` is set
(policy/otel.py); everything else is the SDK's own `OTEL_*` configuration (endpoint, headers, service name,
resource attributes, sampler, batch and export intervals).

- A span starts at the request's arrival (`Exchange.started`) and continues an incoming `traceparent` (the
  propagators of `OTEL_PROPAGATORS`, W3C trace context by default); it ends in the `response` hook, which for a
  relayed stream mitmproxy calls once the stream ended (after `message_stop`, or cut short), or in `error`.
  This addon runs after Usage, so the cache break Usage found is on the exchange: it becomes a span event.
- Export is off the event loop: ended spans go to the SDK's BatchSpanProcessor (a worker thread) through a
  bound of `OTEL_BSP_MAX_QUEUE_SIZE` spans in flight; past it a span is dropped, never waited for. Dropped and
  failed spans are counted in the Prometheus exposition (`llm_gateway_otel_spans{result}`), where they are seen
  even while the receiver is down. Metrics: a PeriodicExportingMetricReader (`OTEL_METRIC_EXPORT_INTERVAL`).
- Attributes: pipeline/genai.py (the one mapping). Prompt and answer text only with content capture on; the
  answer's text only where the gateway held the whole answer (not for relayed streams).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from mitmproxy import http

from llm_gateway.pipeline import exchange, genai
from llm_gateway.policy.otel import capturing, exporting, length_limit
from llm_gateway.protocol import jsoncodec
from llm_gateway.util.labels import Bounded

if TYPE_CHECKING:
    from llm_gateway.addons.rulefile import RuleFile
    from llm_gateway.policy.spec import Rules

logger = logging.getLogger("llm_gateway.otel")

INSTRUMENTATION = "llm_gateway"
DEFAULT_SERVICE_NAME = "llm-gateway"
DEFAULT_MAX_QUEUE = 2048  # the SDK's default for OTEL_BSP_MAX_QUEUE_SIZE
ENDED = False  # `Exchange.span` once the span ended (None: none started yet)
PROTOCOL = "http/protobuf"  # the one OTLP protocol exported (opentelemetry-exporter-otlp-proto-http)
STOP_SECONDS = 3.0  # the most a stop waits for the last exports
WARN_EVERY = 60.0  # seconds between two "export failing" lines
# The propagators' loggers: each refused traceparent, tracestate or baggage header is a warning quoting the
# client's header (up to its whole baggage): one line per request, written by whoever sends the request.
QUIET = ("opentelemetry.trace.propagation.tracecontext", "opentelemetry.baggage.propagation",
         "opentelemetry.trace.span")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class OtelExport:
    def __init__(self, rule_file: RuleFile, registry: Any = None, environ: Mapping[str, str] | None = None) -> None:
        self.rule_file = rule_file
        self.registry = registry  # a prometheus_client registry for the span counters (the gateway's own)
        self.environ = os.environ if environ is None else environ
        self._decided: tuple[Rules | None, bool, bool] = (None, False, False)  # (rules, exporting, capturing)
        self.sdk: _Sdk | None = None
        self.refused = False  # the SDK refused the OTEL_* settings: no export until a restart
        self.building: threading.Thread | None = None  # the SDK being built off the event loop (a rule reload)

    # -- switches -----------------------------------------------------------------------------------

    def _switches(self, rules: Rules) -> tuple[bool, bool]:
        decided = self._decided
        if decided[0] is not rules:
            otel = rules.otel
            decided = self._decided = (rules, exporting(otel, self.environ), capturing(otel, self.environ))
        return decided[1], decided[2]

    def _ready(self, wait: bool = False) -> _Sdk | None:
        """The SDK once built; None while it is being built and (export off until a restart) when the `OTEL_*`
        settings are refused. At start-up it is built before traffic (`wait`); when a rule reload turns export
        on, in a thread: importing and building the SDK takes about a second, which on the event loop would
        stall every connection. The exchanges that arrive meanwhile have no span."""
        if self.sdk is None and not self.refused:
            if wait:
                self._build()
            elif self.building is None:
                self.building = threading.Thread(target=self._build, name="otel-sdk-build", daemon=True)
                self.building.start()
        return self.sdk

    def _build(self) -> None:
        """A bad telemetry setting must never cost the traffic: a warning, not a stop."""
        try:
            sdk = _Sdk(self.environ, self.registry)
        except ValueError as e:  # the SDK's refusal of a setting (e.g. a batch larger than the queue)
            self.refused = True
            logger.warning(f"OpenTelemetry export off: the OTEL_* settings were refused: {e}")
            return
        logger.info(f"OpenTelemetry export on: {sdk.where}")
        self.sdk = sdk

    def running(self) -> None:
        if self._switches(self.rule_file.rules)[0]:
            self._ready(wait=True)

    def done(self) -> None:
        if self.building is not None:
            self.building.join()
        if self.sdk is not None:
            self.sdk.shutdown()

    # -- exchanges ----------------------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or ex.span is not None:
            return
        on, capture = self._switches(ex.rules)
        if on and (sdk := self._ready()) is not None:
            self._start(sdk, flow, ex, capture)

    def _start(self, sdk: _Sdk, flow: http.HTTPFlow, ex: exchange.Exchange, capture: bool) -> Any:
        request = flow.request
        attributes = genai.start_attributes(ex, request.headers, request.host, request.port)
        if capture:
            attributes.update(genai.content_attributes(ex.body, sdk.content_limit))
        span = ex.span = sdk.start(genai.span_name(ex), request.headers, attributes, _ns(ex.started))
        return span

    def response(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def _end(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or ex.span is ENDED:
            return
        on, capture = self._switches(ex.rules)
        sdk = self.sdk
        span = ex.span
        if span is None:
            if not on or (sdk := self._ready()) is None:
                return
            span = self._start(sdk, flow, ex, capture)  # refused before the `request` hook (a body over the limit)
        ex.span = ENDED
        attributes = genai.end_attributes(ex)
        if capture and flow.response is not None and not flow.response.stream:
            message = jsoncodec.parse_json_body(flow.response.get_content(strict=False))
            attributes.update(genai.output_attributes(message))
        found = genai.break_event(ex)
        sdk.end(span, attributes, found, attributes.get("error.type"))
        sdk.measure(ex, flow.request.host, flow.request.port)


def _shown(url: str) -> str:
    """An endpoint for the log: without user information or query (either may hold a credential)."""
    parts = urlsplit(url)
    if not (parts.username or parts.password or parts.query):
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class _HeaderEntryHidden(logging.Filter):
    """The SDK's line for a malformed `OTEL_EXPORTER_OTLP_HEADERS` entry quotes the entry, credential and all
    (`x-api-key:sk-…` written with a colon): the line stays, the entry is not shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Header format invalid"):
            record.msg, record.args = ("OTEL_EXPORTER_OTLP_HEADERS: an entry is not name=value (URL-encoded) and "
                                       "was ignored; not shown, as it may hold a credential"), ()
        return True


class _Sdk:
    """The OpenTelemetry SDK, built once export is on: a tracer and a meter exporting over OTLP/HTTP."""

    def __init__(self, environ: Mapping[str, str], registry: Any) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
        from prometheus_client import CollectorRegistry, Counter

        self.propagate, self.trace = propagate, trace
        named = bool(environ.get("OTEL_SERVICE_NAME", "").strip()) or any(  # "k8s.service.name=…" is not it
            entry.split("=", 1)[0].strip() == "service.name" for entry in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","))
        resource = Resource.create({} if named else {"service.name": DEFAULT_SERVICE_NAME})
        protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                    or PROTOCOL).strip()
        if protocol != PROTOCOL:  # grpc (port 4317) or http/json: the POSTs would go nowhere useful, silently
            logger.warning(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol[:40]!r} is not supported: the gateway exports "
                           f"OTLP {PROTOCOL} only (a receiver's HTTP port, 4318 by default)")
        self.where = _shown(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318 (the OTLP default)")

        spans = Counter("llm_gateway_otel_spans", "OpenTelemetry spans by result: exported, failed (the receiver "
                        "refused or was unreachable), dropped (more than OTEL_BSP_MAX_QUEUE_SIZE in flight)",
                        ["result"], registry=registry if registry is not None else CollectorRegistry())
        self.exported, self.failed, self.dropped = (spans.labels(r) for r in ("exported", "failed", "dropped"))
        try:
            self.max_in_flight = max(1, int(environ.get("OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE)))
        except ValueError:
            self.max_in_flight = DEFAULT_MAX_QUEUE
        self.in_flight = 0
        self.undelivered, self.warned = 0, -WARN_EVERY
        logging.getLogger("opentelemetry.exporter").setLevel(logging.CRITICAL)  # see `warn_failed`
        for name in QUIET:  # a client's garbage traceparent, tracestate or baggage is ignored, not logged
            logging.getLogger(name).setLevel(logging.ERROR)
        headers_log = logging.getLogger("opentelemetry.util.re")
        if not any(isinstance(f, _HeaderEntryHidden) for f in headers_log.filters):
            headers_log.addFilter(_HeaderEntryHidden())
        self.lock = threading.Lock()
        sdk = self
        self.span_exporter = OTLPSpanExporter()

        class Counting(SpanExporter):
            """The OTLP exporter, counting what it delivered and what it could not (in the worker thread)."""

            def export(self, batch):
                try:
                    result = sdk.span_exporter.export(batch)
                finally:
                    with sdk.lock:
                        sdk.in_flight -= len(batch)
                if result is SpanExportResult.SUCCESS:
                    sdk.exported.inc(len(batch))
                else:
                    sdk.failed.inc(len(batch))
                    sdk.warn_failed(len(batch))
                return result

            def shutdown(self):
                sdk.span_exporter.shutdown()

            def force_flush(self, timeout_millis: int = 30000) -> bool:
                return sdk.span_exporter.force_flush(timeout_millis)

        # OTEL_METRICS_EXPORTER=none: spans only (a back end that takes no OTLP metrics, such as Langfuse)
        readers = [] if environ.get("OTEL_METRICS_EXPORTER", "").strip().lower() == "none" else [
            PeriodicExportingMetricReader(OTLPMetricExporter())]
        # shutdown_on_exit off: `shutdown` below is the one stop, bounded (the SDK's own at exit waits for a
        # hung receiver's whole timeout again)
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers, shutdown_on_exit=False)
        # OTEL_(SPAN_)ATTRIBUTE_VALUE_LENGTH_LIMIT when set (the SDK reads it), else the gateway's own bound on
        # text (captured content above all: an agent's prompt is hundreds of kilobytes on every request)
        self.content_limit, said = length_limit(environ, genai.CONTENT_MAX_CHARS)
        limits = SpanLimits() if said else SpanLimits(max_span_attribute_length=self.content_limit)
        # the sampler: OTEL_TRACES_SAMPLER(_ARG)
        # OTEL_TRACES_EXPORTER=none: metrics only; every span unsampled (nothing recorded, queued or sent)
        sampler = ALWAYS_OFF if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none" else None
        self.tracer_provider = TracerProvider(resource=resource, span_limits=limits, shutdown_on_exit=False,
                                              sampler=sampler)
        self.processor = BatchSpanProcessor(Counting())
        self.tracer_provider.add_span_processor(self.processor)
        self.tracer = self.tracer_provider.get_tracer(INSTRUMENTATION)
        meter = self.meter_provider.get_meter(INSTRUMENTATION)
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used",
            explicit_bucket_boundaries_advisory=list(genai.TOKEN_BUCKETS))
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration",
            explicit_bucket_boundaries_advisory=list(genai.SECONDS_BUCKETS))
        self.first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk", unit="s",
            description="Time to receive the first chunk of a streamed answer",
            explicit_bucket_boundaries_advisory=list(genai.SECONDS_BUCKETS))
        self.kind = trace.SpanKind.CLIENT
        # The model names a request chooses, bounded as the Prometheus labels are (util/labels.py): at most
        # MAX_VALUES each, then "other" (else any client fills the SDK's 2000 series a metric and pushes the
        # real models into its overflow series)
        self.bounded = {key: Bounded() for key in ("gen_ai.request.model", "gen_ai.response.model")}

    def warn_failed(self, count: int) -> None:
        """One line a minute at most while export fails (the exporter's own line per retry is silenced: an
        unreachable receiver would otherwise log several lines a second, each waking mitmproxy's event loop)."""
        self.undelivered += count
        now = time.monotonic()
        if now - self.warned >= WARN_EVERY:
            self.warned = now
            logger.warning(f"OpenTelemetry export to {self.where} failing: {self.undelivered} spans not delivered "
                           "since start (llm_gateway_otel_spans_total{result=\"failed\"})")

    def start(self, name: str, headers: Any, attributes: dict[str, Any], start_ns: int) -> Any:
        parent = self.propagate.extract(headers)  # an incoming traceparent (and baggage) continued
        return self.tracer.start_span(name, context=parent, kind=self.kind, attributes=genai.exportable(attributes),
                                      start_time=start_ns)

    def end(self, span: Any, attributes: dict[str, Any], cache_break: dict[str, Any] | None,
            error_type: str | None) -> None:
        span.set_attributes(genai.exportable(attributes))
        if cache_break is not None:
            span.add_event(genai.BREAK_EVENT, genai.exportable(cache_break))
        if error_type:
            span.set_status(self.trace.Status(self.trace.StatusCode.ERROR, error_type))
        if not span.is_recording():  # not sampled: nothing goes to the processor
            span.end()
            return
        with self.lock:
            room = self.in_flight < self.max_in_flight
            if room:
                self.in_flight += 1
        if room:
            span.end()
        else:
            self.dropped.inc()  # the span is never ended: nothing of it reaches the queue

    def measure(self, ex: exchange.Exchange, server: str | None, port: int | None) -> None:
        attributes = genai.exportable(genai.metric_attributes(ex, server, port))
        for key, bounded in self.bounded.items():  # client-chosen values: a series each, held until the stop
            if key in attributes:
                attributes[key] = bounded(attributes[key])
        self.duration.record(max(0.0, time.time() - ex.started), attributes)
        ttfc = genai.time_to_first_chunk(ex)
        if ttfc is not None:
            self.first_chunk.record(ttfc, attributes)
        for kind, count in genai.token_points(ex):
            self.token_usage.record(count, {**attributes, "gen_ai.token.type": kind})

    def shutdown(self, seconds: float = STOP_SECONDS) -> None:
        """Flush what is queued and stop the worker threads, waiting `seconds` at most: a receiver that accepts
        and never answers holds an export for all of OTEL_EXPORTER_OTLP_TIMEOUT (10 s, then the metrics' own),
        which would hold the gateway's stop. The SDK's threads are daemons: past the bound they end with the
        process, and what they held is lost."""
        stopping = threading.Thread(target=self._shutdown, name="otel-shutdown", daemon=True)
        stopping.start()
        stopping.join(seconds)
        if stopping.is_alive():
            logger.warning(f"OpenTelemetry export to {self.where} not answering: stopped without waiting for it")

    def _shutdown(self) -> None:
        self.tracer_provider.force_flush(timeout_millis=2000)
        self.span_exporter.shutdown()  # interrupts a retry's back-off: what is still queued may be lost, not the exit
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown(timeout_millis=5000)
