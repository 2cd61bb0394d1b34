"""End to end: every prompt-cache break explained, through a real mitmdump.

The fake upstream emulates Anthropic's cache accounting (tests/fakes/upstream.py `CacheAccounting`: it remembers
the prefixes it cached, with short TTLs here), so no test says where a break happens: a client changes its
request the way agents do, the upstream reads less cache, and the gateway must say why.
"""

from __future__ import annotations

import time
import urllib.request
import uuid

import anthropic
import pytest

import realclients
from conftest import routed_rules
from fakes.upstream import CacheAccounting, FakeUpstream
from harness import Gateway, free_port
from llm_gateway.tools import report

pytestmark = pytest.mark.e2e

TTL = 5.0  # seconds a "5m" entry lives in the fake, and what the gateway is told
RULES_EXTRA = f"""\
usage:
  cache_ttl_5m: {TTL}
pricing:
  - {{model: "claude-test-*", input: 3, output: 15, cache_write_5m: 3.75, cache_write_1h: 6, cache_read: 0.3}}
"""
MODEL, OTHER_MODEL = "claude-test-1", "claude-test-2"


def text(seed: str, chars: int) -> str:
    words = [f"{seed}{i}" for i in range(chars // 6)]
    return " ".join(words)[:chars]


def tool(name: str) -> dict:
    return {"name": name, "description": text(name, 400),
            "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}


def user(content: str, breakpoint: bool = True) -> dict:
    block = {"type": "text", "text": content}
    if breakpoint:
        block["cache_control"] = {"type": "ephemeral"}
    return {"role": "user", "content": [block]}


class Agent:
    """A scripted agent session with the real Anthropic SDK, in this process, through the gateway."""

    def __init__(self, gw: Gateway, fake: FakeUpstream, session: str) -> None:
        self.gw, self.fake = gw, fake
        self.client = anthropic.Anthropic(base_url=gw.base_url, api_key="sk-ant-test-cachewatch", max_retries=0,
                                          default_headers={"x-session-id": session})
        self.model = MODEL
        self.tools = [tool(n) for n in ("read_file", "write_file", "mcp__x__search", "bash", "grep")]
        # the session in the prompt: the fake's cache outlives a test, and each test's session starts cold
        self.system = [{"type": "text", "text": f"[{session}] " + text("intro", 6000)},
                       {"type": "text", "text": text("rules", 2000), "cache_control": {"type": "ephemeral"}}]
        self.messages = [user("first question " + text("q", 300))]
        self.turns = 0

    def turn(self) -> dict:
        """Send the conversation as it stands; append the answer and a next question; return the record."""
        self.turns += 1
        request = dict(model=self.model, max_tokens=64, tools=self.tools, system=self.system, messages=self.messages)
        if self.turns % 2:  # both answer paths: JSON and SSE
            answer = self.client.messages.create(**request)
        else:
            with self.client.messages.stream(**request) as stream:
                answer = stream.get_final_message()
        seen = self.fake.messages_requests()[-1]
        record = self.gw.wait_record(lambda r: r["request_id"] == seen.request_id)
        assert record["cache_read_input_tokens"] == answer.usage.cache_read_input_tokens
        for message in self.messages:  # the breakpoint moves to the newest user message, as agents do
            for block in message["content"]:
                block.pop("cache_control", None)
        self.messages += [{"role": "assistant", "content": [{"type": "text", "text": answer.content[0].text}]},
                          user(f"question {self.turns + 1} " + text("q", 200))]
        return record


@pytest.fixture(scope="module")
def fake():
    with FakeUpstream(cache=CacheAccounting(ttl_5m=TTL)) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gw(fake):
    port = free_port()
    with Gateway(routed_rules(fake.url, RULES_EXTRA), extra_args=("--set", f"gateway_metrics_port={port}")) as gateway:
        gateway.metrics_url = f"http://127.0.0.1:{port}/-/metrics"
        yield gateway


def no_break(record: dict) -> None:
    assert record["cache_break"] is False, record
    assert record["cache_break_reason"] is record["cache_break_detail"] is record["cache_break_tokens_lost"] is None


def test_a_session_without_a_break_never_gets_a_reason(gw, fake):
    agent = Agent(gw, fake, "sess-steady")
    records = [agent.turn() for _ in range(5)]
    for record in records:
        no_break(record)
    reads = [r["cache_read_input_tokens"] for r in records]
    assert reads[0] == 0 and all(b > a for a, b in zip(reads, reads[1:]))  # the cache grows turn by turn


def test_a_subagent_in_the_same_session_and_model_breaks_nothing(gw, fake):
    """Claude Code's Task tool: a subagent shares the session id and the model, with its own system prompt, tools
    and task; its turns interleave with the main loop's, and neither side's record may show a break."""
    main, sub = Agent(gw, fake, "sess-subagent"), Agent(gw, fake, "sess-subagent")
    sub.tools = [tool("grep"), tool("glob")]
    sub.system = [{"type": "text", "text": text("searcher", 6000), "cache_control": {"type": "ephemeral"}}]
    sub.messages = [user("find every caller " + text("task", 300))]
    records = [agent.turn() for agent in (main, main, sub, sub, main, sub, main)]
    for record in records:
        no_break(record)
    assert [r["cache_read_input_tokens"] > 0 for r in records] == [False, True, False, True, True, True, True]


def edit_system_block_2(agent: Agent) -> None:
    agent.system[1]["text"] = agent.system[1]["text"].replace("rules1 ", "rules1 (edited) ", 1)


def reorder_tools(agent: Agent) -> None:
    agent.tools[0], agent.tools[1], agent.tools[3] = agent.tools[3], agent.tools[0], agent.tools[1]


def remove_tool(agent: Agent) -> None:
    agent.tools = [t for t in agent.tools if t["name"] != "mcp__x__search"]


def edit_earlier_message(agent: Agent) -> None:
    agent.messages[2]["content"][0]["text"] += " (edited later)"


def switch_model(agent: Agent) -> None:
    agent.model = OTHER_MODEL


def pause_past_ttl(agent: Agent) -> None:
    time.sleep(TTL + 1.5)


def move_breakpoint(agent: Agent) -> None:
    del agent.system[1]["cache_control"]
    agent.system[0]["cache_control"] = {"type": "ephemeral"}
    agent.messages[-1]["content"][0].pop("cache_control")


CHANGES = [
    (edit_system_block_2, "system_changed", "system block 2 changed"),
    (reorder_tools, "tools_changed", "3 tools reordered"),
    (remove_tool, "tools_changed", "tool 'mcp__x__search' removed"),
    (edit_earlier_message, "messages_changed", "message 3 (user) block 1 changed"),
    (switch_model, "model_changed", f"model {MODEL} -> {OTHER_MODEL}"),
    (pause_past_ttl, "ttl_expired", "since the last request; TTL 5m"),
    (move_breakpoint, "breakpoint_changed", "breakpoint at message"),
]


def test_each_change_of_the_prefix_is_explained(gw, fake):
    session = "sess-changes"
    agent = Agent(gw, fake, session)
    for record in (agent.turn(), agent.turn()):
        no_break(record)
    for change, reason, detail in CHANGES:
        before = agent.turn()  # a steady turn before each change: it reads, and caches its whole prefix
        no_break(before)
        cached = before["cache_read_input_tokens"] + before["cache_creation_input_tokens"]
        change(agent)
        record = agent.turn()
        assert record["cache_break"] is True, (change.__name__, record)
        assert (record["cache_break_reason"], change.__name__) == (reason, change.__name__), record
        assert detail in record["cache_break_detail"], record
        assert record["cache_read_input_tokens"] < cached
        assert record["cache_break_tokens_lost"] == cached - record["cache_read_input_tokens"]
        assert record["cache_break_cost_usd"] > 0
        out = gw.output()
        assert f"CACHE BREAK {reason}: {record['cache_break_detail']}" in out
        assert f"lost {record['cache_break_tokens_lost']} cached tokens" in out and session in out
    breaks = [r for r in gw.records(timeout=0) if r["session"] == session and r["cache_break"]]
    assert [r["cache_break_reason"] for r in breaks] == [reason for _, reason, _ in CHANGES]
    # the usage report: breaks by client and reason, the same when found again from the records alone
    recorded, recomputed = (report.build([str(gw.usage_log)], report.Filters(sessions=(session,)), "client", again)
                            for again in (False, True))
    assert recorded.breaks.result() == recomputed.breaks.result()
    assert sum(row["breaks"] for row in recorded.breaks.result()) == len(CHANGES)
    metrics = urllib.request.urlopen(gw.metrics_url, timeout=5).read().decode()
    for reason in {reason for _, reason, _ in CHANGES}:
        count = sum(1 for _, r, _ in CHANGES if r == reason)
        assert f'llm_gateway_cache_break_reasons_total{{client="anthropic-python",reason="{reason}"}} {count}.0' in metrics


def test_claude_code_second_turn_with_another_system_prompt_is_system_changed(gw, fake, tmp_path):
    """Claude Code 2.1.330 ignores --append-system-prompt on --continue/--resume (the resumed session keeps its
    prompt), so the second turn is a run with the same --session-id from a fresh HOME in the same folder."""
    session = str(uuid.uuid4())
    first = realclients.run_claude("hello", base_url=gw.base_url, cwd=tmp_path, args=["--session-id", session])
    assert first.returncode == 0, first.stderr
    second = realclients.run_claude("hello", base_url=gw.base_url, cwd=tmp_path,
                                    args=["--session-id", session, "--append-system-prompt", "Answer in French."])
    assert second.returncode == 0, second.stderr
    records = gw.wait_records(lambda r: r["session"] == session, count=2)
    assert [r["client"] for r in records] == ["claude-code", "claude-code"]
    no_break(records[0])
    assert records[0]["cache_creation_input_tokens"] > 0
    assert records[1]["cache_break_reason"] == "system_changed", records[1]
    assert records[1]["cache_break_detail"].startswith("system block"), records[1]
    sent = [q.json for q in fake.messages_requests() if q.headers.get("x-claude-code-session-id") == session]
    assert "Answer in French." not in str(sent[0]["system"]) and "Answer in French." in str(sent[1]["system"])
