"""cachewatch.py: prompt fingerprints, the reason for each kind of cache break, and the bounded store.

The usage numbers come from the fake upstream's emulated cache (`CacheAccounting`), never written by hand where
a break is concerned: the store must find the break the accounting produces, and name its cause."""

from __future__ import annotations

import copy
import json

import pytest

from fakes.upstream import CacheAccounting
from llm_gateway.policy import cachewatch
from llm_gateway.policy.cachewatch import CacheWatch, explain, fingerprint, min_cacheable

TTL = {"5m": 300.0, "1h": 3600.0}
SECRET = "the-prompt-text-that-must-never-be-kept"


def body(**changes) -> dict:
    b = {
        "model": "claude-sonnet-4-5",
        "tools": [{"name": n, "description": f"{n} " * 200, "input_schema": {"type": "object"}}
                  for n in ("read", "write", "mcp__x__search", "bash")],
        "system": [{"type": "text", "text": SECRET + " intro " * 900},
                   {"type": "text", "text": "rules " * 500, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello " * 50}]},
                     {"role": "assistant", "content": "Hi"},
                     {"role": "user", "content": [{"type": "text", "text": "more", "cache_control": {"type": "ephemeral"}}]}],
    }
    b.update(changes)
    return b


class Session:
    """One session: requests go through the emulated cache, then through the watch, as in the gateway."""

    def __init__(self, watch: CacheWatch | None = None, name: str = "s", ttl_5m: float = 300.0) -> None:
        self.watch = watch or CacheWatch()
        self.cache = CacheAccounting(ttl_5m=ttl_5m)
        self.name = name
        self.ttl = {"5m": ttl_5m, "1h": 3600.0}

    def send(self, request: dict, at: float) -> tuple[dict, cachewatch.Break | None]:
        usage = self.cache.usage(request, now=at)
        return usage, self.watch.observe(self.name, usage, request, at, self.ttl)


def explained(change, *, wait: float = 1.0, ttl_5m: float = 300.0) -> cachewatch.Break:
    s = Session(ttl_5m=ttl_5m)
    first = body()
    assert s.send(first, 0.0)[1] is None
    usage, found = s.send(first, 1.0)
    assert found is None and usage["cache_read_input_tokens"] > 0
    second = copy.deepcopy(first)
    second = change(second) or second
    usage, found = s.send(second, 1.0 + wait)
    assert found is not None, usage
    return found


def test_fingerprint_keeps_hashes_and_shape_never_text():
    fp = fingerprint(body())
    assert fp.tools == ("read", "write", "mcp__x__search", "bash") and fp.system == 2
    assert fp.messages == (("user", 1), ("assistant", 1), ("user", 1))
    assert fp.blocks == 4 + 2 + 3 and len(fp.digests) == fp.blocks * cachewatch.DIGEST
    assert fp.breakpoints == ((5, "5m"), (8, "5m"))
    assert SECRET not in repr(fp) and SECRET.encode() not in fp.digests
    assert fp.label(2) == "tool 'mcp__x__search'" and fp.label(5) == "system block 2"
    assert fp.label(7) == "message 2 (assistant) block 1"


def test_fingerprint_ignores_cache_control_and_the_string_form():
    a = body()
    b = copy.deepcopy(a)
    del b["system"][1]["cache_control"]
    b["messages"][1]["content"] = [{"type": "text", "text": "Hi"}]
    assert fingerprint(a).digests == fingerprint(b).digests
    assert fingerprint(b).breakpoints == ((8, "5m"),)
    one_hour = body(system=[{"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "1h"}}])
    assert fingerprint(one_hour).breakpoints[0] == (4, "1h")


@pytest.mark.parametrize("junk", [None, [], "text", {"model": "m"}, {"messages": "no"}, {"messages": [1, None]}])
def test_fingerprint_of_junk_never_raises(junk):
    fp = fingerprint(junk)
    assert fp is None or fp.messages == (("?", 0), ("?", 0))
    assert fingerprint({"messages": [{"role": "tool\n", "content": "x"}]}).messages == (("?", 1),)


@pytest.mark.parametrize("junk", [None, "x", {"model": {"a": 1}}, {"model": ["m"], "messages": []}, {"messages": {}}])
def test_the_store_takes_any_body(junk):
    w = CacheWatch()
    wrote = {"cache_read_input_tokens": 0, "cache_creation_input_tokens": 5000}
    assert w.observe("s", wrote, junk, 0) is None
    found = w.observe("s", {"cache_read_input_tokens": 0, "input_tokens": 5000}, junk, 1)
    assert found.reason == "unknown", found


def test_names_from_clients_are_cleaned_for_log_lines():
    fp = fingerprint({"model": "m\n\x1b[31m", "tools": [{"name": "a\nb" + "x" * 100}], "messages": []})
    assert fp.model == "m???31m" and fp.tools[0].startswith("a?bx") and len(fp.tools[0]) == 64


def test_edited_system_block():
    found = explained(lambda b: b["system"][1].update(text="rules changed"))
    assert (found.reason, found.detail) == ("system_changed", "system block 2 changed")


def test_reordered_and_removed_tools():
    def reorder(b):
        t = b["tools"]
        t[0], t[1], t[3] = t[3], t[0], t[1]

    assert (explained(reorder).reason, explained(reorder).detail) == ("tools_changed", "3 tools reordered")

    def remove_and_reorder(b):
        b["tools"] = [b["tools"][i] for i in (1, 0, 3)]

    found = explained(remove_and_reorder)
    assert found.detail == "tool 'mcp__x__search' removed; 2 tools reordered"

    def add_and_change(b):
        b["tools"][0]["description"] = "new"
        b["tools"].append({"name": "web", "input_schema": {}})

    assert explained(add_and_change).detail == "tool 'web' added; tool 'read' changed"


def test_edited_earlier_message_and_removed_message():
    found = explained(lambda b: b["messages"][0]["content"][0].update(text="edited"))
    assert (found.reason, found.detail) == ("messages_changed", "message 1 (user) block 1 changed")

    def rewind(b):
        b["messages"] = b["messages"][:1]
        b["messages"][0]["content"][0]["cache_control"] = {"type": "ephemeral"}

    found = explained(rewind)
    assert found.reason == "messages_changed" and "message 2 removed" in found.detail


def test_thinking_or_tool_choice_changes_lose_the_messages_cache_only():
    def think(b):
        b["thinking"] = {"type": "enabled", "budget_tokens": 2048}
        b["messages"][0]["content"][0]["cache_control"] = {"type": "ephemeral"}  # so that the fake caches there

    s = Session()
    first = body()
    first["messages"][0]["content"][0]["cache_control"] = {"type": "ephemeral"}
    s.send(first, 0.0)
    second = copy.deepcopy(first)
    think(second)
    usage, found = s.send(second, 1.0)
    assert found is not None and found.reason == "messages_changed" and "thinking or tool_choice" in found.detail
    assert usage["cache_read_input_tokens"] > 0  # tools and system still read: a drop, not to zero


def test_model_switch_ttl_and_breakpoint():
    found = explained(lambda b: b.update(model="claude-opus-4-1"))
    assert (found.reason, found.detail) == ("model_changed", "model claude-sonnet-4-5 -> claude-opus-4-1")
    found = explained(lambda b: None, wait=420, ttl_5m=300)
    assert (found.reason, found.detail) == ("ttl_expired", "7 min since the last request; TTL 5m")

    def move(b):
        del b["system"][1]["cache_control"]
        del b["messages"][2]["content"][0]["cache_control"]
        b["system"][0]["cache_control"] = {"type": "ephemeral"}

    found = explained(move)
    assert found.reason == "breakpoint_changed"
    assert found.detail == "breakpoint at message 3 (user) block 1 not in reach; breakpoints now: system block 1"


def test_first_position_decides():
    def system_and_message(b):
        b["system"][1]["text"] = "changed"
        b["messages"][0]["content"][0]["text"] = "changed"

    assert explained(system_and_message).reason == "system_changed"

    def tools_and_model(b):
        b["tools"].pop()
        b["model"] = "claude-sonnet-4"

    assert explained(tools_and_model).reason == "model_changed"
    # a message edited after a pause past the TTL: the expired system breakpoint comes first
    assert explained(lambda b: b["messages"][0]["content"][0].update(text="x"), wait=400).reason == "ttl_expired"


def test_below_minimum_and_unknown():
    prev, cur = fingerprint(body()), fingerprint(body(model="claude-haiku-4-5"))
    assert explain(prev, fingerprint(body()), 1, TTL, 900) == (
        "below_minimum", "prompt of 900 tokens; claude-sonnet-4-5 caches from 1024")
    assert explain(cur, cur, 1, TTL, 3000)[0] == "below_minimum"
    assert explain(prev, prev, 1, TTL, 5000) == ("unknown", "prefix and breakpoints unchanged, 1 s since the last request")
    assert explain(None, prev, 1, TTL, 5000)[0] == "unknown"


def test_min_cacheable_per_model():
    assert [min_cacheable(m) for m in ("claude-opus-4-5", "claude-haiku-4-5-20251001", "claude-3-5-haiku-latest",
                                       "claude-sonnet-4-5", None)] == [4096, 4096, 2048, 1024, 1024]


def test_a_steady_session_never_breaks_and_a_partial_drop_is_a_break():
    s = Session()
    b = body()
    for turn in range(6):
        usage, found = s.send(b, turn * 10.0)
        assert found is None, (turn, found)
        b = copy.deepcopy(b)
        for m in b["messages"]:
            if isinstance(m["content"], list):
                for block in m["content"]:
                    block.pop("cache_control", None)
        b["messages"] += [{"role": "assistant", "content": "ok"},
                          {"role": "user", "content": [{"type": "text", "text": f"turn {turn}",
                                                        "cache_control": {"type": "ephemeral"}}]}]
    b["messages"][2]["content"] = "edited"  # the system breakpoint still reads: a drop, not to zero
    usage, found = s.send(b, 70.0)
    assert 0 < usage["cache_read_input_tokens"] and found.reason == "messages_changed"
    assert found.tokens_lost > 0 and found.number == 1 and s.watch.breaks == 1


def test_side_requests_to_another_model_neither_break_nor_build():
    s = Session()
    main = body()
    s.send(main, 0.0)
    side = {"model": "claude-haiku-4-5", "system": "Write a title", "messages": [{"role": "user", "content": "hello"}]}
    usage, found = s.send(side, 1.0)
    assert found is None
    assert s.send(main, 2.0)[1] is None  # compared with the main conversation, not with the side request


def test_usage_without_cache_fields_says_nothing():
    w = CacheWatch()
    w.observe("s", {"input_tokens": 1, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 100}, body(), 0)
    assert w.observe("s", {"input_tokens": 5, "output_tokens": 1}, body(), 1) is None
    found = w.observe("s", {"input_tokens": 2000, "cache_read_input_tokens": 0}, body(), 2)
    assert found is not None and found.tokens_lost == 100
    assert w.observe(None, {"cache_read_input_tokens": 0}, body(), 3) is None
    assert w.observe("s", None, body(), 3) is None and w.observe("s", {}, body(), 3) is None


def test_memory_is_bounded_least_recent_first():
    w = CacheWatch(max_sessions=2)
    wrote, read0 = {"cache_read_input_tokens": 0, "cache_creation_input_tokens": 1}, {"cache_read_input_tokens": 0}
    w.observe("a", wrote, body(), 0)
    w.observe("b", wrote, body(), 0)
    w.observe("a", {"cache_read_input_tokens": 1}, body(), 1)  # a is now the most recent
    w.observe("c", wrote, body(), 1)
    assert list(w.sessions) == ["a", "c"]
    assert w.observe("b", read0, body(), 2) is None  # forgotten: starts over
    w.observe("d", wrote, body(), 3, max_sessions=1)  # the rule's cap, as it is reloaded
    assert list(w.sessions) == ["d"]
    w2 = CacheWatch()
    for i in range(100):
        w2.observe("s", wrote, body(model=f"model-{i}"), i)
    assert len(w2.sessions["s"].conversations) == cachewatch.MAX_CONVERSATIONS


def test_fake_cache_accounting_follows_the_documented_rules():
    c = CacheAccounting(ttl_5m=10, min_tokens=1024)
    b = body()
    first = c.usage(b, now=0)
    assert first["cache_read_input_tokens"] == 0 and first["cache_creation_input_tokens"] > 1024
    total = first["input_tokens"] + first["cache_creation_input_tokens"]
    again = c.usage(b, now=5)
    assert again["cache_read_input_tokens"] == total and again["cache_creation_input_tokens"] == 0
    assert c.usage(b, now=14)["cache_read_input_tokens"] == total  # the read at 5 s refreshed the TTL
    assert c.usage(b, now=30)["cache_read_input_tokens"] == 0  # expired
    small = {"model": "m", "system": [{"type": "text", "text": "tiny", "cache_control": {"type": "ephemeral"}}],
             "messages": []}
    assert c.usage(small, now=0)["cache_creation_input_tokens"] == 0  # below the minimum: never cached
    assert json.dumps(c.usage(None)) == "{}"


def next_turn(b: dict, text: str) -> dict:
    """The conversation one turn on, as Claude Code sends it: the breakpoint moves to the new last user block."""
    b = copy.deepcopy(b)
    for m in b["messages"]:
        for block in m["content"] if isinstance(m["content"], list) else ():
            block.pop("cache_control", None)
    b["messages"] += [{"role": "assistant", "content": [{"type": "text", "text": f"done: {text}"}]},
                      {"role": "user", "content": [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]}]
    return b


def test_a_subagent_of_the_same_session_and_model_is_its_own_conversation():
    """Claude Code's Task tool runs subagents in the same process: same session id, same model, their own system
    prompt, tools and first message. Interleaved with the main loop, neither may look like a break of the other."""
    s = Session()
    main = body()
    sub = body(tools=[{"name": "Grep", "description": "grep " * 300, "input_schema": {"type": "object"}}],
               system=[{"type": "text", "text": "You are a search agent. " * 300, "cache_control": {"type": "ephemeral"}}],
               messages=[{"role": "user", "content": [{"type": "text", "text": "find the callers of foo " * 20,
                                                      "cache_control": {"type": "ephemeral"}}]}])
    at = 0.0
    for turn in range(4):
        assert s.send(main, at)[1] is None, turn
        main, at = next_turn(main, f"main {turn}"), at + 2
        for step in range(2):
            assert s.send(sub, at)[1] is None, (turn, step)
            sub, at = next_turn(sub, f"sub {turn}.{step}"), at + 2
    assert s.watch.breaks == 0
    # a real break of either one is still found, against its own previous request
    edited = copy.deepcopy(sub)
    edited["system"][0]["text"] += " Today is Monday."
    usage, found = s.send(edited, at)
    assert found is not None and found.reason == "system_changed"
    assert found.tokens_lost > 0


def test_many_sessions_with_many_tools_share_the_tool_names():
    """Every request is parsed anew, so each fingerprint would hold its own copy of every tool name: with 300 MCP
    tools that is most of a session's memory. The names (and the whole list) are shared between fingerprints."""
    import tracemalloc

    tools = [{"name": f"mcp__server_{i % 10}__tool_number_{i}", "description": "d", "input_schema": {}}
             for i in range(300)]
    raw = json.dumps(body(tools=tools))
    a, b = fingerprint(json.loads(raw)), fingerprint(json.loads(raw))
    assert a.tools == b.tools and a.tools is b.tools
    watch = CacheWatch()
    usage = {"cache_read_input_tokens": 0, "cache_creation_input_tokens": 2000}
    tracemalloc.start()
    try:
        for session in range(200):
            watch.observe(f"session-{session}", usage, json.loads(raw), 0.0)
        per_session = tracemalloc.get_traced_memory()[0] / 200
    finally:
        tracemalloc.stop()
    assert per_session < 6_000, per_session  # bytes: 300 tools cost 8 bytes of digest each, their names once


def test_memory_is_bounded_in_bytes_too():
    """The session cap counts sessions, but a fingerprint grows with its prompt (8 bytes a block): 5000 sessions of
    16 conversations of a prompt of 50,000 small blocks would be 32 GB. A byte budget forgets the least recently
    seen sessions first, never the one just seen."""
    big = body(messages=[{"role": "user", "content": [{"type": "text", "text": str(i)} for i in range(5_000)]}])
    size = fingerprint(big).blocks * cachewatch.DIGEST
    w = CacheWatch(max_bytes=3 * size)
    usage = {"cache_read_input_tokens": 0, "cache_creation_input_tokens": 2000}
    for session in range(10):
        w.observe(f"s{session}", usage, big, float(session))
        assert w.size <= 3 * size + 2_000 and "s%d" % session in w.sessions
    assert list(w.sessions) == ["s8", "s9"]
    other = body(system="another agent", messages=[{"role": "user", "content": [{"type": "text", "text": f"-{i}"}
                                                                             for i in range(5_000)]}])
    w.observe("s9", usage, other, 11.0)  # another conversation of s9: s8 goes first
    assert list(w.sessions) == ["s9"] and len(w.sessions["s9"].conversations) == 2
    lonely = CacheWatch(max_bytes=size // 2)  # one conversation over the budget is kept: its session is current
    lonely.observe("s", usage, big, 0.0)
    assert list(lonely.sessions) == ["s"]
    sizes = sum(cachewatch.footprint(seen.fingerprint) for s in w.sessions.values() for seen in s.conversations.values())
    assert w.size == sizes


def test_the_shared_tool_names_are_bounded_however_many_lists_clients_send(monkeypatch):
    monkeypatch.setattr(cachewatch, "MAX_SHARED_NAMES", 1_000)
    for i in range(100):
        fp = fingerprint(body(tools=[{"name": f"t{i}_{k}"} for k in range(30)]))
        assert fp.tools[0] == f"t{i}_0"
        assert cachewatch._TOOL_LISTS.names <= 1_000
        assert sum(map(len, cachewatch._TOOL_LISTS.lists)) == cachewatch._TOOL_LISTS.names


def test_a_model_switch_whose_system_prompt_names_the_model_is_model_changed():
    """Claude Code's system prompt names its model ("You are powered by the model named …"), so /model changes
    the system prompt too: the conversation (same first message, same first answer) still goes on."""
    def switch(b):
        b["model"] = "claude-opus-4-1"
        b["system"][1]["text"] += " You are powered by claude-opus-4-1."

    found = explained(switch)
    assert (found.reason, found.detail) == ("model_changed", "model claude-sonnet-4-5 -> claude-opus-4-1")


def test_subagents_of_one_kind_started_side_by_side_are_separate_conversations():
    """Claude Code starts several subagents of one kind at once (three Explore agents): same session, model and
    system prompt, each its own task as first message. The second is not an edit of the first."""
    s = Session()
    agents = [body(messages=[{"role": "user", "content": [{"type": "text", "text": f"explore part {i} " * 40,
                                                           "cache_control": {"type": "ephemeral"}}]}])
              for i in range(3)]
    at = 0.0
    for step in range(3):
        for i, agent in enumerate(agents):
            assert s.send(agent, at)[1] is None, (step, i)
            agents[i], at = next_turn(agent, f"step {step}"), at + 1
    assert s.watch.breaks == 0


def test_block_digests_follow_content_not_key_order():
    """The digest of a block is its canonical JSON hashed: key order does not matter, any change in it does."""
    tool = {"name": "read", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}
    reordered = {"input_schema": {"properties": {"path": {"type": "string"}}, "type": "object"}, "name": "read"}
    assert cachewatch._hash(tool) == cachewatch._hash(reordered)
    assert cachewatch._hash(tool) == cachewatch._hash({**tool, "cache_control": {"type": "ephemeral"}})
    changed = copy.deepcopy(tool)
    changed["input_schema"]["properties"]["path"]["type"] = "number"
    assert cachewatch._hash(tool) != cachewatch._hash(changed)
    assert len(cachewatch._hash(tool)) == cachewatch.DIGEST
    assert cachewatch._hash({"type": "text", "text": "\ud83d"}) != cachewatch._hash({"type": "text", "text": "\ud83e"})
