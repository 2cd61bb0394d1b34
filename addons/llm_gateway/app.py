"""The composition point: every concern of the gateway, built once and handed to mitmproxy as one addon.

`default_addons()` is like mitmproxy's own `mitmproxy.addons.default_addons()`: one function, so the program
and its tests can never disagree on which parts run or in which order (for each event mitmproxy calls the
addons in list order). Objects several concerns share (the rule file, the record log, the metrics, the drain,
the timeouts) are made here and passed in: no addon imports another.

`Dispatcher` is the one addon mitmproxy sees. mitmproxy delivers every event (and the `update` event that
follows each flow event) by walking its whole addon tree: a generator per addon, a `getattr` per addon and
hook, a `safecall` per addon. With twenty-one concerns as twenty-one addons that walk cost about 0.2 ms per request on
a 2-core machine, more than most concerns' own work (docs/benchmarks.md). For each hook at least one concern
implements, the dispatcher holds the concerns' bound methods in the fixed order they were given in, and calls
them in a plain loop. Hooks no concern implements are not attributes at all, so mitmproxy's `getattr` finds
nothing and calls nothing.

What mitmproxy would have done for the concerns still happens:
- `load` goes to every concern (options declared there work as before), and their `@command.command`
  commands are registered with mitmproxy's command manager;
- `configure`, `running`, `done` and every flow, connection and TLS hook reach each concern in order;
  async hooks are awaited;
- an exception in one concern is logged as mitmproxy logs an addon error, and the next concern still
  runs; `OptionsError` (a refused option) and `AddonHalt` propagate as they do from an addon.

The dispatcher has no `addons` attribute: mitmproxy would then walk the concerns too and call every
hook twice. A concern keeps its hook names and signatures, its own module and its own tests.

After the answer: mitmproxy sends a streamed answer's end (the last chunk, `0\r\n\r\n`) and a buffered answer
whole only once the `response` hook has returned (its `HttpStream.send_response`, then `flow_done`), so whatever
that hook does is on the client's latency path: for Claude Code-sized requests (65–290 kB) the cache watch's
fingerprint, the record and the metrics are 0.69 ms of CPU at the median (docs/benchmarks.md, issue 28). A concern whose `response` only reads the
finished exchange says so with `after_answer = ("response",)`: the dispatcher runs those handlers (the last
ones of the chain, in their order) on the event loop's next turn, right after mitmproxy has written the answer
(`loop.call_soon`: before any later socket event, so before the client's next request is read). Their order
among themselves is kept (the cache watch before the record, the metrics and mitmweb's comment after what they
read). A master that shows flows (mitmweb, the console: it has a `view`) gets the `update` event mitmproxy would
have sent after the hook, once they ran. Nothing is lost on a stop: `done` runs what is still waiting first.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from mitmproxy import ctx, eventsequence, exceptions, hooks  # noqa: F401 - eventsequence registers every hook
from mitmproxy.utils import asyncio_utils

from llm_gateway.addons.answer import AnswerPipeline
from llm_gateway.addons.backlog import ListenBacklog
from llm_gateway.addons.batching import ChunkBatching
from llm_gateway.addons.bodies import BodyLimit
from llm_gateway.addons.ca import GatewayCA
from llm_gateway.addons.quotas import Quotas
from llm_gateway.addons.clients import ClientDetector
from llm_gateway.addons.cloudauth import CloudCredentials
from llm_gateway.addons.credentials import KeyCustody
from llm_gateway.addons.drain import Drain
from llm_gateway.addons.egress import EgressPolicy
from llm_gateway.addons.endpoints import Endpoints
from llm_gateway.addons.failover import Failover
from llm_gateway.addons.fdlimit import OpenFileLimit
from llm_gateway.addons.framing import FramingGuard
from llm_gateway.addons.gatewaylog import GatewayLog
from llm_gateway.addons.heads import HeadLimit
from llm_gateway.addons.metrics import Metrics
from llm_gateway.addons.otel import OtelExport
from llm_gateway.addons.recordlog import RecordLog
from llm_gateway.addons.routing import ApiRouter
from llm_gateway.addons.rulefile import RuleFile, refuse_repeated_options
from llm_gateway.addons.startup import StartupReport
from llm_gateway.addons.streams import StreamPreference
from llm_gateway.addons.timeouts import Timeouts
from llm_gateway.addons.translate import ProviderTranslation
from llm_gateway.addons.usage import Usage
from llm_gateway.addons.warmup import Warmup
from llm_gateway.addons.webview import WebView

__all__ = ["Dispatcher", "default_addons", "refuse_repeated_options"]

logger = logging.getLogger("llm_gateway.dispatch")

# Raised by a concern to stop the event or to refuse an option: mitmproxy's safecall lets these through.
PASS_THROUGH = (exceptions.AddonHalt, exceptions.OptionsError)


def _name(concern: Any) -> str:
    return getattr(concern, "name", type(concern).__name__)


def _failed(hook: str, concern: Any, error: Exception) -> None:
    logger.error(f"Addon error in {_name(concern)}.{hook}: {error}", exc_info=error)


def _chain(hook: str, handlers: list[tuple[Any, Callable]], alone: bool = True) -> Callable:
    """One callable for mitmproxy that calls every handler in order, each failure on its own. `alone=False`:
    a single handler is wrapped too (nothing of mitmproxy's isolates what runs after the answer)."""
    if len(handlers) == 1 and alone:  # mitmproxy's own safecall isolates a single handler as well
        return handlers[0][1]
    calls = tuple(handlers)
    if any(inspect.iscoroutinefunction(fn) for _, fn in calls):

        async def dispatch_async(*args: Any) -> None:
            for concern, fn in calls:
                try:
                    result = fn(*args)
                    if result is not None and inspect.isawaitable(result):
                        await result
                except PASS_THROUGH:
                    raise
                except Exception as e:
                    _failed(hook, concern, e)

        return dispatch_async

    def dispatch(*args: Any) -> None:
        for concern, fn in calls:
            try:
                fn(*args)
            except PASS_THROUGH:
                raise
            except Exception as e:
                _failed(hook, concern, e)

    return dispatch


AFTER_ANSWER = frozenset({"response"})  # the hooks a concern may ask to run after the answer (`after_answer`)


def _after_answer(concern: Any) -> tuple[str, ...]:
    return tuple(getattr(concern, "after_answer", ()))


class Dispatcher:
    """The gateway as mitmproxy sees it: `Dispatcher([concern, …])`, in hook order."""

    def __init__(self, concerns: Sequence[Any]) -> None:
        self.concerns = tuple(concerns)
        self.hooks: dict[str, tuple[str, ...]] = {}  # hook -> the concerns that take it, in order (for humans)
        self.after_answer: dict[str, tuple[str, ...]] = {}  # hook -> the concerns run after the answer (for humans)
        self._pending: list[tuple[Callable, Any]] = []  # (handlers to run after the answer, flow), in order
        for concern in self.concerns:
            if unknown := set(_after_answer(concern)) - AFTER_ANSWER:
                raise ValueError(f"{_name(concern)}: after_answer {sorted(unknown)}: only {sorted(AFTER_ANSWER)}")
        for hook in hooks.all_hooks:
            handlers = [(c, fn) for c in self.concerns if callable(fn := getattr(c, hook, None))]
            if hook == "load":
                continue  # below: it must also register the concerns' commands
            if not handlers:
                continue
            self.hooks[hook] = tuple(_name(c) for c, _ in handlers)
            later = [(c, fn) for c, fn in handlers if hook in _after_answer(c)]
            if not later:
                setattr(self, hook, _chain(hook, handlers))
                continue
            now = handlers[: len(handlers) - len(later)]
            if handlers[len(now):] != later:  # running them later must not change the order of the chain
                raise ValueError(f"{hook}: the concerns run after the answer must come last: {self.hooks[hook]}")
            if any(inspect.iscoroutinefunction(fn) for _, fn in later):  # nothing would await them at a stop
                raise ValueError(f"{hook}: a concern run after the answer must not be async: {self.hooks[hook]}")
            setattr(self, hook, self._answered(_chain(hook, now) if now else None, _chain(hook, later, alone=False)))
            self.after_answer[hook] = tuple(_name(c) for c, _ in later)
        if "done" in self.hooks:
            done = self.done
            if inspect.iscoroutinefunction(done):

                async def done_async() -> None:
                    self.run_pending()
                    await done()

                self.done = done_async
            else:

                def done_sync() -> None:
                    self.run_pending()
                    done()

                self.done = done_sync
        else:
            self.done = self.run_pending

    def _answered(self, now: Callable | None, later: Callable) -> Callable:
        """The hook: `now` (the handlers that may still change the answer) at once, then `later` queued."""
        if now is not None and inspect.iscoroutinefunction(now):

            async def hook_async(flow: Any) -> None:
                await now(flow)
                self.defer(later, flow)

            return hook_async

        def hook(flow: Any) -> None:
            if now is not None:
                now(flow)
            self.defer(later, flow)

        return hook

    def defer(self, later: Callable, flow: Any) -> None:
        """Run `later(flow)` on the event loop's next turn (at once without a running loop: tools, tests)."""
        self._pending.append((later, flow))
        if len(self._pending) > 1:
            return  # already scheduled: one callback runs every flow answered in the same turn
        try:
            asyncio.get_running_loop().call_soon(self.run_pending)
        except RuntimeError:
            self.run_pending()

    def run_pending(self) -> None:
        """The handlers still waiting, in the order their flows were answered; then the viewers' `update`."""
        pending, self._pending = self._pending, []
        flows = []
        for later, flow in pending:
            try:
                later(flow)
            except PASS_THROUGH:  # AddonHalt: the later handlers of this flow are skipped, as in the chain
                pass
            flows.append(flow)
        master = _master()
        if flows and getattr(master, "view", None) is not None:
            update = hooks.UpdateHook(flows)
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                master.addons.trigger(update)
            else:
                asyncio_utils.create_task(master.addons.trigger_event(update), name="update after the answer",
                                          keep_ref=True)

    def load(self, loader) -> None:
        for concern in self.concerns:
            load = getattr(concern, "load", None)
            if callable(load):
                try:
                    load(loader)
                except PASS_THROUGH:
                    raise
                except Exception as e:
                    _failed("load", concern, e)
        for concern in self.concerns:  # what mitmproxy does for each addon it registers
            loader.master.commands.collect_commands(concern)

    def __repr__(self) -> str:
        return f"Dispatcher({', '.join(_name(c) for c in self.concerns)})"


def _master() -> Any:
    try:
        return ctx.master
    except AttributeError:  # no master (a concern driven on its own)
        return None


def default_addons(rule_file: RuleFile | None = None, records: RecordLog | None = None) -> list:
    """One addon per concern, in the order their hooks must run. `rule_file` and `records` may be given
    (tests hand in a RuleFile holding parsed rules); the first two entries are always those two."""
    rule_file = rule_file or RuleFile()
    records = records or RecordLog()
    metrics = Metrics(records)  # also counts egress decision records
    timeouts = Timeouts()
    drain = Drain(timeouts)
    router, custody, translation, cloudauth = ApiRouter(rule_file), KeyCustody(rule_file), ProviderTranslation(), CloudCredentials(rule_file)
    return [
        rule_file,  # gateway_rules: the rules in force
        records,  # gateway_log: where records go
        OpenFileLimit(),  # running: soft RLIMIT_NOFILE raised; refused accepts counted, one line a second
        GatewayCA(),  # gateway_ca: one CA for every replica, instead of confdir's own
        EgressPolicy(rule_file, records),  # connect/TLS/request: where HTTPS_PROXY (regular-mode) traffic may go
        Endpoints(rule_file, metrics, drain),  # requestheaders (base-URL listener): /-/ready, /-/healthz, /-/metrics
        router,  # request: is it API traffic? which upstream?
        FramingGuard(),  # requestheaders: a bare CR/LF/NUL in a header, a 400; response: a 101 not to WebSocket, a 502
        BodyLimit(),  # requestheaders/request: a native 413 over limits.request_body, the body never held
        drain,  # SIGTERM/SIGINT: not ready, listeners closed, new requests 529, in-flight exchanges finish
        ClientDetector(),  # request: which client and session, which stream preference
        custody,  # requestheaders: mask the client's credential; request: gateway token -> upstream key
        StreamPreference(),  # request: force the upstream stream flag
        Failover(router.aim, [custody.request, translation.request, cloudauth.request]),  # request: a route's next upstreams armed
        translation,  # request: an Anthropic request for a provider: bedrock route becomes an InvokeModel call
        cloudauth,  # request: base-URL Bedrock/Vertex requests signed with the gateway's credentials
        AnswerPipeline(),  # responseheaders/response/error: what the answer means; native errors; conversion
        Quotas(metrics),  # request: spend and rate limits admitted (after credentials: the principal); response/error: settled
        timeouts,  # request→response: timeouts.first_byte and timeouts.stream_idle, a native error on expiry
        Usage(records),  # response/error: one usage record per exchange
        metrics,  # response/error: Prometheus counters from the finished exchange, after Usage
        OtelExport(rule_file, metrics.registry),  # request→response/error: a GenAI span per exchange (when on)
        WebView(),  # mitmweb's message view, stream body copy, flow comments and markers
        GatewayLog(),  # mitmproxy's connection chatter down to debug; failed non-API requests named
        StartupReport(rule_file),  # running: where each base-URL listener sends API requests; risky set-ups
        ChunkBatching(),  # gateway_batch_chunks: every chunk of a chunked body already received, handed on at once
        HeadLimit(metrics),  # gateway_head_size_limit: a request head past it a native 431, an answer head a failed exchange
        ListenBacklog(),  # gateway_listen_backlog: a deeper listen queue than mitmproxy's 100, for bursts
        Warmup(),  # running: the price list loaded, then start-up objects frozen out of the garbage collector's walks
    ]
