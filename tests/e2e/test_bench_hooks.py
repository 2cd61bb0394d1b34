"""`scripts/bench --hooks` (tests/bench/hooks.py) must not rot: every concern's hooks run on its exchanges, and
it measures something. No timing is asserted; the figures live in docs/benchmarks.md."""

from __future__ import annotations

from bench import hooks, run


def test_the_hooks_of_every_concern_run_and_are_measured():
    found = hooks.measure(run.gateway_rules(hooks.UPSTREAM), run.request_body(False), n=30, per_hook=True)
    assert found["us_per_exchange"] > 0 and found["loop_us"] > 0
    timed = set(found["per_hook"])
    assert {"ApiRouter.request", "ClientDetector.request", "AnswerPipeline.response", "Usage.response",
            "Metrics.response"} <= timed
