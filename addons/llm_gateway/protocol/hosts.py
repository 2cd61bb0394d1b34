"""Host names and paths in the one form the gateway compares them in: lower case, no brackets, no
trailing dot; IP addresses in any spelling a resolver accepts; a path as sent and as a server reads it.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import socket
from urllib.parse import unquote


def path_of(target: str) -> str:
    """A request target without its query string (`/v1/messages?beta=true` -> `/v1/messages`): what paths are
    matched, logged and recorded by (a query string may carry a token)."""
    return target.split("?", 1)[0]


def normalize_host(host: str | None) -> str:
    """The one form hosts are compared in: lower case, no brackets, no trailing dots."""
    return (host or "").strip().lower().strip("[]").rstrip(".")


def ip_literal(host: str) -> str | None:
    """The canonical address if `host` is an IP address in any spelling a resolver accepts, else None.

    `inet_aton` is what getaddrinfo falls back to, so `127.1`, `0x7f.1` and `2130706433` all count as
    127.0.0.1 here: otherwise they would pass as host names and connect to an address nobody allowed.
    """
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefx." for c in host):
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            pass
    return None


def canonical_host(host: str) -> str:
    """What the gateway connects to for a judged host: the address itself for IP literals."""
    return ip_literal(host) or host


def path_forms(path: str) -> set[str]:
    """The path as sent and as a server would read it (percent-decoded, dot segments resolved).

    A block on `/api/*` must also stop `/%61pi/x`, `//api/x` and `/v1/../api/x`.
    """
    raw = path_of(path).split("#", 1)[0] or "/"
    forms = {raw}
    decoded = raw
    for _ in range(3):  # double encoding too
        once = unquote(decoded)
        if once == decoded:
            break
        decoded = once
    decoded = "/" + decoded.replace("\\", "/").lstrip("/")
    norm = posixpath.normpath(re.sub(r"/+", "/", decoded))
    if decoded.endswith("/") and norm != "/":
        norm += "/"
    forms.add(norm)
    return forms


def dot_segments(path: str) -> bool:
    """Whether the path (query dropped) holds a `.` or `..` segment, also percent-encoded (once or more) or
    separated by a backslash, or followed by `;` parameters (`..;`, which servlet containers read as `..`): the
    upstream may resolve it (RFC 3986 section 5.2.4) to an endpoint outside the API paths the rules matched,
    e.g. `/v1/messages/../files`."""
    path = path_of(path)
    for _ in range(4):  # %252e -> %2e -> .: undo nested encodings, boundedly
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    return any(seg.split(";", 1)[0] in (".", "..") for seg in path.replace("\\", "/").split("/"))
