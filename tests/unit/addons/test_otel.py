"""The OtelExport addon off: the OpenTelemetry SDK is never imported (zero cost). What it exports when on is
proven end to end against a real OTLP/HTTP receiver in tests/e2e/test_e2e_otel.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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
