"""A local OTLP/HTTP receiver for end-to-end tests: what an OpenTelemetry Collector's `otlphttp` receiver takes.

Listens on 127.0.0.1, accepts `POST /v1/traces` and `POST /v1/metrics` as binary protobuf (gzip or not), decodes
them with the OpenTelemetry proto package (`ExportTraceServiceRequest`, `ExportMetricsServiceRequest`) and keeps
plain dicts: spans with their attributes, events, status, trace and parent ids; metric points with theirs.
"""

from __future__ import annotations

import gzip
import http.server
import threading
import time
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

KINDS = {v: k for k, v in Span.SpanKind.items()}  # 3 -> "SPAN_KIND_CLIENT"


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def attributes(kvs) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in kvs}


class Receiver:
    """`with Receiver() as r:` then point OTEL_EXPORTER_OTLP_ENDPOINT at `r.url`."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.points: list[dict[str, Any]] = []  # one per metric data point
        self.requests: list[tuple[str, str]] = []  # (path, content-type)
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                with receiver.lock:
                    receiver.requests.append((self.path, self.headers.get("content-type", "")))
                if self.path == "/v1/traces":
                    receiver._traces(ExportTraceServiceRequest.FromString(body))
                    answer = ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    receiver._metrics(ExportMetricsServiceRequest.FromString(body))
                    answer = ExportMetricsServiceResponse()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = answer.SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _traces(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for rs in request.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    found.append({
                        "name": s.name, "kind": KINDS.get(s.kind), "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(), "parent_span_id": s.parent_span_id.hex(),
                        "start_ns": s.start_time_unix_nano, "end_ns": s.end_time_unix_nano,
                        "attributes": attributes(s.attributes), "resource": resource, "scope": ss.scope.name,
                        "events": [{"name": e.name, "attributes": attributes(e.attributes)} for e in s.events],
                        "status": {"code": s.status.code, "message": s.status.message},
                    })
        with self.lock:
            self.spans += found

    def _metrics(self, request: ExportMetricsServiceRequest) -> None:
        found = []
        for rm in request.resource_metrics:
            resource = attributes(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    for p in getattr(m, kind).data_points:
                        point = {"name": m.name, "unit": m.unit, "kind": kind, "attributes": attributes(p.attributes),
                                 "resource": resource, "scope": sm.scope.name}
                        if kind == "histogram":
                            point.update(count=p.count, sum=p.sum, bounds=list(p.explicit_bounds))
                        elif kind == "sum":
                            point["value"] = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                        found.append(point)
        with self.lock:
            self.points += found

    def start(self) -> "Receiver":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "Receiver":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def clear(self) -> None:
        with self.lock:
            self.spans, self.points, self.requests = [], [], []

    def wait_span(self, match, timeout: float = 15) -> dict[str, Any]:
        """The first span `match(span)` accepts, waiting for the gateway's batches."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [s for s in self.spans if match(s)]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no matching span in {timeout}s; got {[(s['name'], s['attributes']) for s in self.spans]}")

    def wait_points(self, name: str, match=lambda p: True, timeout: float = 15) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [p for p in self.points if p["name"] == name and match(p)]
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {name} point in {timeout}s; got {sorted({p['name'] for p in self.points})}")
