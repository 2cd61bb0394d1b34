"""Put a secret header value into a request at the last moment: while mitmproxy serialises it for the upstream.

mitmweb shows flows as they are stored, and sends them to the browser after every hook (mitmproxy triggers the
`update` hook after each flow hook, and the view broadcasts the flow then); `-w`, the dumper and mitmweb's
export read the stored flow too. mitmproxy has no hook between the `request` hook and the moment it writes
the request to the upstream, and no way to mask a header in what it shows. So the stored request never holds
the secret: it holds a placeholder (`hold` makes one, unguessable and bound to the upstream's host and port),
and the two functions mitmproxy's HTTP/1 and HTTP/2 client layers call to turn a request into header bytes are
wrapped so that they serialise the real value instead, synchronously, and put the placeholder back before
they return. Nothing can observe the flow in between (mitmproxy serialises with no `await`).

The wrapping is installed once per process (`install`); it costs a dictionary check per upstream request and
does nothing while no placeholder is held. A placeholder that reaches a layer that is not wrapped (HTTP/3 to
the upstream, which the gateway's listeners never lead to) goes out as the placeholder: the upstream refuses
it, the secret stays home. `release` forgets placeholders once their request has been sent.
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from typing import Any

from mitmproxy import http

logger = logging.getLogger("llm_gateway.credentials")

MAX_HELD = 4096  # placeholders held at once (one or two per API exchange in flight); the oldest go first
_held: OrderedDict[bytes, tuple[bytes, str, int]] = OrderedDict()  # placeholder -> (real value, host, port)
_installed = False


def hold(real: str, label: str, host: str, port: int) -> str:
    """A placeholder to store in a header instead of `real`; the wire carries `real` when the request goes
    to `host`:`port`. `label` (no secret: e.g. "upstream key main") is what people see in mitmweb."""
    placeholder = f"[{label}; masked by the gateway; ref {secrets.token_hex(12)}]"
    _held[placeholder.encode()] = (real.encode(), host.lower(), port)
    while len(_held) > MAX_HELD:
        _held.popitem(last=False)
        logger.warning("too many credential placeholders held at once; the oldest was dropped")
    return placeholder


def release(placeholders: list[str]) -> None:
    for placeholder in placeholders:
        _held.pop(placeholder.encode(), None)


def held() -> int:
    return len(_held)


def sent_secrets(request: http.Request) -> list[str]:
    """The real values this request's placeholders stood for on the wire (still held: before `release`): the
    secrets an upstream could echo back in its answer (addons/credentials.py masks them there)."""
    if not _held:
        return []
    return [found[0].decode() for _, value in request.data.headers.fields if (found := _held.get(value)) is not None]


def real_headers(request: http.Request) -> http.Headers | None:
    """The request's headers with every held placeholder bound to its host replaced by the real value, or
    None when there is nothing to replace (the usual case: no copy is made)."""
    if not _held:
        return None
    fields = request.data.headers.fields
    if not any(value in _held for _, value in fields):
        return None
    host, port = request.host.lower(), request.port
    out = []
    for name, value in fields:
        found = _held.get(value)
        if found is not None:
            if (found[1], found[2]) == (host, port):
                value = found[0]
            else:  # never send a secret anywhere but where it was meant to go
                logger.warning(f"a credential placeholder was bound for another upstream than {host}:{port}; not replaced")
        out.append((name, value))
    return http.Headers(out)


class _Swapped:
    """`with _Swapped(request):` the request holds the real values, and its own headers again afterwards."""

    def __init__(self, request: http.Request) -> None:
        self.request = request
        self.saved: http.Headers | None = None

    def __enter__(self) -> None:
        real = real_headers(self.request)
        if real is not None:
            self.saved = self.request.data.headers
            self.request.data.headers = real

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            self.request.data.headers = self.saved


def install() -> bool:
    """Wrap mitmproxy's request serialisers (once per process). False if mitmproxy no longer has them, in
    which case the caller must not forward requests that need a secret."""
    global _installed
    if _installed:
        return True
    try:
        from mitmproxy.net.http import http1
        from mitmproxy.proxy.layers.http import _http2

        h1_original = http1.assemble_request_head
        h2_original = _http2.format_h2_request_headers
    except (ImportError, AttributeError) as e:
        logger.error(f"cannot find mitmproxy's request serialisers ({e}): upstream credentials cannot be placed")
        return False

    def assemble_request_head(request):
        with _Swapped(request):
            return h1_original(request)

    def format_h2_request_headers(context, event):
        # A generator (it may yield log commands): run it to its end while swapped, then hand on what it yielded.
        yielded = []
        with _Swapped(event.request):
            gen = h2_original(context, event)
            try:
                while True:
                    yielded.append(next(gen))
            except StopIteration as stop:
                result = stop.value
        yield from yielded
        return result

    http1.assemble_request_head = assemble_request_head
    _http2.format_h2_request_headers = format_h2_request_headers
    _installed = True
    return True
