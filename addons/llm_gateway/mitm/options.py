"""Options mitmproxy holds back: `--set` values no addon has declared yet (`OptManager.deferred`).

mitmproxy keeps them in `ctx.options.deferred` (name -> an unparsed value whose `val` lists every value given)
until an addon declares the option, and says nothing about a typo or an option given twice. `deferred` is an
attribute of mitmproxy's OptManager without a public accessor; tests/unit/mitm/test_contract.py asserts it.
"""

from __future__ import annotations

from mitmproxy import ctx


def repeated_options(prefix: str) -> dict[str, list]:
    """Options starting with `prefix` given more than once with --set: name -> the values given."""
    found = {}
    for name, value in getattr(ctx.options, "deferred", {}).items():
        values = list(getattr(value, "val", ()) or ())
        if name.startswith(prefix) and len(values) > 1:
            found[name] = values
    return found


def unknown_options(prefix: str) -> list[str]:
    """Options starting with `prefix` set with --set that no addon declared (still deferred once all loaded)."""
    return [name for name in getattr(ctx.options, "deferred", {}) if name.startswith(prefix)]
