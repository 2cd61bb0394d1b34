"""mitmproxy's contentview registry: taking a view off it again.

mitmproxy 12 has `contentviews.add` but no public way to remove a view; the registry's private `_by_name`
dict holds it (tests/unit/mitm/test_contract.py asserts it exists).
"""

from __future__ import annotations

from typing import Any

from mitmproxy import contentviews


def unregister_view(view: Any) -> None:
    """Remove `view` from mitmproxy's contentviews, only if the name still stands for this very view."""
    key = view.name.lower()
    by_name = getattr(contentviews.registry, "_by_name", None)
    if isinstance(by_name, dict) and by_name.get(key) is view:
        del by_name[key]
