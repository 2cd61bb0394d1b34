"""End to end: the answer's end does not wait for the gateway's bookkeeping (app.Dispatcher's `after_answer`).

A real mitmdump runs the gateway with one more script that holds back the work the dispatcher runs after the
answer (the cache watch, the record, the metrics, the span, mitmweb's comment) until the test sends SIGUSR1.
While it is held, the Anthropic SDK's streamed and non-streamed calls still complete, whole, and nothing is
recorded or counted yet; released, the record and the metrics are what they always were. Were that work still
inside the `response` hook, holding it would hold the answer's end and the calls would never complete.
"""

from __future__ import annotations

import os
import signal
import textwrap
import urllib.request

import pytest

import sdk_client
from conftest import routed_rules
from fakes.upstream import Scenario
from harness import Gateway, free_port

pytestmark = pytest.mark.e2e

USAGE = {"input_tokens": 321, "output_tokens": 54, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 42000}

HOLD = textwrap.dedent('''\
    """The dispatcher's after-the-answer work held until SIGUSR1 (the test's switch)."""
    import asyncio
    import signal

    from llm_gateway.app import Dispatcher

    held = []
    deferring = Dispatcher.defer


    def defer(self, later, flow):
        held.append((self, later, flow))


    def release():
        while held:
            deferring(*held.pop(0))


    class Hold:
        def running(self):
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGUSR1, release)


    Dispatcher.defer = defer
    addons = [Hold()]
    ''')


@pytest.fixture
def gw(module_fake, tmp_path):
    script = tmp_path / "hold.py"
    script.write_text(HOLD)
    port = free_port()
    with Gateway(routed_rules(module_fake.url), extra_args=("-s", str(script), "--set", f"gateway_metrics_port={port}"),
                 workdir=tmp_path) as gateway:
        gateway.metrics_url = f"http://127.0.0.1:{port}/-/metrics"
        yield gateway


def requests_counted(gw) -> float:
    text = urllib.request.urlopen(gw.metrics_url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("llm_gateway_requests_total{"))


@pytest.mark.parametrize("call", ["stream", "create"])
def test_the_client_has_its_whole_answer_before_the_record_and_the_metrics(gw, module_fake, call):
    module_fake.clear()
    module_fake.script(Scenario(usage=USAGE))
    result = sdk_client.run(call, base_url=gw.base_url, timeout=30)
    assert result["ok"], result  # the whole answer (a stream to its message_stop) while the bookkeeping waits
    [seen] = module_fake.requests
    assert gw.records(timeout=0.5) == [] and requests_counted(gw) == 0  # held: nothing recorded, nothing counted
    os.kill(gw.proc.pid, signal.SIGUSR1)
    record = gw.wait_record(lambda r: r["request_id"] == seen.request_id)
    assert record["complete"] is True and record["status"] == 200
    assert record["cache_read_input_tokens"] == 42000 and record["output_tokens"] == 54
    assert len(gw.records(timeout=0)) == 1
    assert requests_counted(gw) == 1
