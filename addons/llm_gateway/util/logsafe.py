"""One request can only ever make one log line: values from traffic, escaped before they are shown.

A request body's `"model": "x\\n[12:00:00.000] egress allowed: CONNECT evil.example:443"` printed as it is
would add a second line that reads exactly like a real gateway decision. Everything that comes from a
request or an answer (model, session, client name, user agent, host, path, error message) goes through
`clean` before it reaches a log line, the mitmweb comment or a message a person reads.
"""

from __future__ import annotations

import unicodedata

MAX_SHOWN = 300  # characters of one value shown in a line; the record keeps the value itself

# Characters a terminal or log viewer may take as a line break or a control sequence, beyond the
# C0/C1 controls: Unicode line/paragraph separators, and the bidirectional overrides that make a line
# read in another order than it is written (Trojan Source, CVE-2021-42574).
_EXTRA = frozenset("\u2028\u2029\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _shown(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    if ch in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch]
    if ch in _EXTRA or unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return ch


def clean(value: object, limit: int = MAX_SHOWN) -> str:
    """`value` as text with no line break and no control character left: they are written as `\\n`,
    `\\x1b`, `\\u2028`…, and a backslash as `\\\\`, so the escaped form cannot be mistaken for the raw one.
    Longer than `limit` characters: cut, with `…` appended. Never raises."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    if cut:
        text = text[:limit]
    if text.isprintable() and "\\" not in text:  # the common case: nothing to do
        return text + ("…" if cut else "")
    return "".join(map(_shown, text)) + ("…" if cut else "")


def clean_or_dash(value: object | None, limit: int = MAX_SHOWN) -> str:
    """`clean(value)`, or `-` for None and the empty string (a missing value in a human line)."""
    return "-" if value is None or value == "" else clean(value, limit)
