"""Client and session detection: the default signatures against realistic requests, and bad input."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.http import Headers

from llm_gateway.policy import clients
from llm_gateway.protocol import headers as protocol_headers
from llm_gateway.policy import rules
from llm_gateway.policy.clients import OVERRIDE_HEADER, Detection, detect, find_signature, session_id
from llm_gateway.policy.spec import ClientSignature
from llm_gateway.util.globs import Glob

ROOT = Path(__file__).resolve().parents[3]

SIGS = rules.load(ROOT / "rules.yaml").clients  # the default rule file, through the real parser
NAMES = [s.name for s in SIGS]

# --- realistic requests ----------------------------------------------------------------------------------------

CC_SESSION = "8be2e96a-a3ed-42d9-b652-ae345397006b"
DEVICE = "3f1c0a9e" * 8
ACCOUNT = "0b6c1e4a-5d1f-4f0e-9a53-7c2d9f3e8b11"
OLD_SESSION = "c7f0d1a2-9b3e-4c5d-8e6f-1a2b3c4d5e6f"

STAINLESS_JS = {
    "X-Stainless-Lang": "js",
    "X-Stainless-Package-Version": "0.71.2",
    "X-Stainless-OS": "Linux",
    "X-Stainless-Arch": "x64",
    "X-Stainless-Runtime": "node",
    "X-Stainless-Runtime-Version": "v22.20.0",
    "X-Stainless-Retry-Count": "0",
    "X-Stainless-Timeout": "600",
}


def json_user_id(session: str = CC_SESSION) -> str:
    return json.dumps({"device_id": DEVICE, "account_uuid": ACCOUNT, "session_id": session}, separators=(",", ":"))


def legacy_user_id(session: str = OLD_SESSION, account: str = "") -> str:
    return f"user_{DEVICE}_account_{account}_session_{session}"


def messages_body(system: Any = None, user_id: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-opus-4-8",
        "max_tokens": 64000,
        "stream": True,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        **extra,
    }
    if system is not None:
        body["system"] = system
    if user_id is not None:
        body["metadata"] = {"user_id": user_id}
    return body


CLAUDE_CODE_LIVE_HEADERS = {
    "User-Agent": "claude-cli/2.1.197 (external, sdk-cli)",
    "x-app": "cli",
    "X-Claude-Code-Session-Id": CC_SESSION,
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,context-1m-2025-08-07,interleaved-thinking-2025-05-14",
    "x-api-key": "sk-ant-test",
    "Accept-Encoding": "gzip, deflate, br, zstd",
    "anthropic-dangerous-direct-browser-access": "true",
    **STAINLESS_JS,
}
CLAUDE_CODE_SYSTEM = [
    {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197; cc_entrypoint=sdk-cli;"},
    {
        "type": "text",
        "text": "You are Claude Code, Anthropic's official CLI for Claude.",
        "cache_control": {"type": "ephemeral"},
    },
]

# Pi (badlogic/pi-mono, packages/ai/src/providers/anthropic.ts) with an OAuth token: Claude Code's user agent,
# x-app and beta, the Claude Code system line, but no session header and no metadata.user_id.
PI_OAUTH_HEADERS = {
    "accept": "application/json",
    "anthropic-dangerous-direct-browser-access": "true",
    "anthropic-beta": "claude-code-20250219,oauth-2025-04-20,fine-grained-tool-streaming-2025-05-14",
    "user-agent": "claude-cli/2.1.2 (external, cli)",
    "x-app": "cli",
    "authorization": "Bearer sk-ant-oat01-test",
    **STAINLESS_JS,
}
PI_SYSTEM = [
    {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
    {"type": "text", "text": "You are an expert coding assistant operating inside pi."},
]

CLINE_PROMPT = (
    "You are Cline, a highly skilled software engineer with extensive knowledge in many programming languages."
)


def ts_sdk(**extra: str) -> dict[str, str]:
    return {"User-Agent": "Anthropic/JS 0.71.2", "anthropic-version": "2023-06-01", **STAINLESS_JS, **extra}


def python_sdk_headers(async_: bool) -> dict[str, str]:
    """The headers the installed Anthropic Python SDK really sends."""
    anthropic = pytest.importorskip("anthropic")
    client = (anthropic.AsyncAnthropic if async_ else anthropic.Anthropic)(api_key="sk-ant-test")
    return {k: v for k, v in client.default_headers.items() if isinstance(v, str)}


CASES: list[tuple[str, dict[str, str], Any, str, str | None]] = [
    # id, headers, body, expected client, expected session
    (
        "claude-code live 2.1.197",
        CLAUDE_CODE_LIVE_HEADERS,
        messages_body(CLAUDE_CODE_SYSTEM, json_user_id()),
        "claude-code",
        CC_SESSION,
    ),
    (
        "claude-code 2.1.80: JSON user_id, no session header",
        {
            "User-Agent": "claude-cli/2.1.80 (external, cli)",
            "x-app": "cli",
            "anthropic-beta": "claude-code-20250219",
            **STAINLESS_JS,
        },
        messages_body(CLAUDE_CODE_SYSTEM, json_user_id("a1b2c3d4-0000-4000-8000-000000000001")),
        "claude-code",
        "a1b2c3d4-0000-4000-8000-000000000001",
    ),
    (
        "claude-code 2.0: legacy user_id",
        {
            "User-Agent": "claude-cli/2.0.14 (external, cli)",
            "x-app": "cli",
            "anthropic-beta": "claude-code-20250219,oauth-2025-04-20",
        },
        messages_body("You are Claude Code, Anthropic's official CLI for Claude.", legacy_user_id(account=ACCOUNT)),
        "claude-code",
        OLD_SESSION,
    ),
    (
        "claude-code in VS Code, session header only (count_tokens has no metadata)",
        {
            "User-Agent": "claude-cli/2.1.90 (external, claude-vscode)",
            "x-app": "cli",
            "x-claude-code-session-id": CC_SESSION,
        },
        {"model": "claude-sonnet-4-5", "messages": []},
        "claude-code",
        CC_SESSION,
    ),
    (
        "pi oauth: claude-cli UA without confirming signals",
        PI_OAUTH_HEADERS,
        messages_body(PI_SYSTEM),
        "claude-cli-compatible",
        None,
    ),
    (
        "pi newer: bare claude-cli UA",
        {**PI_OAUTH_HEADERS, "user-agent": "claude-cli/2.1.75"},
        messages_body(PI_SYSTEM),
        "claude-cli-compatible",
        None,
    ),
    (
        "pi api key: TS SDK with x-session-affinity",
        ts_sdk(**{"x-session-affinity": "pi-session-1"}),
        messages_body([{"type": "text", "text": "You are an expert coding assistant operating inside pi."}]),
        "anthropic-typescript",
        "pi-session-1",
    ),
    (
        "cline: list system",
        ts_sdk(),
        messages_body([{"type": "text", "text": CLINE_PROMPT, "cache_control": {"type": "ephemeral"}}]),
        "cline",
        None,
    ),
    ("cline: string system with leading newline", ts_sdk(), messages_body("\n" + CLINE_PROMPT), "cline", None),
    ("typescript sdk", ts_sdk(), messages_body("You are a helpful assistant."), "anthropic-typescript", None),
    (
        "typescript sdk, custom user agent",
        {**STAINLESS_JS, "User-Agent": "my-tool/1.0"},
        messages_body(),
        "anthropic-typescript",
        None,
    ),
    (
        "litellm completion",
        {"User-Agent": "litellm/1.77.5", "x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"},
        messages_body("Act as an expert software developer."),
        "litellm",
        None,
    ),
    (
        "litellm health check",
        {"user-agent": "litellm/1.77.5"},
        {"model": "claude-3-5-haiku-latest", "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]},
        "litellm",
        None,
    ),
    (
        "litellm headers only",
        {"User-Agent": "curl/8.5.0", "x-litellm-session-id": "ls-1", "x-litellm-tags": "team-a"},
        messages_body(),
        "litellm",
        "ls-1",
    ),
    (
        "claude-code with x-litellm custom headers stays claude-code",
        {**CLAUDE_CODE_LIVE_HEADERS, "x-litellm-tags": "team-a", "x-litellm-session-id": "ls-2"},
        messages_body(CLAUDE_CODE_SYSTEM, json_user_id()),
        "claude-code",
        CC_SESSION,
    ),
    (
        "opencode with session affinity",
        {
            "User-Agent": "opencode/1.0.150",
            "x-opencode-session": "ses_4f1a2b",
            "x-opencode-request": "msg_9c8d7e",
            "x-opencode-project": "prj_1",
            "x-session-affinity": "ses_4f1a2b-affinity",
        },
        messages_body("You are OpenCode, the best coding agent on the planet."),
        "opencode",
        "ses_4f1a2b",
    ),
    ("opencode headers, no UA", {"x-opencode-session": "ses_1"}, messages_body(), "opencode", "ses_1"),
    (
        "crush with session affinity",
        {
            "User-Agent": "Charm-Crush/0.13.2 (https://charm.land/crush)",
            "X-Stainless-Lang": "go",
            "x-session-id": "crush-sess-1",
            "x-session-affinity": "crush-aff-1",
        },
        messages_body(),
        "crush",
        "crush-sess-1",
    ),
    (
        "crush older UA",
        {"User-Agent": "Charm Crush/0.5.1", "x-session-affinity": "crush-aff-2"},
        messages_body(),
        "crush",
        "crush-aff-2",
    ),
    ("factory droid", {"User-Agent": "factory-cli/0.22.3 (darwin; arm64)"}, messages_body(), "factory-droid", None),
    ("goose", {"goose-session-id": "20250918_7", "accept": "*/*"}, messages_body(), "goose", "20250918_7"),
    ("zed", {"User-Agent": "Zed/0.205.3 (macos; aarch64)"}, messages_body(), "zed", None),
    ("kilo by UA", {"User-Agent": "Kilo-Code/4.96.1"}, messages_body(), "kilo-code", None),
    ("kilo by originator", ts_sdk(Originator="kilo-code"), messages_body(), "kilo-code", None),
    ("kilo by prompt", ts_sdk(), messages_body("You are Kilo Code, a highly skilled engineer."), "kilo-code", None),
    ("roo by UA", {"User-Agent": "roo-code/3.30.0 (linux 6.8.0; x64) node/22.20.0"}, messages_body(), "roo-code", None),
    ("roo by RooCode UA", {"User-Agent": "RooCode/3.25.4"}, messages_body(), "roo-code", None),
    ("roo by prompt", ts_sdk(), messages_body("You are Roo, a highly skilled software engineer."), "roo-code", None),
    ("unknown", {"User-Agent": "curl/8.5.0"}, messages_body("Hi"), "unknown", None),
]


@pytest.mark.parametrize(("headers", "body", "client", "session"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_default_signatures(headers: dict[str, str], body: Any, client: str, session: str | None) -> None:
    for h in (Headers([(k.encode(), v.encode()) for k, v in headers.items()]), headers):
        d = detect(SIGS, h, body)
        assert (d.client, d.session) == (client, session), d
    assert d.user_agent == next((v for k, v in headers.items() if k.lower() == "user-agent"), None)


@pytest.mark.parametrize("async_", [False, True])
def test_python_sdk_real_headers(async_: bool) -> None:
    headers = python_sdk_headers(async_)
    d = detect(SIGS, Headers([(k.encode(), v.encode()) for k, v in headers.items()]), messages_body())
    assert d.client == ("anthropic-python-async" if async_ else "anthropic-python")
    assert d.matched_by.startswith("user_agent ")


@pytest.mark.parametrize(
    ("stainless_async", "client"),
    [
        ("false", "anthropic-python"),
        ("async:asyncio", "anthropic-python-async"),
        ("async:trio", "anthropic-python-async"),
    ],
)
def test_python_sdk_custom_user_agent(stainless_async: str, client: str) -> None:
    headers = {"User-Agent": "my-agent/2.0", "X-Stainless-Lang": "python", "X-Stainless-Async": stainless_async}
    assert detect(SIGS, headers, messages_body()).client == client


def test_matched_by() -> None:
    assert detect(SIGS, PI_OAUTH_HEADERS, messages_body(PI_SYSTEM)).matched_by == "user_agent claude-cli/*"
    assert detect(SIGS, {"x-app": "cli"}, None).matched_by == "header_value x-app: cli"
    beta_only = detect(SIGS, {"anthropic-beta": "oauth-2025-04-20,claude-code-20250219"}, None)
    assert beta_only.client == "claude-cli-compatible"
    assert beta_only.matched_by == "header_value anthropic-beta: *claude-code-*"
    assert detect(SIGS, {"x-litellm-timeout": "30"}, None).matched_by == "header x-litellm-*"
    assert detect(SIGS, CLAUDE_CODE_LIVE_HEADERS, None).matched_by == "header x-claude-code-session-id"
    old = detect(SIGS, {}, messages_body(user_id=legacy_user_id()))
    assert (old.client, old.matched_by) == ("claude-code", "metadata.user_id user_*_account_*_session_*")
    new = detect(SIGS, {}, messages_body(user_id=json_user_id()))
    assert (new.client, new.matched_by) == ("claude-code", 'metadata.user_id {*"session_id"*}')
    assert detect(SIGS, ts_sdk(), messages_body(CLINE_PROMPT)).matched_by == "system_prompt You are Cline,"
    assert detect(SIGS, {}, None) == Detection("unknown", None, None, "none")


def test_order_of_defaults() -> None:
    """The order decisions the comments in the YAML explain."""
    pos = NAMES.index
    assert NAMES[0] == "claude-code"
    assert pos("claude-code") < pos("claude-cli-compatible") < pos("anthropic-typescript")
    assert pos("cline") < pos("anthropic-typescript")
    assert pos("kilo-code") < pos("anthropic-typescript") and pos("roo-code") < pos("anthropic-typescript")
    assert pos("crush") < pos("opencode")
    assert pos("anthropic-python-async") < pos("anthropic-python")
    assert pos("litellm") < pos("anthropic-python-async")
    assert len(set(NAMES)) == len(NAMES)
    assert all(s.stream == "as-sent" for s in SIGS)


def test_first_matching_signature_wins() -> None:
    a = ClientSignature("a", user_agent=("tool/*",))
    b = ClientSignature("b", headers=("x-tool-*",))
    headers = {"User-Agent": "tool/1", "x-tool-id": "1"}
    assert detect((a, b), headers, None).client == "a"
    assert detect((b, a), headers, None).client == "b"
    assert detect((), headers, None).client == "unknown"


# --- sessions --------------------------------------------------------------------------------------------------

ALL_SESSION_HEADERS = {
    "X-Claude-Code-Session-Id": "s-claude-header",
    "x-litellm-session-id": "s-litellm",
    "x-opencode-session": "s-opencode",
    "goose-session-id": "s-goose",
    "x-session-id": "s-session-id",
    "x-session-affinity": "s-affinity",
}


def test_session_sources_in_order() -> None:
    headers = dict(ALL_SESSION_HEADERS)
    body = messages_body(user_id=json_user_id("s-metadata"))
    expected = ["s-claude-header", "s-metadata", "s-litellm", "s-opencode", "s-goose", "s-session-id", "s-affinity"]
    order = list(clients.SESSION_SOURCES)
    assert order == [
        "x-claude-code-session-id",
        "metadata.user_id",
        "x-litellm-session-id",
        "x-opencode-session",
        "goose-session-id",
        "x-session-id",
        "x-session-affinity",
    ]
    for source, want in zip(order, expected):
        assert session_id(Headers([(k.encode(), v.encode()) for k, v in headers.items()]), body) == want
        assert session_id(headers, body) == want
        assert detect(SIGS, headers, body).session == want
        if source == "metadata.user_id":
            body = messages_body()
        else:
            headers = {k: v for k, v in headers.items() if k.lower() != source}
    assert session_id(headers, body) is None


@pytest.mark.parametrize(
    ("user_id", "session"),
    [
        (json_user_id(), CC_SESSION),
        (json.dumps({"device_id": DEVICE, "account_uuid": "", "session_id": CC_SESSION}), CC_SESSION),
        (' {"session_id": "spaced"} ', "spaced"),
        (legacy_user_id(), OLD_SESSION),
        (legacy_user_id(account=ACCOUNT), OLD_SESSION),
        (f"user_{DEVICE}_account__session_", None),
        ("user_123", None),
        ("alice", None),
        ("", None),
        ("{not json", None),
        ("{not json_session_x", None),
        ('{"device_id": "d"}', None),
        ('{"session_id": 5}', None),
        ('{"session_id": ""}', None),
        ('{"session_id": "bad\\u0000id"}', None),
        ('{"session_id": "\\ud800"}', None),
        ("[1, 2]", None),
        ("{" + "[" * 3000, None),
        ('{"a":' * 1000 + "1" + "}" * 1000, None),
        (f"user_x_account__session_{'a' * 5000}", None),
        ("user_x_account__session_bad\x00id", None),
    ],
)
def test_claude_code_user_id_forms(user_id: str, session: str | None) -> None:
    assert session_id({}, messages_body(user_id=user_id)) == session


def test_session_bounds() -> None:
    assert session_id({"x-session-id": "a" * 1000}, None) == "a" * 200
    assert session_id({"x-session-id": HUGE + "\n"}, None) == "x" * 200
    assert session_id({"x-session-id": "  padded  "}, None) == "padded"
    # junk in a preferred source falls through to the next one
    assert session_id({"x-claude-code-session-id": "bad\x01id", "x-session-id": "good"}, None) == "good"
    assert session_id({"x-claude-code-session-id": "   ", "x-session-affinity": "aff"}, None) == "aff"
    assert session_id({"x-session-id": "\udcff\udcfe"}, None) is None
    assert session_id(Headers([(b"x-session-id", b"\xff\xfe")]), None) is None


# --- bad input -------------------------------------------------------------------------------------------------

HUGE = "x" * 5_000_000


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({}, None),
        (None, None),
        ({}, []),
        ({}, [{"metadata": {"user_id": json_user_id()}}]),
        ({}, "not json"),
        ({}, b"bytes"),
        ({}, 42),
        ({}, {"metadata": "user_x_session_y"}),
        ({}, {"metadata": {"user_id": 12345}}),
        ({}, {"metadata": {"user_id": ["user_x_account__session_y"]}}),
        ({}, {"metadata": {"user_id": None}}),
        ({}, {"system": 7}),
        ({}, {"system": [None, 1, "You are Cline, ", {"type": "text", "text": 5}, {"type": "image"}]}),
        ({}, {"system": {"type": "text", "text": "You are Cline, "}}),
        ({}, {"system": HUGE, "metadata": {"user_id": HUGE}, "messages": [HUGE] * 3}),
        ({}, {"metadata": {"user_id": "user_x_account__session_" + HUGE}}),
        ({"user-agent": 5, "x-session-id": None, 3: "x", "x-app": b"cli"}, None),
        ({"User-Agent": HUGE, "anthropic-beta": HUGE, "x-session-id": "\n"}, None),
        ({"user-agent": "\x00\x01"}, None),
        ({"user-agent": ""}, None),
        ([("user-agent", "x")], None),
        ("user-agent: claude-cli/1.0", None),
    ],
)
def test_bad_input_never_raises(headers: Any, body: Any) -> None:
    d = detect(SIGS, headers, body)
    assert isinstance(d, Detection)
    assert d.session is None
    assert d.client in ("unknown", "claude-cli-compatible")  # b"cli" as x-app is accepted as a header value
    assert session_id(headers, body) is None
    assert d.user_agent is None or (len(d.user_agent) <= clients.USER_AGENT_MAX_CHARS and d.user_agent.isprintable())


def test_cline_prompt_not_in_first_text_block_is_not_cline() -> None:
    body = messages_body([{"type": "text", "text": "Something else"}, {"type": "text", "text": CLINE_PROMPT}])
    assert detect(SIGS, ts_sdk(), body).client == "anthropic-typescript"


def test_header_names_are_case_insensitive() -> None:
    for headers in ({"USER-AGENT": "LiteLLM/1.0"}, Headers(user_agent="LITELLM/1.0")):
        assert detect(SIGS, headers, None).client == "litellm"


# --- override --------------------------------------------------------------------------------------------------


def test_override_names_a_signature() -> None:
    headers = {**PI_OAUTH_HEADERS, "X-Gateway-Client": "Claude-Code"}
    d = detect(SIGS, headers, messages_body(PI_SYSTEM))
    assert (d.client, d.matched_by) == ("claude-code", "override header")
    assert find_signature(SIGS, d.client) is SIGS[0]


def test_override_names_any_token() -> None:
    headers = {OVERRIDE_HEADER: " nightly-eval.v2 ", "x-session-id": "s1", "User-Agent": "Anthropic/JS 0.1"}
    assert detect(SIGS, headers, None) == Detection("nightly-eval.v2", "s1", "Anthropic/JS 0.1", "override header")
    assert find_signature(SIGS, "nightly-eval.v2") is None


@pytest.mark.parametrize(
    "value", ["", "   ", "has space", "semi;colon", "a" * 65, "-leading-dash", "ünïcode", "x\x00y", HUGE]
)
def test_bad_override_is_ignored(value: str) -> None:
    d = detect(SIGS, {OVERRIDE_HEADER: value, "User-Agent": "litellm/1.0"}, None)
    assert (d.client, d.matched_by) == ("litellm", "user_agent litellm/*")


# --- the signature type ----------------------------------------------------------------------------------------


def test_signature_normalizes_its_fields() -> None:
    s = ClientSignature(
        "x",
        user_agent="a/*",
        headers=["x-a-*"],
        header_values={"X-App": "cli"},
        system_prompt="\nYou are X, ",
        metadata_user_id="u_*",
    )
    assert s.user_agent == (Glob("a/*"),)
    assert s.headers == (Glob("x-a-*"),)
    assert s.header_values == (("x-app", Glob("cli")),)
    assert s.system_prompt == ("You are X, ",)
    assert s.metadata_user_id == (Glob("u_*"),)
    same = ClientSignature(
        "x",
        user_agent=(Glob("a/*"),),
        headers=(Glob("x-a-*"),),
        header_values=(("x-app", Glob("cli")),),
        system_prompt=("You are X, ",),
        metadata_user_id=(Glob("u_*"),),
    )
    assert s == same and hash(s) == hash(same)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": ""},
        {"name": "x", "stream": "maybe"},
        {"name": "x", "user_agent": ("[bad",)},
        {"name": "x", "system_prompt": ("",)},
        {"name": "x", "headers": (5,)},
    ],
)
def test_signature_refuses_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        ClientSignature(**kwargs)


# --- property: never raises ------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
user_ids = st.one_of(
    st.text(),
    st.builds(lambda s: "user_" + s, st.text()),
    st.builds(lambda a, s: f"user_{a}_account__session_{s}", st.text(), st.text()),
    st.builds(lambda v: json.dumps({"session_id": v}), json_values),
    json_values,
)
systems = st.one_of(
    json_values,
    st.lists(
        st.one_of(
            json_values, st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]), "text": json_values})
        ),
        max_size=4,
    ),
)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={"metadata": st.one_of(json_values, st.fixed_dictionaries({"user_id": user_ids})), "system": systems},
    ),
)
header_names = st.one_of(
    st.sampled_from(
        [*clients.SESSION_SOURCES, "user-agent", "x-app", "anthropic-beta", OVERRIDE_HEADER, "X-Stainless-Lang"]
    ),
    st.text(min_size=1, max_size=20),
)
dict_headers = st.dictionaries(header_names, st.one_of(st.text(), st.binary(), st.none(), st.integers()), max_size=8)
raw_headers = st.lists(
    st.tuples(
        st.one_of(header_names.map(lambda s: s.encode("utf-8", "surrogatepass")), st.binary(min_size=1, max_size=20)),
        st.binary(),
    ),
    max_size=8,
).map(Headers)


@settings(max_examples=400, deadline=None)
@given(headers=st.one_of(dict_headers, raw_headers, json_values), body=bodies)
def test_arbitrary_input_never_raises(headers: Any, body: Any) -> None:
    d = detect(SIGS, headers, body)
    assert isinstance(d, Detection)
    assert isinstance(d.client, str) and d.client
    assert isinstance(d.matched_by, str) and d.matched_by
    for value in (d.session, session_id(headers, body)):
        assert value is None or (0 < len(value) <= clients.SESSION_MAX_CHARS and value.isprintable())
    assert d.session == session_id(headers, body)
    assert d.user_agent is None or d.user_agent.isprintable()


def _normalize_by_items(headers: Headers) -> dict[str, str]:
    """What `_normalize` gave before its one-pass read of mitmproxy's raw fields: `items()`, first name wins."""
    out: dict[str, str] = {}
    for name, value in islice(headers.items(), protocol_headers.MAX_HEADERS):
        out.setdefault(name.lower(), value)
    return out


@settings(max_examples=400, deadline=None)
@given(fields=st.lists(
    st.tuples(st.one_of(st.sampled_from([b"User-Agent", b"user-agent", b"X-App", b"x-app", b"\xc4\xb0d", b"\xc4\xb1d"]),
                        st.binary(min_size=1, max_size=6)), st.binary(max_size=8)),
    max_size=12))
def test_headers_are_read_from_their_raw_fields_as_items_would_give_them(fields) -> None:
    """Repeated names folded with ", ", case variants of one name together, undecodable bytes escaped, and
    past MAX_HEADERS distinct names the rest left out, exactly as mitmproxy's `Headers.items()` gives them."""
    headers = Headers(fields)
    assert protocol_headers.normalize(headers) == _normalize_by_items(headers)
    limit = protocol_headers.MAX_HEADERS
    protocol_headers.MAX_HEADERS = 2
    try:
        assert protocol_headers.normalize(headers) == _normalize_by_items(headers)
    finally:
        protocol_headers.MAX_HEADERS = limit
