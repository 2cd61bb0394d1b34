"""The package's layers, as `ls addons/llm_gateway` shows them, kept by tests rather than by review.

- import-linter runs the contracts in pyproject.toml ([tool.importlinter]): the layer order, no addon importing
  another, command lines imported by nothing, only mitm/ touching mitmproxy's layers, and protocol, records and
  util free of mitmproxy (the usage report runs wherever the log is copied);
- no import cycle anywhere in the package (grimp, the graph import-linter is built on);
- the private mitmproxy names the gateway relies on appear only under mitm/ (an `ast` scan: attributes are not
  imports, so import-linter cannot see them), and `flow.__dict__` only in pipeline/exchange.py.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "addons" / "llm_gateway"
LAYERS = {"addons", "mitm", "pipeline", "policy", "records", "protocol", "util", "tools"}

# Private or undocumented mitmproxy names (attributes, module names): the fence's business only.
PRIVATE = {
    "_paused", "_handle_event", "_servers", "_by_name", "_http2", "deferred", "request_body_buf",
    "response_body_buf", "transports", "inject_event", "child_layer", "assemble_request_head",
    "format_h2_request_headers", "server_state", "servers", "connections", "proxyserver",
}


def names_in(tree: ast.AST):
    """(node, name) for every attribute, `getattr`-style string and imported name in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield node, node.attr
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            yield node, node.value
        elif isinstance(node, ast.ImportFrom) and node.module:
            for name in [*node.module.split("."), *(alias.name for alias in node.names)]:
                yield node, name


def modules(under: Path = PACKAGE):
    for path in sorted(under.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def test_the_listing_shows_the_layers():
    entries = {p.name for p in PACKAGE.iterdir() if not p.name.startswith((".", "__pycache__"))}
    assert entries == {"__init__.py", "app.py"} | LAYERS


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT / "addons", capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "addons")},
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and "BROKEN" not in done.stdout


def test_no_import_cycles():
    graph = grimp.build_graph("llm_gateway", cache_dir=None)
    found = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if graph.chain_exists(imported, module):
                found.append((module, imported, graph.find_shortest_chain(imported, module)))
    assert not found, found[:5]


def test_private_mitmproxy_names_only_in_the_fence():
    outside = []
    for path, tree in modules():
        if path.parent.name == "mitm":
            continue
        for node, name in names_in(tree):
            if name in PRIVATE:
                outside.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name}")
            if name == "__dict__" and path.relative_to(PACKAGE).as_posix() != "pipeline/exchange.py":
                outside.append(f"{path.relative_to(PACKAGE)}:{node.lineno} __dict__")
    assert not outside, outside


@pytest.mark.parametrize("name", sorted(PRIVATE))
def test_each_private_name_is_used_by_the_fence(name):
    """Every name the scan guards is really used under mitm/ (a name that left the fence is dead here)."""
    assert name in {found for _, tree in modules(PACKAGE / "mitm") for _, found in names_in(tree)}


def test_the_scan_sees_a_private_name(tmp_path):
    """The fence scan itself can fail: a module outside mitm/ that reads `_paused` is found."""
    for code in ("def f(stream):\n    return stream._paused\n", "x = getattr(registry, '_by_name', None)\n",
                 "from mitmproxy.proxy.layers.http import _http2\n"):
        assert any(name in PRIVATE for _, name in names_in(ast.parse(code))), code


# Each Exchange field and the only modules (under addons/llm_gateway) that may assign it; fields given to the
# constructor (rules, api, mode, method, host, path, started, user_agent, provider) are built by addons/routing.py.
# Lists are appended to and taps added only through Exchange's own methods (note, add_tap).
ANSWER = {"pipeline/answer.py", "pipeline/streamreader.py", "pipeline/eventstream.py"}
FIELD_OWNERS = {
    "path": {"addons/credentials.py"},  # the query string's tokens masked
    "upstream": {"addons/routing.py"},
    "route": {"addons/routing.py"},
    # failover puts them back to the API's own before routing's per-upstream step aims at the next upstream
    **dict.fromkeys(("provider", "translated"), {"addons/routing.py", "addons/failover.py"}),
    "failed_upstreams": {"addons/failover.py"},
    "body": {"addons/bodies.py", "addons/streams.py", "pipeline/exchange.py"},  # parsed once, its stream flag
    # forced (streams), let go through `release()`
    "model_requested": {"addons/bodies.py"},
    **dict.fromkeys(("client", "session", "agent_id", "parent_agent_id", "user_agent", "stream_preference"),
                    {"addons/clients.py"}),
    "principal": {"addons/credentials.py"},
    **dict.fromkeys(("quota_limits", "quota_refused"), {"addons/quotas/__init__.py"}),
    **dict.fromkeys(("stream_requested", "stream_upstream"), {"addons/streams.py"}),
    "response_started": {"addons/answer.py"},
    **dict.fromkeys(("status", "request_id", "error_type", "unwrapped", "unwrapped_from", "converted", "complete",
                     "usage", "model_answered", "response_id", "stop_reason"), ANSWER),
    "message": ANSWER | {"pipeline/exchange.py"},
    **dict.fromkeys(("reason", "priced", "on_flow_gone", "notes", "sse_taps", "tap_stages", "cache_break",
                     "cache_break_reason", "cache_break_detail", "cache_break_tokens_lost", "cache_break_cost_usd"),
                    {"pipeline/exchange.py"}),
    "recorded": {"addons/usage.py"},
    "metered": {"addons/metrics.py"},
    "span": {"addons/otel.py"},
}
MUTATORS = {"append", "extend", "insert", "clear", "remove", "pop", "sort", "reverse"}


def exchange_writes(tree: ast.AST, in_exchange_module: bool):
    """(field, line) for each assignment to an Exchange field, and each in-place change of its lists, in `tree`.
    An exchange is what the code calls `ex`, `self.ex` or `exchange` (or `self` in pipeline/exchange.py)."""

    def is_exchange(node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in ("ex", "exchange") or (in_exchange_module and node.id == "self")
        return isinstance(node, ast.Attribute) and node.attr == "ex"

    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for part in ast.walk(target):
                if isinstance(part, ast.Attribute) and is_exchange(part.value):
                    yield part.attr, node.lineno
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
            owner = node.func.value
            if isinstance(owner, ast.Attribute) and owner.attr in ("notes", "sse_taps", "tap_stages") \
                    and is_exchange(owner.value):
                yield owner.attr, node.lineno


def test_exchange_field_owners():
    from llm_gateway.pipeline.exchange import Exchange

    fields = set(Exchange.__dataclass_fields__)
    assert set(FIELD_OWNERS) <= fields, set(FIELD_OWNERS) - fields
    wrong = []
    for path, tree in modules():
        where = path.relative_to(PACKAGE).as_posix()
        for field, line in exchange_writes(tree, where == "pipeline/exchange.py"):
            if field in fields and where not in FIELD_OWNERS.get(field, set()):
                wrong.append(f"{where}:{line} writes {field}")
    assert not wrong, wrong


def test_the_owner_scan_sees_a_write():
    tree = ast.parse("def f(ex, self):\n    ex.reason = 'x'\n    self.ex.notes.append('y')\n")
    assert sorted(exchange_writes(tree, False)) == [("notes", 3), ("reason", 2)]


def test_taps_run_in_their_declared_stages():
    """The scrub sees each event first, then the reader, then the copy, whichever addon added its tap first."""
    from llm_gateway.pipeline import exchange

    ex = exchange.Exchange(None, "anthropic", "reverse", "POST", "gw", "/v1/messages")
    for tap, stage in (("copy", exchange.COPY), ("reader", exchange.READ), ("scrub", exchange.SCRUB),
                       ("second reader", exchange.READ)):
        ex.add_tap(tap, stage)
    assert ex.sse_taps == ["scrub", "reader", "second reader", "copy"]


# The places that catch every exception, each a boundary where a failure must not travel further, and why.
# Anywhere else an unexpected exception is a bug that reaches app.Dispatcher, which logs it as mitmproxy logs
# an addon error and runs the next concern. A new broad `except` is added here with its reason, or narrowed.
BOUNDARIES = {
    "app.py": {
        "_chain.dispatch": "one concern's failure must not stop the next (mitmproxy's safecall, per concern)",
        "_chain.dispatch_async": "the same, for async hooks",
        "Dispatcher.load": "the same, for `load`",
    },
    "pipeline/relay.py": {
        "SSERelay.__call__": "mitmproxy calls the relay per chunk: an exception would cut the client's stream",
        "SSERelay._relay": "a chunk the decoder cannot read is forwarded as received",
        "SSERelay._forward": "one tap's failure must not stop the stream or the other taps",
        "SSERelay._end": "the same, at the end of the stream",
    },
    "addons/cloudauth.py": {
        "CloudCredentials._fetch_and_apply": "no credentials or a failed refresh (botocore, google-auth raise many kinds): "
                                    "a native error to the client, the reason to the log",
    },
    "pipeline/eventstream.py": {
        "EventStreamReader.__call__": "mitmproxy calls the reader per chunk: an exception would cut the client's stream",
        "EventStreamReader._translate": "the same, while the frames become Anthropic SSE",
        "EventStreamReader._whole_frames": "the same, while a gateway-signed stream's frames are masked",
        "EventStreamReader._tap": "one tap's failure must not stop the stream or the other taps",
        "EventStreamReader._end": "the same, at the end of the stream",
    },
    "mitm/layers.py": {
        "end_early": "mitmproxy internals changed under us: close the upstream instead",
        "send_to_client": "mitmproxy internals changed under us: no ping, the stream goes on",
        "answer_instead_of_error_page": "mitmproxy internals changed under us: its own error page goes out",
    },
    "addons/translate.py": {"ProviderTranslation._ping": "a keep-alive timer must never cost the exchange"},
    "mitm/server.py": {"close_listeners": "one listener that will not close must not keep the others open"},
    "addons/egress.py": {
        "EgressPolicy.http_connect": "fail closed: a bug refuses the tunnel, never lets it through",
        "EgressPolicy.tls_clienthello": "fail closed",
        "EgressPolicy.requestheaders": "fail closed",
    },
    "addons/endpoints.py": {
        "Endpoints._serve": "the metrics port's own server task: a failure is logged, never left unread",
        "Endpoints._handle": "one connection to the metrics port: logged, and the connection closed",
    },
    "addons/metrics.py": {"Metrics._exchange": "metrics must never cost an exchange"},
    "addons/webview.py": {"WebView._finish": "viewing aids must never disturb the traffic"},
    "addons/recordlog.py": {"RecordLog.write": "one record observer's failure must not lose the record",
                            "RecordLog.done": "one held-back flush failing must not lose the records already queued"},
    "records/writer.py": {"RecordWriter.flush": "work deferred to a flush (a log line) must not lose records"},
    "addons/timeouts.py": {
        "Timeouts._first_byte_expired": "a timer callback: nothing above it would log the failure",
        "Timeouts._watch_body": "the same",
    },
    "addons/drain.py": {"Drain._drain": "a background task: the process must still exit"},
    "addons/rulefile.py": {"RuleFile._watch": "the rule file watcher must outlive anything a file can do to it"},
    "addons/credentials.py": {"KeyCustody._watch": "the key file watcher, likewise"},
    "addons/quotas/store.py": {
        "RedisStore.admit": "redis-py raises connection, timeout, response and script errors alike: one StoreError, "
                            "and on_store_error decides",
        "RedisStore.settle": "the same, for a settlement",
        "RedisStore.level": "the same, for a read",
        "RedisStore.close": "closing a client whose server is gone must not stop a reload or the exit",
    },
    "addons/backlog.py": {"ListenBacklog.apply": "mitmproxy internals moved: its own listen queue stays"},
    "addons/startup.py": {"StartupReport.running": "a banner must never stop the gateway"},
    "addons/warmup.py": {"Warmup.running": "prices then load on first use; never a reason not to start"},
    "policy/rules.py": {"_Reader.scalar": "PyYAML's constructors raise anything on `!!int abc` and the like"},
    "policy/clients.py": {
        "detect": "client detection reads hostile headers and bodies and never raises",
        "session_id": "the same",
        "agent_ids": "the same",
    },
    "protocol/envelopes.py": {
        "unwrap_response": "hostile error bodies: never raise, fall back to an error built from the status",
        "unwrap_error_event": "hostile stream error events, likewise",
        "header_fixes": "hostile answer headers, likewise",
    },
}


def broad_handlers(tree: ast.AST):
    """(enclosing Class.function, line) of every `except:`, `except Exception` and `except BaseException`."""

    def visit(node, owner):
        for child in ast.iter_child_nodes(node):
            inner = owner
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{owner}.{child.name}" if owner else child.name
            if isinstance(child, ast.ExceptHandler) and (
                child.type is None or isinstance(child.type, ast.Name) and child.type.id in ("Exception", "BaseException")
            ):
                yield owner, child.lineno
            yield from visit(child, inner)

    yield from visit(tree, "")


def test_broad_excepts_only_at_named_boundaries():
    found, unnamed = set(), []
    for path, tree in modules():
        where = path.relative_to(PACKAGE).as_posix()
        for owner, line in broad_handlers(tree):
            found.add((where, owner))
            if owner not in BOUNDARIES.get(where, {}):
                unnamed.append(f"{where}:{line} in {owner or 'the module'}")
    assert not unnamed, unnamed
    named = {(where, owner) for where, owners in BOUNDARIES.items() for owner in owners}
    assert named == found, f"named but gone: {named - found}"


def test_the_boundary_scan_sees_a_broad_except():
    tree = ast.parse("class A:\n    def f(self):\n        try:\n            pass\n        except Exception:\n            pass\n")
    assert list(broad_handlers(tree)) == [("A.f", 5)]


def test_every_module_is_in_the_layout_page():
    """docs/development.md "Layout" names every module of the package, so the folder listing and its page agree."""
    page = (ROOT / "docs" / "development.md").read_text()
    layout = page.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [
        str(p.relative_to(PACKAGE))
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "__init__.py" and not re.search(rf"^\s+{re.escape(p.name)}\s", layout, re.M)
    ]
    assert not missing, f"docs/development.md Layout does not list: {', '.join(missing)}"
