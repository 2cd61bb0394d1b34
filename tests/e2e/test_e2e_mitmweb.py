"""End to end through a real mitmweb: what a person debugging an agent sees, read back through mitmweb's
own REST API (flows, comments, markers, the message contentview, commands) and, once, in headless
Chromium (Debian's `chromium`, installed by `scripts/test-tools`)."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

import sdk_client
from conftest import routed_rules
from fakes.upstream import Scenario, litellm_wrapped_error
from harness import ROOT, Gateway, free_port
from llm_gateway.protocol import messages

pytestmark = pytest.mark.e2e



def artifacts(tmp_path: Path) -> Path:
    """Where the screenshots for people go: the folder LLM_GATEWAY_ARTIFACTS names (CI keeps it), else the test's
    own temporary folder, so a run leaves nothing in the checkout."""
    folder = Path(os.environ["LLM_GATEWAY_ARTIFACTS"]) if os.environ.get("LLM_GATEWAY_ARTIFACTS") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder

CLIENTS = [
    {"name": "json-only", "headers": ["x-json-only"], "stream": "off"},
    {"name": "test-agent", "headers": ["x-test-agent"]},
]
WEB_COLUMNS = ["tls", "icon", "path", "method", "status", "size", "time", "comment"]
XSRF = "00112233445566778899aabbccddeeff"  # tornado's double-submit check: the same value as cookie and header

THINKING = {"type": "thinking", "thinking": "The user asks about Paris weather.", "signature": "c2ln"}
TEXT = {"type": "text", "text": "Let me look up the forecast for Paris."}
TOOL = {"type": "tool_use", "id": "toolu_01Web", "name": "get_weather", "input": {"city": "Paris", "unit": "celsius"}}


class WebApi:
    """mitmweb's REST API, authenticated with its token."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url, self.token = url, token

    def call(self, method: str, path: str, body=None, *, token: bool = True):
        headers = {"Authorization": f"Bearer {self.token}"} if token else {}
        data = None
        if method != "GET":
            headers |= {"Cookie": f"_mitmproxy_xsrf={XSRF}", "X-XSRFToken": XSRF}
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        req = urllib.request.Request(self.url + path.lstrip("/"), data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw and resp.headers.get_content_type() == "application/json" else raw

    def get(self, path: str):
        return self.call("GET", path)

    def flows(self, test_id: str, count: int = 1, timeout: float = 10) -> list[dict]:
        """The finished flows whose request carried `x-test-id: test_id`, waiting for `count` of them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [
                f for f in self.get("/flows")
                if ["x-test-id", test_id] in [list(h) for h in f["request"]["headers"]]
                and (f.get("response") and f["response"]["timestamp_end"] or f.get("error"))
                and f["comment"]
            ]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def view(self, flow_id: str, name: str = "llm-message") -> dict:
        return self.get(f"/flows/{flow_id}/response/content/{name}.json")


@pytest.fixture(scope="module")
def web(module_fake):
    columns = [arg for col in WEB_COLUMNS for arg in ("--set", f"web_columns={col}")]  # as scripts/gateway --web
    gw = Gateway(routed_rules(module_fake.url, clients=CLIENTS), tool="mitmweb", extra_args=tuple(columns)).start()
    try:
        yield gw, WebApi(gw.web_url, gw.web_token)
    finally:
        gw.stop()


def call(gw: Gateway, kind: str, scenario: Scenario | None = None, **headers: str) -> tuple[str, dict]:
    test_id = uuid.uuid4().hex[:12]
    headers = {"x-test-id": test_id, **headers}
    if scenario is not None:
        headers["x-fake-scenario"] = scenario.to_header()
    return test_id, sdk_client.run(kind, base_url=gw.base_url, headers=headers)


def test_streamed_answer_reads_as_the_assembled_message(web):
    gw, api = web
    session = str(uuid.uuid4())
    test_id, result = call(gw, "stream", Scenario.reply(THINKING, TEXT, TOOL), **{"x-test-agent": "1", "x-session-id": session})
    assert result["ok"], result
    [flow] = api.flows(test_id)
    assert flow["comment"] == f"$? test-agent {session[:8]} · hit 32% · asked api.anthropic.com/v1/messages · in 21 out 9 cache r13 w7"
    assert flow["marked"] == ""
    # the body was kept for viewing: exactly the events the client assembled its message from
    assert flow["response"]["contentLength"] > 0
    body = api.get(f"/flows/{flow['id']}/response/content.data")
    kept = messages.message_from_sse(body)
    assert kept.complete and sdk_client.without_nulls(kept.message) == sdk_client.without_nulls(result["message"])

    view = api.view(flow["id"])
    assert view["view_name"] == "llm-message"
    text = view["text"]
    assert text.splitlines()[1:4] == [
        "stop reason: tool_use",
        "tokens: input 21 · output 9",
        "cache: read 13 · write 7 (5m 7, 1h 0) · hit 32%",
    ]
    assert "── [0] thinking\nThe user asks about Paris weather." in text
    assert "── [1] text\nLet me look up the forecast for Paris." in text
    tool = text.split("── [2] tool_use get_weather (toolu_01Web)\n", 1)[1]
    assert json.loads(tool) == TOOL["input"]
    assert "event: content_block_delta" not in text
    assert api.view(flow["id"], "auto")["view_name"] == "llm-message"  # chosen without asking


def test_json_answer_and_converted_stream(web):
    gw, api = web
    test_id, result = call(gw, "create", Scenario.reply(TEXT), **{"x-test-agent": "1"})
    assert result["ok"], result
    [flow] = api.flows(test_id)
    assert flow["comment"] == "$? test-agent · hit 32% · asked api.anthropic.com/v1/messages · in 21 out 9 cache r13 w7"
    view = api.view(flow["id"], "auto")
    assert view["view_name"] == "llm-message" and "── [0] text\nLet me look up the forecast for Paris." in view["text"]

    test_id, result = call(gw, "stream", Scenario.reply(TEXT), **{"x-json-only": "1"})
    assert result["ok"], result
    [flow] = api.flows(test_id)
    assert flow["comment"] == "$? json-only · hit 32% · asked api.anthropic.com/v1/messages · stream forced off, converted json->sse · in 21 out 9 cache r13 w7"
    assert "Let me look up the forecast for Paris." in api.view(flow["id"], "auto")["text"]


def test_errors_are_marked_and_say_what_was_unwrapped(web):
    gw, api = web
    test_id, result = call(gw, "create", Scenario.error(529), **{"x-test-agent": "1"})
    assert result["status"] == 529
    [flow] = api.flows(test_id)
    assert flow["marked"] == "❌" and flow["comment"] == "test-agent · error overloaded_error · asked api.anthropic.com/v1/messages"

    test_id, result = call(gw, "create", litellm_wrapped_error(429))
    assert result["status"] == 429 and result["type"] == "rate_limit_error"
    [flow] = api.flows(test_id)
    assert flow["marked"] == "❌"
    assert flow["comment"] == "unknown · error rate_limit_error unwrapped from litellm-passthrough 429 · asked api.anthropic.com/v1/messages"


def test_cache_break_is_marked(web):
    gw, api = web
    session = f"cb-{uuid.uuid4().hex[:6]}"
    first, result = call(gw, "create", Scenario.reply(TEXT), **{"x-session-id": session})
    assert result["ok"], result
    second, result = call(gw, "stream", Scenario.reply(TEXT, usage={"cache_read_input_tokens": 0}),
                          **{"x-session-id": session})
    assert result["ok"], result
    [one], [two] = api.flows(first), api.flows(second)
    assert one["marked"] == ""
    assert two["marked"] == "⚠"
    assert two["comment"] == (  # the fake's fixed usage: a 28-token prompt, which no model caches
        f"$? unknown {session[:8]} · hit 0% CACHE BREAK below_minimum · asked api.anthropic.com/v1/messages · in 21 out 9 cache r0 w7 · lost 20 cached tokens: "
        "below_minimum (prompt of 28 tokens; claude-test-1 caches from 1024)")


def test_stream_copy_is_bounded_and_forwarding_is_untouched(web):
    gw, api = web
    long_text = {"type": "text", "text": " ".join(["word"] * 3000)}
    api.call("PUT", "/options", {"gateway_keep_stream_body": "2k"})
    try:
        test_id, result = call(gw, "stream", Scenario.reply(long_text))
    finally:
        api.call("PUT", "/options", {"gateway_keep_stream_body": "4m"})
    assert result["ok"], result
    assert result["message"]["content"][0]["text"] == long_text["text"]  # the client got all of it
    [flow] = api.flows(test_id)
    assert 0 < flow["response"]["contentLength"] <= 2048
    assert "body copy cut at" in flow["comment"]
    assert api.view(flow["id"])["text"].startswith("NOTE: only the first")


def test_keeping_the_copy_sends_nothing_twice(web):
    """Two streamed answers on one keep-alive connection: each arrives exactly once, whole, and equal to
    the copy mitmweb shows (a re-sent body or a wrong length would break the second exchange)."""
    gw, api = web
    test_id = uuid.uuid4().hex[:12]
    conn = http.client.HTTPConnection("127.0.0.1", gw.reverse_port, timeout=10)
    bodies = []
    try:
        for n in range(2):
            spec = Scenario.reply({"type": "text", "text": f"answer number {n}"})
            conn.request(
                "POST", "/v1/messages",
                body=json.dumps({"model": "claude-test-1", "max_tokens": 9, "stream": True, "messages": []}),
                headers={"content-type": "application/json", "x-api-key": "sk-ant-test", "x-test-id": test_id,
                         "x-fake-scenario": spec.to_header()},
            )
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
            bodies.append(resp.read())
    finally:
        conn.close()
    flows = sorted(api.flows(test_id, count=2), key=lambda f: f["timestamp_created"])
    assert len(flows) == 2
    for n, (flow, body) in enumerate(zip(flows, bodies)):
        acc = messages.message_from_sse(body)
        assert acc.complete and not acc.malformed and acc.message["content"][0]["text"] == f"answer number {n}"
        assert api.get(f"/flows/{flow['id']}/response/content.data") == body
        assert flow["response"]["contentLength"] == len(body)


def test_gateway_commands_through_the_rest_api(web):
    gw, api = web
    commands = api.get("/commands")
    assert "Running totals per client" in commands["gateway.stats"]["help"]
    assert "Reload the gateway's rule file" in commands["gateway.reload"]["help"]
    test_id, result = call(gw, "create", Scenario.reply(TEXT), **{"x-test-agent": "1"})
    assert result["ok"], result
    api.flows(test_id)
    stats = api.call("POST", "/commands/gateway.stats")["value"]
    line = next(line for line in stats.splitlines() if line.startswith("test-agent: "))
    assert int(line.split()[1]) >= 1 and "hit 32%" in line
    before = gw.output().count("rules reloaded from")
    assert api.call("POST", "/commands/gateway.reload") == {"value": None}
    gw.wait_for_output("rules reloaded from", after=len(gw.output()) - 2000)
    assert gw.output().count("rules reloaded from") == before + 1


def test_rest_api_needs_the_token(web):
    gw, api = web
    with pytest.raises(urllib.error.HTTPError) as e:
        api.call("GET", "/flows", token=False)
    assert e.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as e:
        WebApi(gw.web_url, "wrong").get("/flows")
    assert e.value.code == 403


# --- scripts/gateway --web ------------------------------------------------------------------------


def test_scripts_gateway_web_prints_its_url_and_serves_the_api(module_fake, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(routed_rules(module_fake.url, clients=CLIENTS))
    base_port, web_port = free_port(), free_port()
    out_path = tmp_path / "gateway.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [str(ROOT / "scripts" / "gateway"), "--web", "--egress-port", "0", "--base-port", str(base_port),
             "--web-port", str(web_port), "--rules", str(rules), "--confdir", str(tmp_path / "confdir"),
             "--", "--set", "connection_strategy=lazy", "--set", f"gateway_log={tmp_path / 'usage.jsonl'}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180  # the script may first install the project into its venv
        while "Web server listening at" not in out_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, out_path.read_text()
            time.sleep(0.1)
        output = out_path.read_text()
        assert f"mitmweb UI:     http://127.0.0.1:{web_port}/" in output
        token = output.split(f"Web server listening at http://127.0.0.1:{web_port}/?token=", 1)[1].split()[0]
        api = WebApi(f"http://127.0.0.1:{web_port}/", token)
        assert api.get("/options")["web_columns"]["value"][-1] == "comment"
        result = sdk_client.run("create", base_url=f"http://127.0.0.1:{base_port}",
                                headers={"x-test-agent": "1", "x-test-id": "via-script"})
        assert result["ok"], result
        [flow] = api.flows("via-script")
        assert flow["comment"].startswith("$? test-agent · hit 32%")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)


# --- headless Chromium ----------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-proxy-server",
    "--window-size=1400,1000", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
]


class Chromium:
    """Headless Chromium driven over the DevTools protocol (tornado's websocket client, from mitmproxy)."""

    def __init__(self, url: str) -> None:
        binary = shutil.which("chromium")
        assert binary, "chromium is missing: run scripts/test-tools --only chromium"
        self.profile = Path(tempfile.mkdtemp(prefix="llmgw-chromium-"))
        self.log = open(self.profile.parent / f"{self.profile.name}.log", "wb")
        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", url],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self.loop = asyncio.new_event_loop()
        self.ws = None
        self.next_id = 0

    def connect(self, timeout: float = 30) -> None:
        from tornado.websocket import websocket_connect

        deadline = time.monotonic() + timeout
        port_file = self.profile / "DevToolsActivePort"
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            assert self.proc.poll() is None, f"chromium exited: {Path(self.log.name).read_text(errors='replace')}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as resp:
                pages = [t for t in json.load(resp) if t["type"] == "page"]
            if pages:
                break
            assert time.monotonic() < deadline, "chromium has no page"
            time.sleep(0.1)
        async def open_socket():  # tornado binds its futures to the running loop: make them inside it
            return await websocket_connect(pages[0]["webSocketDebuggerUrl"], max_message_size=64 << 20)

        self.ws = self.loop.run_until_complete(asyncio.wait_for(open_socket(), 10))

    def send(self, method: str, timeout: float = 15, **params):
        self.next_id += 1
        request_id = self.next_id

        async def roundtrip():
            await self.ws.write_message(json.dumps({"id": request_id, "method": method, "params": params}))
            while True:
                message = await self.ws.read_message()
                assert message is not None, "DevTools connection closed"
                data = json.loads(message)
                if data.get("id") == request_id:
                    assert "error" not in data, data["error"]
                    return data["result"]

        return self.loop.run_until_complete(asyncio.wait_for(roundtrip(), timeout))

    def page_text(self) -> str:
        result = self.send("Runtime.evaluate", expression="document.body ? document.body.innerText : ''")
        return result["result"].get("value", "")

    def wait_for_text(self, *needles: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.page_text()
            if all(n in text for n in needles) or time.monotonic() > deadline:
                return text
            time.sleep(0.2)

    def screenshot(self, path: Path) -> bytes:
        png = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        return png

    def close(self) -> None:
        if self.ws is not None:
            async def close_socket():
                self.ws.close()

            self.loop.run_until_complete(close_socket())
        self.loop.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


def visible_comment_prefix(browser: "Chromium", comment: str) -> str:
    """The part of `comment` that the flow list's Comment cell shows on screen (the rest is cut off)."""
    script = """
    (() => {
      const want = %s;
      const cell = [...document.querySelectorAll("td.col-comment")].find(td => td.textContent === want);
      if (!cell || !cell.firstChild) return null;
      const style = getComputedStyle(cell);
      let limit = cell.getBoundingClientRect().right - parseFloat(style.paddingRight);
      if (cell.scrollWidth > cell.clientWidth) {  // cut off: the ellipsis covers the end of what fits
        const probe = document.createElement("span");
        probe.style.font = style.font; probe.textContent = "\u2026";
        document.body.appendChild(probe);
        limit -= probe.getBoundingClientRect().width;
        probe.remove();
      }
      const node = cell.firstChild, range = document.createRange();
      let shown = 0;
      for (let i = 1; i <= node.length; i++) {
        range.setStart(node, 0); range.setEnd(node, i);
        if (range.getBoundingClientRect().right > limit) break;
        shown = i;
      }
      return want.slice(0, shown);
    })()""" % json.dumps(comment)
    deadline = time.monotonic() + 30
    while True:
        value = browser.send("Runtime.evaluate", expression=script)["result"].get("value")
        if value is not None or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_mitmweb_flow_list_shows_cost_and_client_and_the_request_reads_as_messages_in_chromium(web, tmp_path):
    """What a person sees: in the flow list, the Comment column's visible part names cost and client; the
    flow's request tab shows the conversation, the response tab the assembled message (screenshots kept)."""
    gw, api = web
    test_id = uuid.uuid4().hex[:12]
    session = str(uuid.uuid4())
    headers = {"x-test-id": test_id, "x-test-agent": "1", "x-session-id": session,
               "x-fake-scenario": Scenario.reply(THINKING, TEXT, TOOL).to_header()}
    result = sdk_client.run("stream", base_url=gw.base_url, headers=headers, model="claude-sonnet-4-6")
    assert result["ok"], result
    [flow] = api.flows(test_id)
    comment = flow["comment"]
    cost = comment.split(" ", 1)[0]
    assert cost.endswith("¢") and cost not in ("0¢", "<0.01¢"), comment  # priced: genai-prices knows the model
    assert comment.startswith(f"{cost} test-agent {session[:8]} · hit 32%"), comment
    shots = artifacts(tmp_path)
    browser = Chromium(f"{gw.web_url}?token={gw.web_token}#/flows")
    try:
        browser.connect()
        shown = visible_comment_prefix(browser, comment)
        list_png = browser.screenshot(shots / "mitmweb-flow-list.png")
        # mitmweb reads the flow to show from the URL when it loads
        browser.send("Runtime.evaluate", expression=f"location.hash = '#/flows/{flow['id']}/request'; location.reload()")
        request_text = browser.wait_for_text("══ message 0 · user", "request · model claude-sonnet-4-6")
        browser.screenshot(shots / "mitmweb-llm-request.png")
        browser.send("Runtime.evaluate", expression=f"location.hash = '#/flows/{flow['id']}/response'; location.reload()")
        text = browser.wait_for_text("Let me look up the forecast for Paris.", "get_weather (toolu_01Web)")
        png = browser.screenshot(shots / "mitmweb-llm-message.png")
    finally:
        browser.close()
    assert shown is not None, "the flow's Comment cell is not in the flow list"
    assert shown.startswith(f"{cost} test-agent"), f"the flow list shows only {shown!r} of {comment!r}"
    assert list_png.startswith(b"\x89PNG\r\n\x1a\n") and len(list_png) > 10_000
    # the request: readable messages, chosen by mitmweb itself; the raw JSON is the other view
    assert "request · model claude-sonnet-4-6" in request_text and "══ message 0 · user\nhello" in request_text
    assert "llm-message" in request_text
    # the response: the assembled message
    assert "Let me look up the forecast for Paris." in text, text[:3000]
    assert "── [2] tool_use get_weather (toolu_01Web)" in text
    assert "cache: read 13 · write 7 (5m 7, 1h 0) · hit 32%" in text
    assert "event: content_block_delta" not in text
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
