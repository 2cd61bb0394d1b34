"""The LLM interception gateway, as mitmproxy loads it: `mitmdump -s addons/gateway.py`.

Thin on purpose: it only composes one object per concern, in the order their hooks must run, and
hands them to mitmproxy as one addon (`llm_gateway.dispatch`), which calls them in that order.
The parts live in the `llm_gateway` package beside this file.
"""

import os
import sys

# mitmproxy puts this folder on sys.path only while it loads the script; keep it there so the
# package also resolves when it is not installed.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

from llm_gateway.backlog import ListenBacklog  # noqa: E402
from llm_gateway.bodies import BodyLimit  # noqa: E402
from llm_gateway.ca import GatewayCA  # noqa: E402
from llm_gateway.clients import ClientDetector  # noqa: E402
from llm_gateway.credentials import KeyCustody  # noqa: E402
from llm_gateway.dispatch import Dispatcher  # noqa: E402
from llm_gateway.drain import Drain  # noqa: E402
from llm_gateway.egress import EgressPolicy  # noqa: E402
from llm_gateway.endpoints import Endpoints  # noqa: E402
from llm_gateway.fdlimit import OpenFileLimit  # noqa: E402
from llm_gateway.envelopes import ErrorUnwrapper  # noqa: E402
from llm_gateway.gatewaylog import GatewayLog  # noqa: E402
from llm_gateway.metrics import Metrics  # noqa: E402
from llm_gateway.records import RecordLog  # noqa: E402
from llm_gateway.routing import ApiRouter  # noqa: E402
from llm_gateway.rulefile import RuleFile, refuse_repeated_options  # noqa: E402
from llm_gateway.startup import StartupReport  # noqa: E402
from llm_gateway.streams import StreamPreference  # noqa: E402
from llm_gateway.timeouts import Timeouts  # noqa: E402
from llm_gateway.usage import Usage  # noqa: E402
from llm_gateway.webview import WebView  # noqa: E402

refuse_repeated_options()
rule_file = RuleFile()
records = RecordLog()
metrics = Metrics(records)  # also counts egress decision records
drain = Drain()

# Hook order matters: for each event mitmproxy calls the addons in this order.
addons = [
    rule_file,  # gateway_rules: the rules in force
    records,  # gateway_log: where records go
    OpenFileLimit(),  # running: soft RLIMIT_NOFILE raised; refused accepts counted, one line a second
    GatewayCA(),  # gateway_ca: one CA for every replica, instead of confdir's own
    EgressPolicy(rule_file, records),  # connect/TLS/request: where HTTPS_PROXY (regular-mode) traffic may go; first
    Endpoints(rule_file, metrics, drain),  # requestheaders (base-URL listener): /-/ready, /-/healthz, /-/metrics; own port
    ApiRouter(rule_file),  # request: is it API traffic? which upstream?
    BodyLimit(),  # requestheaders/request: a native 413 over limits.request_body, the body never held
    drain,  # SIGTERM/SIGINT: not ready, listeners closed, new requests 529, in-flight exchanges finish
    ClientDetector(),  # request: which client and session, which stream preference
    KeyCustody(rule_file),  # requestheaders: mask the client's credential; request: gateway token -> upstream key, or 401
    ErrorUnwrapper(),  # response: native errors from envelopes; stream error events
    StreamPreference(),  # request: force the stream flag; response: convert back to what the client asked
    Timeouts(),  # request→response: timeouts.first_byte and timeouts.stream_idle, a native error on expiry
    Usage(records),  # response/error: one usage record per exchange
    metrics,  # response/error: Prometheus counters from the finished exchange, after Usage
    WebView(),  # last: mitmweb's message view, stream body copy, flow comments and markers
    GatewayLog(),  # mitmproxy's connection chatter down to debug; failed non-API requests named
    StartupReport(rule_file),  # running: where each base-URL listener sends API requests; risky set-ups
    ListenBacklog(),  # gateway_listen_backlog: a deeper listen queue than mitmproxy's 100, for bursts
]

# mitmproxy sees one addon, which calls the concerns above in their order (dispatch.py says why).
addons = [Dispatcher(addons)]
