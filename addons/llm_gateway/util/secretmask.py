"""The spellings of a secret an answer or a log line can carry, masked: one place for key custody's scrubber
(addons/credentials.py), the log filter every log handler runs, and the parts that place secrets on the wire
(mitm/serializers.py, addons/cloudauth.py), which tell the filter what to mask before anything can log it.

What is recognised: a secret as it is, JSON-escaped, as Python's repr writes bytes (a traceback quoting upstream
bytes), as log lines escape values (logsafe.clean), and the credential after an auth scheme (`Bearer <token>`).
A JSON text (a buffered body, an SSE event's data line) that spells it with `\\u` escapes of ASCII letters (which
a JSON reader undoes, so the client and the gateway's own reader would see it) is read and written again, masked
(`scrub_json`). What is not recognised: a secret the upstream transformed (base64, reversed, percent-encoded, cut,
split across JSON strings or data lines); nothing can recognise every transformation of a string.
"""

from __future__ import annotations

import json
import logging
import re

from llm_gateway.util.logsafe import clean


def mask(label: str) -> str:
    return f"[{label}; masked by the gateway]"


MASKED_KEY = mask("upstream key").encode()
MIN_SECRET = 8  # characters: a shorter value is no key, and masking it would mask ordinary words


def key_forms(key: str) -> tuple[bytes, ...]:
    """The spellings an answer or a log line can carry the key in, longest first: as it is, JSON-escaped (a
    `"` or `\\` in it), as Python's repr writes bytes (a traceback quoting upstream bytes), and as log lines
    escape values (util/logsafe.clean). A key is visible ASCII (policy/credentials.KEY_CHARS), so it has no other
    plain spelling; a key the upstream transformed (base64, reversed, `\\u`-escaped, cut) is not recognised."""
    raw = key.encode()
    forms = {raw, json.dumps(key)[1:-1].encode(), repr(raw)[2:-1].encode(), clean(key, len(key)).encode()}
    return tuple(sorted(forms, key=len, reverse=True))


def secret_forms(secrets: list[str] | tuple[str, ...]) -> tuple[bytes, ...]:
    """The spellings of every secret a request carried upstream, longest first: each header value whole, and the
    credential after its scheme (`Bearer <token>`, a SigV4 `Authorization`'s parameters)."""
    forms: set[bytes] = set()
    for value in secrets:
        scheme, _, credential = value.partition(" ")
        credential = credential.strip()
        for secret in (value, credential) if scheme.replace("-", "").isalnum() else (value,):
            if len(secret) >= MIN_SECRET:
                forms.update(key_forms(secret))
    return tuple(sorted(forms, key=len, reverse=True))


def scrub(data: bytes, forms: tuple[bytes, ...]) -> bytes:
    """`data` with every spelling of the key masked."""
    for form in forms:
        if form in data:
            data = data.replace(form, MASKED_KEY)
    return data


def scrub_text(text: str, forms: tuple[bytes, ...]) -> str:
    """`text` with every spelling of a secret masked (a message that quotes upstream bytes)."""
    for form in forms:
        shown = form.decode()
        if shown in text:
            text = text.replace(shown, MASKED_KEY.decode())
    return text


# A `\u` escape of a printable ASCII character: no JSON encoder needs one (Go's escapes `<`, `>`, `&` so), and
# only such escapes can spell a secret of visible ASCII in a form the plain search misses.
_ASCII_ESCAPE = re.compile(rb"\\u00([2-7][0-9a-fA-F])")
ESCAPE_NEEDLE = b"\\u00"  # what a quick scan looks for before `_ASCII_ESCAPE` (pipeline/relay.py's quick path)


def scrub_json(data: bytes, forms: tuple[bytes, ...]) -> bytes:
    """`data` (a JSON text) with a secret spelt in `\\u` escapes masked: read, masked in every string, written
    again (compact, UTF-8), only when it holds such escapes and a string holds a secret; else `data` itself."""
    if not forms or not _ASCII_ESCAPE.search(data):
        return data
    # A cheap look first (the escapes undone in the bytes, in C but for one call per escape): only a text that
    # does spell a secret is read and walked, so escapes alone (Go's `\u003c` in a 16 MiB answer) cost no parse.
    unescaped = _ASCII_ESCAPE.sub(lambda m: bytes([int(m[1], 16)]), data)
    if not any(form in unescaped for form in forms):
        return data
    texts = [form.decode() for form in forms]
    masked = MASKED_KEY.decode()
    found = False

    def walk(value):
        nonlocal found
        if isinstance(value, str):
            for text in texts:
                if text in value:
                    found, value = True, value.replace(text, masked)
            return value
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {walk(k): walk(v) for k, v in value.items()}
        return value

    try:
        out = walk(json.loads(data))
    except (ValueError, RecursionError):  # not JSON, or nested past Python's stack: left as it is
        return data
    return json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode() if found else data


def scrub_event(raw: bytes, forms: tuple[bytes, ...]) -> bytes:
    """One SSE event's bytes with every spelling of a secret masked, `\\u`-escaped ones in its `data:` lines too."""
    raw = scrub(raw, forms)
    if not _ASCII_ESCAPE.search(raw):
        return raw
    lines = raw.split(b"\n")
    changed = False
    for i, line in enumerate(lines):
        if line.startswith(b"data:"):
            payload = line[5:].rstrip(b"\r")
            payload = payload[1:] if payload.startswith(b" ") else payload
            masked = scrub_json(payload, forms)
            if masked is not payload:
                lines[i] = b"data: " + masked + (b"\r" if line.endswith(b"\r") else b"")
                changed = True
    return b"\n".join(lines) if changed else raw


class KeyLogFilter(logging.Filter):
    """Masks the upstream keys the gateway holds in every log record that passes a log handler: the gateway's
    own lines, and mitmproxy's (a crash traceback quoting the bytes an upstream sent, a flow line with an
    echoed reason phrase). The check is a substring search per key spelling; a record is rewritten only
    when it holds one (its traceback then written into its message)."""

    RECENT = 256  # secrets sent lately (cloud tokens, pass-through credentials) kept besides the store's keys

    def __init__(self) -> None:
        super().__init__()
        self.forms: tuple[str, ...] = ()
        self.keys: tuple[str, ...] = ()
        self.recent: dict[str, None] = {}  # insertion-ordered: the oldest goes first

    def use(self, keys: list[str]) -> None:
        """The upstream keys the store holds (every one ever read: a rotated key stays masked)."""
        self.keys = tuple(keys)
        self._update()

    def remember(self, secrets: list[str]) -> None:
        """Secrets a request carried upstream: masked in the log lines that follow too."""
        new = [s for s in secrets if s and s not in self.recent and s not in self.keys]
        if not new:
            return
        for secret in new:
            self.recent[secret] = None
        while len(self.recent) > self.RECENT:
            del self.recent[next(iter(self.recent))]
        self._update()

    def _update(self) -> None:
        self.forms = tuple(form.decode() for form in secret_forms([*self.keys, *self.recent]))

    def filter(self, record: logging.LogRecord) -> bool:
        forms = self.forms
        if not forms:
            return True
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        trace = record.exc_text or ""
        if any(form in text or form in trace for form in forms):
            masked = MASKED_KEY.decode()
            for form in forms:
                text, trace = text.replace(form, masked), trace.replace(form, masked)
            # The traceback goes into the message, masked: mitmproxy's formatter formats `exc_info` itself.
            record.msg, record.args = f"{text}\n{trace}" if trace else text, None
            record.exc_info = record.exc_text = None
        return True


# One filter for the process (as addons/gatewaylog.CHATTER): a handler keeps a filter once however often it is added.
LOG_FILTER = KeyLogFilter()
