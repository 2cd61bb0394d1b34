"""Matchers compiled once per rule load (globs.GlobSet): the same answers as one glob at a time, in
routing, pricing and client detection."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEFAULT_RULES
from llm_gateway.policy import clients
from llm_gateway.protocol import headers as headers_mod
from llm_gateway.policy import pricing
from llm_gateway.policy import rules
from llm_gateway.util.globs import Glob, GlobSet, glob_set

DEFAULT = rules.load(DEFAULT_RULES)


def test_first_is_the_first_glob_in_order_that_matches():
    s = GlobSet([Glob("claude-*"), Glob("*sonnet*"), Glob("claude-sonnet-4-5*")])
    assert s.first("Claude-Sonnet-4-5-2025") == 0 and s.first("my-sonnet") == 1 and s.first("gpt") is None
    assert s.first(None) is None and GlobSet([]).first("x") is None and not GlobSet([]).match("x")
    assert s.match("CLAUDE-x") and not s.match("claud")


def test_compiled_once_per_tuple_of_rules():
    globs = (Glob("a*"), Glob("b?"))
    assert glob_set(globs) is glob_set(globs)
    assert glob_set((Glob("a*"), Glob("b?"))) is not glob_set(globs)  # another rule load: compiled anew


PATTERNS = st.sampled_from(["*", "a*", "*b", "a?c", "[ab]*", "*.example.com", "x*y*z", "A*", "?", "[!a]*"])
TEXTS = st.text(alphabet="abcxyzAB.-/ ", max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(PATTERNS, min_size=1, max_size=6), TEXTS)
def test_globset_agrees_with_the_globs_one_by_one(patterns, text):
    globs = [Glob(p) for p in patterns]
    expected = next((i for i, g in enumerate(globs) if g.match(text)), None)
    assert GlobSet(globs).first(text) == expected


def test_price_lookup_agrees_with_the_table_in_order():
    table = DEFAULT.pricing
    for model in ("claude-sonnet-4-5-20250929", "claude-opus-4-1", "claude-haiku-4-5", "claude-3-haiku-x", "gpt-4", ""):
        expected = next((p for p in table if p.model.match(model)), None) if model else None
        assert pricing.price_for(table, model) is expected, model


HEADER_NAMES = ["x-claude-code-session-id", "x-opencode-session", "goose-session-id", "x-litellm-key",
                "x-stainless-lang", "x-stainless-async", "originator", "x-app", "anthropic-beta", "accept", "x-other"]
VALUES = ["python", "js", "async:true", "kilo-code", "roo-code", "cli", "x-claude-code-20250219", "other"]
AGENTS = [None, "claude-cli/2.1.3 (external, cli)", "factory-cli/1.0", "opencode/0.3", "litellm/1.106",
          "Anthropic/Python 0.71", "AsyncAnthropic/Python 0.71", "Anthropic/JS 0.6", "zed/0.2", "curl/8", "roocode/3"]
BODIES = [None, {"system": "You are Cline, a coder"}, {"system": [{"type": "text", "text": "You are Roo, ok"}]},
          {"metadata": {"user_id": '{"session_id":"abc"}'}}, {"metadata": {"user_id": "user_1_account_2_session_3"}}]


def test_detection_with_compiled_matchers_agrees_with_each_signature_in_order():
    rng = random.Random(18)
    sigs = DEFAULT.clients
    for _ in range(3000):
        headers = {name: rng.choice(VALUES) for name in rng.sample(HEADER_NAMES, rng.randint(0, 5))}
        ua = rng.choice(AGENTS)
        if ua:
            headers["user-agent"] = ua
        body = rng.choice(BODIES)
        h = headers_mod.normalize(headers)
        expected = next(((s, how) for s in sigs if (how := clients._match(s, h, h.get("user-agent"), body))), None)
        assert clients._first_match(sigs, h, h.get("user-agent"), body) == expected, (headers, body)
        assert clients._first_match(list(sigs), h, h.get("user-agent"), body) == expected

