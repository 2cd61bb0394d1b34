"""The gateway's addons, composed once, in hook order: what `addons/gateway.py` loads and what the tests drive.

Like mitmproxy's own `mitmproxy.addons.default_addons()`: one function, so the program and its tests can
never disagree on which parts run or in which order (for each event mitmproxy calls the addons in list order).
"""

from __future__ import annotations

from .answer import AnswerPipeline
from .backlog import ListenBacklog
from .bodies import BodyLimit
from .ca import GatewayCA
from .clients import ClientDetector
from .credentials import KeyCustody
from .drain import Drain
from .egress import EgressPolicy
from .endpoints import Endpoints
from .fdlimit import OpenFileLimit
from .gatewaylog import GatewayLog
from .metrics import Metrics
from .records import RecordLog
from .routing import ApiRouter
from .rulefile import RuleFile
from .startup import StartupReport
from .streams import StreamPreference
from .timeouts import Timeouts
from .usage import Usage
from .warmup import Warmup
from .webview import WebView


def default_addons(rule_file: RuleFile | None = None, records: RecordLog | None = None) -> list:
    """One addon per concern, in the order their hooks must run. `rule_file` and `records` may be given
    (tests hand in a RuleFile holding parsed rules); the first two entries are always those two."""
    rule_file = rule_file or RuleFile()
    records = records or RecordLog()
    metrics = Metrics(records)  # also counts egress decision records
    drain = Drain()
    return [
        rule_file,  # gateway_rules: the rules in force
        records,  # gateway_log: where records go
        OpenFileLimit(),  # running: soft RLIMIT_NOFILE raised; refused accepts counted, one line a second
        GatewayCA(),  # gateway_ca: one CA for every replica, instead of confdir's own
        EgressPolicy(rule_file, records),  # connect/TLS/request: where HTTPS_PROXY (regular-mode) traffic may go
        Endpoints(rule_file, metrics, drain),  # requestheaders (base-URL listener): /-/ready, /-/healthz, /-/metrics
        ApiRouter(rule_file),  # request: is it API traffic? which upstream?
        BodyLimit(),  # requestheaders/request: a native 413 over limits.request_body, the body never held
        drain,  # SIGTERM/SIGINT: not ready, listeners closed, new requests 529, in-flight exchanges finish
        ClientDetector(),  # request: which client and session, which stream preference
        KeyCustody(rule_file),  # requestheaders: mask the client's credential; request: gateway token -> upstream key
        StreamPreference(),  # request: force the upstream stream flag
        AnswerPipeline(),  # responseheaders/response/error: what the answer means; native errors; conversion
        Timeouts(),  # request→response: timeouts.first_byte and timeouts.stream_idle, a native error on expiry
        Usage(records),  # response/error: one usage record per exchange
        metrics,  # response/error: Prometheus counters from the finished exchange, after Usage
        WebView(),  # mitmweb's message view, stream body copy, flow comments and markers
        GatewayLog(),  # mitmproxy's connection chatter down to debug; failed non-API requests named
        StartupReport(rule_file),  # running: where each base-URL listener sends API requests; risky set-ups
        ListenBacklog(),  # gateway_listen_backlog: a deeper listen queue than mitmproxy's 100, for bursts
        Warmup(),  # running: the price list loaded, then start-up objects frozen out of the garbage collector's walks
    ]
