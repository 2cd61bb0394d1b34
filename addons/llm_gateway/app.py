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
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from mitmproxy import eventsequence, exceptions, hooks  # noqa: F401 - eventsequence registers every hook

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


def _chain(hook: str, handlers: list[tuple[Any, Callable]]) -> Callable:
    """One callable for mitmproxy that calls every handler in order, each failure on its own."""
    if len(handlers) == 1:  # mitmproxy's own safecall isolates a single handler as well
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


class Dispatcher:
    """The gateway as mitmproxy sees it: `Dispatcher([concern, …])`, in hook order."""

    def __init__(self, concerns: Sequence[Any]) -> None:
        self.concerns = tuple(concerns)
        self.hooks: dict[str, tuple[str, ...]] = {}  # hook -> the concerns that take it, in order (for humans)
        for hook in hooks.all_hooks:
            handlers = [(c, fn) for c in self.concerns if callable(fn := getattr(c, hook, None))]
            if hook == "load":
                continue  # below: it must also register the concerns' commands
            if handlers:
                setattr(self, hook, _chain(hook, handlers))
                self.hooks[hook] = tuple(_name(c) for c, _ in handlers)

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
