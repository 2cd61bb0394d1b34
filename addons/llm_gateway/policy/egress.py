"""The egress policy's decisions on the rules (`egress`): may `host:port` be reached, is it decrypted,
is a path blocked; and a Host header's host in the one normal form (protocol/hosts.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mitmproxy.net.http import url

from llm_gateway.policy.rules import Egress, HostPattern, Rules
from llm_gateway.protocol.hosts import ip_literal, normalize_host, path_forms

_HOSTNAME = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_](?:[a-z0-9_-]{0,62}))*")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    inspect: bool
    rule: str  # what decided, e.g. "egress.allow[2]: *.github.com"


def _pattern_matches(pattern: HostPattern, host: str, ip: str | None, port: int) -> bool:
    if ip is None:
        return pattern.match(host, port)
    # an address passes only by being listed as that address: "*" or "10.*" never let one through
    return ip_literal(pattern.host.pattern.lower()) == ip and (pattern.port is None or pattern.port == port)


def judge(egress: Egress, host: str, port: int) -> Verdict:
    """Is `host:port` (already normalized) allowed, and is it decrypted? `inspect` implies allowed."""
    ip = ip_literal(host)
    if ip is None and (len(host) > 253 or not _HOSTNAME.fullmatch(host)):
        return Verdict(False, False, "not a valid host name")
    for i, p in enumerate(egress.inspect):
        if _pattern_matches(p, host, ip, port):
            return Verdict(True, True, f"egress.inspect[{i}]: {p}")
    for i, p in enumerate(egress.allow):
        if _pattern_matches(p, host, ip, port):
            return Verdict(True, False, f"egress.allow[{i}]: {p}")
    if ip is not None:
        return Verdict(False, False, "IP address not listed in egress.allow or egress.inspect")
    if egress.default == "allow":
        return Verdict(True, False, "egress.default: allow")
    return Verdict(False, False, "egress.default: deny")


def blocked_by(egress: Egress, host: str, path: str) -> str | None:
    forms = path_forms(path)
    for i, b in enumerate(egress.block):
        if b.host.match(host) and any(b.path.match(p) for p in forms):
            return f"egress.block[{i}]: {b.host} {b.path}"
    return None


def is_api_host(rules: Rules, host: str) -> bool:
    return any(g.match(host) for api in rules.apis for g in api.hosts)


def host_of_header(value: str | None) -> str | None:
    """The host name of a Host header / :authority, normalized; None when absent."""
    if not value:
        return None
    try:
        host, _port = url.parse_authority(value, check=False)
    except ValueError:
        return normalize_host(value)
    return normalize_host(host)


def normal_host_header(value: str) -> str:
    """A Host header naming the same host in its normal form (`API.Example.COM.:443` -> `api.example.com:443`)."""
    try:
        host, port = url.parse_authority(value, check=False)
    except ValueError:
        return value
    host = normalize_host(host)
    if ":" in host:
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"
