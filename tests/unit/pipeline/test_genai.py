"""One exchange as GenAI attributes (pipeline/genai.py): Anthropic's token rule, error types, the cache-break
event, no session in metrics, no text unless asked."""

from __future__ import annotations

from gwtest import rule_file
from llm_gateway.pipeline import genai
from llm_gateway.pipeline.exchange import Exchange

RULES = rule_file().rules


def finished(**fields) -> Exchange:
    ex = Exchange(RULES, "anthropic", "reverse", "POST", "gw", "/v1/messages", started=100.0)
    ex.model_requested, ex.model_answered, ex.client, ex.session = "claude-x", "claude-x-2", "sdk", "s-1"
    ex.status, ex.complete, ex.stream_requested, ex.stream_upstream = 200, True, True, True
    ex.response_started, ex.response_id, ex.stop_reason = 100.25, "msg_1", "end_turn"
    ex.usage = {"input_tokens": 5, "output_tokens": 9, "cache_read_input_tokens": 4000,
                "cache_creation_input_tokens": 300}
    for key, value in fields.items():
        setattr(ex, key, value)
    return ex


def test_input_tokens_are_the_whole_prompt_by_anthropics_rule():
    a = genai.end_attributes(finished())
    assert a["gen_ai.usage.input_tokens"] == 4305
    assert (a["gen_ai.usage.output_tokens"], a["gen_ai.usage.cache_read.input_tokens"],
            a["gen_ai.usage.cache_creation.input_tokens"]) == (9, 4000, 300)
    assert genai.token_points(finished()) == [("input", 4305), ("output", 9)]
    assert genai.end_attributes(finished(usage=None)).get("gen_ai.usage.input_tokens") is None
    assert genai.token_points(finished(usage=None)) == []


def test_answer_attributes():
    a = genai.end_attributes(finished())
    assert a["gen_ai.response.model"] == "claude-x-2" and a["gen_ai.response.id"] == "msg_1"
    assert a["gen_ai.response.finish_reasons"] == ("end_turn",)
    assert a["gen_ai.response.time_to_first_chunk"] == 0.25
    assert a["llm_gateway.stream.forced"] is False and "error.type" not in a
    forced = genai.end_attributes(finished(stream_requested=False, converted="sse->json"))
    assert forced["llm_gateway.stream.forced"] is True and forced["llm_gateway.stream.converted"] == "sse->json"


def test_error_type_is_what_the_client_got():
    assert genai.error_type(finished(status=529, error_type="overloaded_error")) == "overloaded_error"
    assert genai.error_type(finished(status=None, complete=False)) == "no_response"
    assert genai.error_type(finished(complete=False)) == "incomplete"
    assert genai.error_type(finished(status=503)) == "api_error"  # from the status, as the record says
    assert genai.error_type(finished()) is None


def test_cache_break_event():
    assert genai.break_event(finished()) is None
    ex = finished(cache_break=True, cache_break_reason="system_changed", cache_break_detail="system block 1 changed",
                  cache_break_tokens_lost=4000, cache_break_cost_usd=0.0108)
    assert genai.break_event(ex) == {
        "llm_gateway.cache_break.reason": "system_changed", "llm_gateway.cache_break.detail": "system block 1 changed",
        "llm_gateway.cache_break.tokens_lost": 4000, "llm_gateway.cache_break.cost_usd": 0.0108}


def test_start_attributes_and_metric_attributes_never_hold_the_session():
    ex = finished(principal="team-a", body={"max_tokens": 64, "temperature": 0.2, "messages": []})
    headers = {"x-claude-code-agent-id": "agent-7", "x-claude-code-parent-agent-id": "agent-1"}
    a = genai.start_attributes(ex, headers, "upstream.example", 443)
    assert a["gen_ai.conversation.id"] == "s-1" and a["llm_gateway.principal"] == "team-a"
    assert (a["llm_gateway.agent.id"], a["llm_gateway.agent.parent_id"]) == ("agent-7", "agent-1")
    assert (a["server.address"], a["server.port"], a["llm_gateway.mode"]) == ("upstream.example", 443, "base_url")
    assert (a["gen_ai.request.max_tokens"], a["gen_ai.request.temperature"]) == (64, 0.2)
    m = genai.metric_attributes(ex, "upstream.example", 443)
    assert "s-1" not in m.values() and not any("conversation" in k or "principal" in k for k in m)
    assert genai.span_name(ex) == "chat claude-x" and genai.span_name(finished(model_requested=None)) == "chat"
    egress = genai.start_attributes(Exchange(RULES, "anthropic", "regular", "POST", "h", "/"), {}, None, None)
    assert egress["llm_gateway.mode"] == "egress" and "server.address" not in egress


def test_provider_is_decided_in_one_place():
    assert genai.provider(finished()) == "anthropic"
    assert genai.PROVIDERS["bedrock"] == "aws.bedrock" and genai.PROVIDERS["vertex"] == "gcp.vertex_ai"


def test_content_only_through_its_own_functions():
    body = {"system": "be brief", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "bash", "input": {"c": "ls"}}]}]}
    a = genai.content_attributes(body)
    assert a["gen_ai.system_instructions"] == '[{"type":"text","content":"be brief"}]'
    assert '"type":"tool_call","id":"t1","name":"bash","arguments":{"c":"ls"}' in a["gen_ai.input.messages"]
    out = genai.output_attributes({"type": "message", "content": [{"type": "text", "text": "yo"}], "stop_reason": "end_turn"})
    assert out == {"gen_ai.output.messages": '[{"role":"assistant","parts":[{"type":"text","content":"yo"}],"finish_reason":"end_turn"}]'}
    assert not any(k.startswith(("gen_ai.input", "gen_ai.output", "gen_ai.system"))
                   for k in {**genai.start_attributes(finished(body=body), {}, None, None), **genai.end_attributes(finished())})


def test_content_of_a_long_conversation_is_its_newest_messages_within_the_limit():
    """An agent resends its whole conversation each request: the span holds the newest messages that fit, as
    JSON still, with the count of older ones left out; a single message or system prompt over it is cut."""
    import json
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "x" * 1000} for i in range(300)]
    a = genai.content_attributes({"system": "s" * 100_000, "messages": messages}, limit=16384)
    kept = json.loads(a["gen_ai.input.messages"])
    assert len(a["gen_ai.input.messages"]) <= 16384 and 10 <= len(kept) < 300
    assert kept[-1]["parts"][0]["content"].startswith("turn 299 ") and kept[0]["parts"][0]["content"].startswith(f"turn {300 - len(kept)} ")
    assert a["llm_gateway.content.messages_omitted"] == 300 - len(kept)
    assert len(a["gen_ai.system_instructions"]) == 16384
    one = genai.content_attributes({"messages": [{"role": "user", "content": "y" * 100_000}]}, limit=16384)
    assert len(one["gen_ai.input.messages"]) == 16384 and "llm_gateway.content.messages_omitted" not in one
    short = genai.content_attributes({"messages": messages[:3]}, limit=16384)
    assert len(json.loads(short["gen_ai.input.messages"])) == 3 and "llm_gateway.content.messages_omitted" not in short
