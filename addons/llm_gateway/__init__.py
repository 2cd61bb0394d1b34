"""The LLM interception gateway: mitmproxy addons between AI coding agents and the Anthropic Messages API.

The folders are the layers, each importing only the ones below it (pyproject.toml's import-linter contracts,
run by tests/unit/test_layout.py):

    app.py     the composition point: every addon, in hook order, behind one mitmproxy addon
    addons/    one mitmproxy addon per concern (options, hooks)
    pipeline/  one API exchange: its state, the stream relay, the one answer pipeline, its record
    mitm/      the only code that touches mitmproxy internals (a mitmproxy upgrade breaks here or nowhere)
    policy/    rules.yaml as data and the decisions made on it
    records/   what a record means, totals, reading and writing the record log (no mitmproxy)
    protocol/  what bytes mean: the Anthropic wire format, SSE, JSON, hosts (no mitmproxy, no I/O)
    util/      leaf helpers
    tools/     command lines (scripts/usage_report, make-ca, mint-token; llm-gateway-dump)
"""

import importlib.abc
import importlib.util
import sys

# `python -m llm_gateway.report` (and `.ca`, `.credentials`) name the command lines as they were before they moved
# to tools/; they stay, as documented entry points. Found only when nothing else has the name.
_COMMANDS = {
    "llm_gateway.report": "llm_gateway.tools.report",
    "llm_gateway.ca": "llm_gateway.tools.ca",
    "llm_gateway.credentials": "llm_gateway.tools.mint_token",
}


class _CommandNames(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        real = _COMMANDS.get(name)
        if real is None:
            return None
        return importlib.util.spec_from_file_location(name, importlib.util.find_spec(real).origin)


if not any(isinstance(finder, _CommandNames) for finder in sys.meta_path):
    sys.meta_path.append(_CommandNames())
