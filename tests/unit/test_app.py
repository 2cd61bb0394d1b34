"""The one addon mitmproxy sees (app.Dispatcher): concerns called in order, once each, with everything
mitmproxy would have done for them as addons of their own (options, configure, running, done, commands,
async hooks, errors kept apart) — and the real gateway.py loaded as mitmproxy loads it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from mitmproxy import command, ctx, exceptions, hooks
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import taddons, tflow

from llm_gateway.app import Dispatcher

GATEWAY_SCRIPT = Path(__file__).resolve().parents[2] / "addons" / "gateway.py"


class Concern:
    """Records every call it gets into a shared journal."""

    def __init__(self, name: str, journal: list) -> None:
        self.name, self.journal = name, journal

    def load(self, loader) -> None:
        loader.add_option(f"test_{self.name}", int, 1, f"an option of {self.name}")
        self.journal.append((self.name, "load"))

    def configure(self, updated: set[str]) -> None:
        if f"test_{self.name}" in updated:
            if getattr(ctx.options, f"test_{self.name}") < 0:
                raise exceptions.OptionsError(f"test_{self.name} must not be negative")
            self.journal.append((self.name, "configure"))

    def running(self) -> None:
        self.journal.append((self.name, "running"))

    def done(self) -> None:
        self.journal.append((self.name, "done"))

    def request(self, flow) -> None:
        self.journal.append((self.name, "request"))

    @command.command("test.hello")
    def hello(self) -> str:
        return f"hello from {self.name}"


class Failing:
    def request(self, flow) -> None:
        raise RuntimeError("boom")


class Async:
    def __init__(self, journal: list) -> None:
        self.journal = journal

    async def response(self, flow) -> None:
        self.journal.append(("async", "response"))


class OnlyResponse:
    def __init__(self, journal: list) -> None:
        self.journal = journal

    def response(self, flow) -> None:
        self.journal.append(("sync", "response"))


def test_options_commands_and_lifecycle_reach_every_concern_in_order():
    journal: list = []
    a, b = Concern("a", journal), Concern("b", journal)
    d = Dispatcher([a, b])
    assert not hasattr(d, "addons")  # mitmproxy would walk the concerns itself and call every hook twice
    with taddons.context(d) as tctx:
        assert "test_a" in tctx.options and "test_b" in tctx.options  # declared in the concerns' load()
        assert tctx.master.commands.call("test.hello").startswith("hello from")
        tctx.configure(d, test_a=2, test_b=5)
        tctx.master.addons.trigger(hooks.RunningHook())
        tctx.master.addons.trigger(hooks.DoneHook())
        with pytest.raises(exceptions.OptionsError):  # a refused value is refused, as from an addon
            tctx.configure(d, test_a=-1)
    assert journal[:2] == [("a", "load"), ("b", "load")]
    assert ("a", "configure") in journal and journal.index(("a", "configure")) < journal.index(("b", "configure"))
    assert [e for e in journal if e[1] in ("running", "done")] == [("a", "running"), ("b", "running"),
                                                                    ("a", "done"), ("b", "done")]


async def test_each_event_reaches_each_concern_once_in_order_and_a_failure_stays_its_own(caplog):
    journal: list = []
    d = Dispatcher([Concern("a", journal), Failing(), Concern("b", journal), Async(journal), OnlyResponse(journal)])
    with taddons.context(d) as tctx:
        f = tflow.tflow(resp=True)
        caplog.set_level(logging.ERROR)
        await tctx.master.addons.handle_lifecycle(HttpRequestHook(f))
        await tctx.master.addons.handle_lifecycle(HttpResponseHook(f))
    flow_calls = [e for e in journal if e[1] in ("request", "response")]
    assert flow_calls == [("a", "request"), ("b", "request"), ("async", "response"), ("sync", "response")]
    assert "Addon error in Failing.request: boom" in caplog.text


def test_hooks_no_concern_takes_are_not_there_for_mitmproxy_to_call():
    journal: list = []
    d = Dispatcher([OnlyResponse(journal)])
    assert d.hooks == {"response": ("OnlyResponse",)}
    assert getattr(d, "request", None) is None and getattr(d, "update", None) is None
    assert d.response.__self__.__class__ is OnlyResponse  # one taker: its own method, nothing in between


def test_gateway_script_is_one_addon_holding_every_concern_with_their_options_and_commands(monkeypatch, request):
    from mitmproxy.proxy.layers.http import _http1

    # gateway_batch_chunks patches mitmproxy's HTTP/1 reader for the whole process (mitm/chunks.py): undone after
    monkeypatch.setattr(_http1, "make_body_reader", _http1.make_body_reader)
    monkeypatch.setattr("llm_gateway.mitm.chunks._original", None)
    # so does gateway_head_size_limit (mitm/heads.py): mitmproxy's head readers back after
    from llm_gateway.mitm import heads

    request.addfinalizer(heads.uninstall)
    with taddons.context() as tctx:
        ns = tctx.script(str(GATEWAY_SCRIPT))
        [dispatcher] = ns.addons
        assert isinstance(dispatcher, Dispatcher)
        names = [type(c).__name__ for c in dispatcher.concerns]
        assert names[:2] == ["RuleFile", "RecordLog"] and names.index("Usage") < names.index("Metrics") < names.index("WebView")
        for option in ("gateway_rules", "gateway_log", "gateway_keep_stream_body", "gateway_metrics_port",
                       "gateway_ca", "gateway_listen_backlog", "gateway_batch_chunks", "gateway_head_size_limit"):
            assert option in tctx.options, option
        for name in ("gateway.reload", "gateway.stats"):
            assert name in tctx.master.commands.commands, name
        # the API hooks run in the fixed order of gateway.py
        assert dispatcher.hooks["request"] == (
            "ApiRouter", "BodyLimit", "ClientDetector", "KeyCustody", "StreamPreference", "Failover",
            "ProviderTranslation", "CloudCredentials", "Quotas", "Timeouts", "OtelExport")
        assert dispatcher.hooks["response"] == (
            "FramingGuard", "BodyLimit", "Drain", "KeyCustody", "Failover", "AnswerPipeline", "Quotas", "Timeouts", "Usage",
            "Metrics",
            "OtelExport", "WebView")
        assert dispatcher.hooks["gateway_failover"] == ("Failover",)  # our own hook (mitm/layers.py)
