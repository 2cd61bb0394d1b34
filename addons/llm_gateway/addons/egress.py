"""The egress policy for agents behind HTTPS_PROXY (the regular-mode listener only).

Agents in egress mode may reach the hosts the `egress` rules allow and nothing else. Allowed hosts in
`inspect` are decrypted (API traffic must be, to be routed and counted); other allowed hosts are
tunnelled untouched, so the client sees the real server and its certificate. Base-URL (reverse) mode
is not affected.

No bypass: a host is judged in one normal form (lower case, no trailing dots, IP addresses in their
canonical form, including the `127.1` / `2130706433` spellings the resolver accepts), the gateway
connects to exactly the host it judged, IP addresses pass only when listed as addresses, and inside a
decrypted tunnel a `Host` header, an absolute-form request target (RFC 9112 §3.2.2: a server must
prefer its authority to the Host header) or a TLS SNI naming another host than the CONNECT target is
refused (domain fronting). What goes upstream uses the normal form too: the TLS SNI and Host header
of an inspected tunnel, and an origin-form request target.

A refusal says what was refused and by which rule (never where the rule file lives: agents must not
learn the gateway's file layout), in its body and in the `x-gateway-egress` response header, which
`curl -v` shows also for a refused CONNECT.

Every refusal is one `{"kind": "egress"}` record and one warning line: per refused CONNECT, plain-HTTP
request, ClientHello with a fronting SNI, and refused request inside a tunnel (denied, blocked, fronting).
Allowed decisions (CONNECTs allowed or tunnelled, allowed plain-HTTP requests) are many (Claude Code opens
about 20 tunnels a turn) and mostly uninteresting: with `egress.record_allowed: summary` (the default
rules.yaml's) they are counted per host, port, rule and decision and written as one summary record
(`"summary": true, "count": N, "since": <first>`) at most every SUMMARY_EVERY seconds and at shutdown, their log
lines at debug level; `each` (the parser's default, so older rule files keep their records) writes one record
and info line per decision. Allowed requests inside a decrypted tunnel get
none: the CONNECT covers the tunnel and API exchanges get their usage record.

The hooks fail closed: an unexpected error refuses the CONNECT or request instead of letting it through.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from mitmproxy import connection, http, tls
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import server_hooks

from llm_gateway.mitm import layers as mitm_layers
from llm_gateway.pipeline.answer import native_answer
from llm_gateway.pipeline.flows import EGRESS_METADATA, is_regular
from llm_gateway.policy.egress import (
    blocked_by,
    host_of_header,
    is_api_host,
    judge,
    normal_host_header,
)
from llm_gateway.policy.routing import match_api
from llm_gateway.policy.rules import Rules
from llm_gateway.protocol.hosts import canonical_host, normalize_host, path_of
from llm_gateway.util.logsafe import clean

if TYPE_CHECKING:
    from mitmproxy.proxy import layer

    from llm_gateway.addons.recordlog import RecordLog
    from llm_gateway.addons.rulefile import RuleFile

logger = logging.getLogger("llm_gateway.egress")
REFUSAL_HEADER = "x-gateway-egress"  # why a request or CONNECT was refused, on the 403

MAX_FIELD = 255  # client-supplied names in records and messages are cut to this length
SUMMARY_EVERY = 60.0  # seconds between summary records of allowed decisions (egress.record_allowed: summary)
ALLOWED = ("allowed", "tunnelled")


# --- judging hosts and paths ----------------------------------------------------------------------


def _cut(text: str | None) -> str | None:
    return None if text is None else text[:MAX_FIELD]


# --- the addon ----------------------------------------------------------------------------------


@dataclass(eq=False)
class Tunnel:
    """What the CONNECT decision said about one tunnel; found again by the tunnel's server connection."""

    host: str
    port: int
    inspect: bool
    rule: str
    refused: str | None = None  # "denied" | "fronting": decrypted only to refuse what comes through; for good


class EgressPolicy:
    def __init__(self, rule_file: RuleFile, records: RecordLog) -> None:
        self.rule_file = rule_file
        self.records = records
        self.tunnels: weakref.WeakKeyDictionary[connection.Server, Tunnel] = weakref.WeakKeyDictionary()
        self._warned: set[str] = set()
        # allowed decisions held for the next summary: (decision, method, host, port, rule) -> [count, first ts, rules]
        self.pending: dict[tuple[str, str, str, int, str], list[Any]] = {}
        self._timer: Any = None
        records.before_stop.append(self.flush_summary)

    # -- CONNECT -------------------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or not is_regular(flow.client_conn):
            return
        try:
            self._http_connect(flow)
        except Exception:
            self._fail_closed(flow)

    def _http_connect(self, flow: http.HTTPFlow) -> None:
        rules = self.rule_file.rules
        host, port = normalize_host(flow.request.host), flow.request.port
        if flow.server_conn in self.tunnels:  # a CONNECT sent inside a decrypted tunnel
            rule = "CONNECT inside a tunnel"
            flow.response = self.refusal(rules, "denied", host, port, None, rule)
            self.decide(flow.client_conn, rules, "denied", host, port, rule, method="CONNECT")
            return
        verdict = judge(rules.egress, host, port)
        if verdict.allowed:
            host = canonical_host(host)
            flow.request.host = host  # connect to exactly what was judged
            self.tunnels[flow.server_conn] = Tunnel(host, port, verdict.inspect, verdict.rule)
            if not verdict.inspect and is_api_host(rules, host):
                self._warn_uninspected_api(rules, host)
            self.decide(flow.client_conn, rules, "allowed" if verdict.inspect else "tunnelled", host, port, verdict.rule, method="CONNECT")
            return
        if is_api_host(rules, host):
            # An agent shows a CONNECT refusal as a bare connection error and retries. Accept the tunnel
            # (without connecting anywhere), decrypt it, and answer each request with a native
            # permission_error the agent displays as it is.
            self.tunnels[flow.server_conn] = Tunnel(host, port, True, verdict.rule, refused="denied")
            flow.response = http.Response(
                flow.request.data.http_version, 200, b"Connection established", http.Headers(), b"", None,
                time.time(), time.time(),
            )
            self.decide(flow.client_conn, rules, "denied", host, port, verdict.rule, method="CONNECT",
                        note="API host: tunnel accepted to answer with permission_error")
            return
        flow.response = self.refusal(rules, "denied", host, port, None, verdict.rule)
        flow.metadata[EGRESS_METADATA] = {"decision": "denied", "host": host, "port": port, "rule": verdict.rule}
        self.decide(flow.client_conn, rules, "denied", host, port, verdict.rule, method="CONNECT")

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Keep raw bytes of a tunnel where its decision put them (this runs before mitmproxy's own choice).

        Untouched tunnels that do not start with TLS are relayed as they are (not parsed as HTTP), and
        refused tunnels never fall back to a raw TCP relay to the refused host: they speak HTTP or nothing.
        """
        context = nextlayer.context
        tunnel = self.tunnels.get(context.server)
        if tunnel is None or not is_regular(context.client):
            return
        data = nextlayer.data_client()
        if starts_like_tls_record(data):
            return  # TLS layers; tls_clienthello decides
        if tunnel.refused:
            mitm_layers.decrypt_as_http(nextlayer)
        elif not tunnel.inspect:
            mitm_layers.relay_untouched(nextlayer)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        tunnel = self.tunnels.get(data.context.server)
        if tunnel is None or not is_regular(data.context.client):
            return
        try:
            self._tls_clienthello(data, tunnel)
        except Exception:
            logger.exception("egress policy error: the tunnel is refused")
            tunnel.refused = tunnel.refused or "denied"
            data.ignore_connection = False
            data.establish_server_tls_first = False

    def _tls_clienthello(self, data: tls.ClientHelloData, tunnel: Tunnel) -> None:
        sni = normalize_host(data.client_hello.sni) if data.client_hello.sni else None
        if sni and canonical_host(sni) != tunnel.host and not tunnel.refused:
            tunnel.refused = "fronting"
            self.decide(data.context.client, self.rule_file.rules, "fronting", tunnel.host, tunnel.port,
                        "TLS SNI differs from the CONNECT target", method="TLS", sni=_cut(sni))
        if tunnel.inspect and not tunnel.refused:
            # The server gets the name in its normal form: OpenSSL refuses `name.` as an SNI, and
            # mitmproxy would otherwise pass the client's spelling on.
            data.context.server.sni = tunnel.host
        if tunnel.refused:
            # Decrypt, to refuse its requests. Show the fronted name to no server: with
            # connection_strategy=eager, mitmproxy's tlsconfig (which runs after this script) still does TLS
            # with the already connected CONNECT target first, so that handshake names the target.
            data.ignore_connection = False
            data.establish_server_tls_first = False
            data.context.server.sni = tunnel.host
        elif not tunnel.inspect:
            data.ignore_connection = True  # tunnelled untouched: the client sees the real server

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """A refused tunnel never connects to its host, whatever asks (eager TLS, a forwarded request)."""
        tunnel = self.tunnels.get(data.server)
        if tunnel is not None and tunnel.refused and not data.server.error:
            data.server.error = f"refused by the egress policy ({tunnel.refused} {tunnel.host}:{tunnel.port})"

    # -- requests: plain HTTP and inside decrypted tunnels ----------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not is_regular(flow.client_conn) or flow.request.method == "CONNECT":
            return
        try:
            self._requestheaders(flow)
        except Exception:
            self._fail_closed(flow)

    def _requestheaders(self, flow: http.HTTPFlow) -> None:
        rules = self.rule_file.rules
        tunnel = self.tunnels.get(flow.server_conn)
        path = flow.request.path
        if tunnel is not None:
            host, port, target = tunnel.host, tunnel.port, "the CONNECT target"
        else:
            host, port, target = canonical_host(normalize_host(flow.request.host)), flow.request.port, "the request target"

        header_host = host_of_header(flow.request.host_header)
        if header_host and canonical_host(header_host) != host:
            rule = f"Host header differs from {target}"
            self.refuse(flow, rules, "fronting", host, port, path, rule, host_header=_cut(header_host))
            return
        # HTTP/1 absolute-form inside a tunnel (HTTP/2's :authority is the host_header above)
        authority = flow.request.authority if tunnel is not None and flow.request.http_version.startswith("HTTP/1") else ""
        target_host = host_of_header(authority)
        if target_host and canonical_host(target_host) != host:
            rule = "request target differs from the CONNECT target"
            self.refuse(flow, rules, "fronting", host, port, path, rule, host_header=_cut(target_host))
            return
        sni = normalize_host(flow.client_conn.sni) if tunnel is not None and flow.client_conn.sni else None
        if sni and canonical_host(sni) != host:
            self.refuse(flow, rules, "fronting", host, port, path, "TLS SNI differs from the CONNECT target", sni=_cut(sni))
            return
        if tunnel is not None and tunnel.refused:  # a refused tunnel stays refused; a new one is judged anew
            self.refuse(flow, rules, "denied", host, port, path, tunnel.rule)
            return

        verdict = judge(rules.egress, host, port)  # the rules in force now, also inside older tunnels
        if not verdict.allowed:
            self.refuse(flow, rules, "denied", host, port, path, verdict.rule)
            return
        block = blocked_by(rules.egress, host, path)
        if block:
            self.refuse(flow, rules, "blocked", host, port, path, block)
            return
        if authority:
            if not flow.request.host_header:
                flow.request.host_header = authority
            flow.request.authority = ""  # origin-form upstream, as every server understands it
        if flow.request.host_header:
            normal = normal_host_header(flow.request.host_header)
            if normal != flow.request.host_header:
                flow.request.host_header = normal
        if tunnel is None:
            if flow.request.host != host:
                flow.request.host = host  # connect to exactly what was judged
            self.decide(flow.client_conn, rules, "allowed", host, port, verdict.rule,
                        method=flow.request.method, path=path)

    def refuse(self, flow: http.HTTPFlow, rules: Rules, decision: str, host: str, port: int, path: str,
               rule: str, **extra: Any) -> None:
        flow.request.stream = False  # a response and a streamed request body cannot go together
        flow.response = self.refusal(rules, decision, host, port, path, rule, **extra)
        flow.metadata[EGRESS_METADATA] = {"decision": decision, "host": host, "port": port, "rule": rule}
        self.decide(flow.client_conn, rules, decision, host, port, rule, method=flow.request.method, path=path, **extra)

    @staticmethod
    def _fail_closed(flow: http.HTTPFlow) -> None:
        logger.exception(f"egress policy error: refusing {clean(flow.request.method)} {clean(flow.request.pretty_host)}")
        flow.request.stream = False
        flow.response = http.Response.make(
            403, "LLM gateway egress policy: internal error, refused (see the gateway log)\n",
            {"content-type": "text/plain; charset=utf-8"},
        )

    # -- answers, records, log -----------------------------------------------------------------

    @staticmethod
    def refusal(rules: Rules, decision: str, host: str, port: int, path: str | None, rule: str,
                **extra: Any) -> http.Response:
        """A 403 that says what was refused and by which rule (in the body and the `x-gateway-egress`
        header); native JSON for API requests. It never names the rule file: that is the gateway's layout."""
        where = f"{host}:{port}" + (path_of(path) if path else "")
        if decision == "fronting":
            named = extra.get("host_header") or extra.get("sni")
            what = f"refused {where}: {rule} ({named} is not {host}: domain fronting)"
        elif decision == "blocked":
            what = f"blocked {where}: the path matches {rule}"
        else:
            what = f"denied {host}:{port}: not allowed ({rule})"
        message = f"LLM gateway egress policy {what}; see the gateway log or the egress record"
        reason = clean(f"{decision}: {what}", 1000).encode("ascii", "backslashreplace").decode("ascii")
        if path is not None and match_api(rules, host, path):
            return native_answer("permission_error", message, {REFUSAL_HEADER: reason})  # a 403
        return http.Response.make(
            403, message + "\n", {"content-type": "text/plain; charset=utf-8", REFUSAL_HEADER: reason}
        )

    def decide(self, client: connection.Client, rules: Rules, decision: str, host: str, port: int, rule: str,
               *, method: str, path: str | None = None, **extra: Any) -> None:
        client_ip = client.peername[0] if client.peername else None
        record: dict[str, Any] = {
            "kind": "egress",
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "decision": decision,
            "method": method,
            "host": host,
            "port": port,
            "path": path_of(path) if path is not None else None,  # query strings may carry tokens
            "rule": rule,
            "client_ip": client_ip,
            **{k: v for k, v in extra.items() if v is not None},
        }
        summarised = decision in ALLOWED and rules.egress.record_allowed == "summary"
        if summarised:
            self._hold(record, rules)
        else:
            self.records.write(record, rules)
        where = clean(f"{host}:{port}" + (record["path"] or ""))
        line = f"egress {decision}: {clean(method)} {where} ({clean(rule)}) from {client_ip or '?'}"
        if "host_header" in extra or "sni" in extra:
            line += f" naming {clean(extra.get('host_header') or extra.get('sni'))}"
        if decision not in ALLOWED:
            logger.warning(line)
        else:
            (logger.debug if summarised else logger.info)(line)

    def _hold(self, record: dict[str, Any], rules: Rules) -> None:
        key = (record["decision"], record["method"], record["host"], record["port"], record["rule"])
        held = self.pending.get(key)
        if held is None:
            self.pending[key] = [1, record["ts"], rules]
        else:
            held[0] += 1
            held[2] = rules
        if self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(SUMMARY_EVERY, self.flush_summary)
            except RuntimeError:  # no event loop (a test driving the hooks): written at the next flush or at stop
                pass

    def flush_summary(self) -> None:
        """Write one summary record, and one info line, per held (decision, method, host, port, rule)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self.pending = self.pending, {}
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        for (decision, method, host, port, rule), (count, since, rules) in pending.items():
            self.records.write({
                "kind": "egress", "ts": now, "decision": decision, "method": method, "host": host, "port": port,
                "path": None, "rule": rule, "summary": True, "count": count, "since": since,
            }, rules)
            logger.info(f"egress {decision}: {clean(method)} {clean(f'{host}:{port}')} ({clean(rule)}) "
                        f"x{count} since {since}")

    def _warn_uninspected_api(self, rules: Rules, host: str) -> None:
        if host in self._warned or len(self._warned) > 1000:
            return
        self._warned.add(host)
        logger.warning(
            f"egress: API host {host} is allowed but not in egress.inspect ({rules.source}): its traffic is "
            f"tunnelled untouched, so it is not routed, not recorded for usage and not checked against egress.block"
        )
