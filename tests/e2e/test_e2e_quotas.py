"""End to end: spend and rate limits (the `quotas` rules) through real mitmdump replicas sharing a real
redis-server (Debian's package, scripts/test-tools --only redis), with the real Anthropic SDK and Claude Code."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import anthropic
import pytest

import realclients
import sdk_client
from conftest import routed_rules
from fakes.upstream import Scenario
from harness import free_port

pytestmark = pytest.mark.e2e

MODEL = "claude-sonnet-4-5"  # $3 / $15 per million input / output tokens (genai-prices)
MAX_TOKENS = 600  # the output reserved: 600 x $15 / 1e6 = $0.009 per exchange
# what each answer reports: 600 output tokens, like the reservation, so a test can count dollars
USAGE = {"input_tokens": 10, "output_tokens": 600, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
COST = (10 * 3 + 600 * 15) / 1e6  # US dollars per answered exchange


class RedisServer:
    """A real redis-server on 127.0.0.1, a free port, a temp dir, nothing persisted; stopped by its pid."""

    def __init__(self, port: int | None = None, password: str | None = None, cluster: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run scripts/test-tools --only redis")
        self.binary = binary
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="llmgw-redis-")
        self.proc: subprocess.Popen | None = None
        self.password = password
        self.cluster = cluster
        self._log = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        if self._log is not None:  # a restart: the last run's words are no longer news
            self._log.close()
        self._log = tempfile.TemporaryFile()  # redis-server's own words, shown if it does not start
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--protected-mode", "yes", *(["--requirepass", self.password] if self.password else []),
             # the cluster bus defaults to port + 10000, which a free port above 55535 cannot have: give it its own
             *(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-port", str(free_port())]
               if self.cluster else [])],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                import socket

                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return self._own_every_slot() if self.cluster else self
            except OSError:
                if self.proc.poll() is not None:  # it exited: waiting longer cannot help
                    break
                time.sleep(0.05)
        self.stop()
        self._log.seek(0)
        raise TimeoutError("redis-server did not start:\n" + self._log.read().decode(errors="replace")[-2000:])

    def _own_every_slot(self) -> "RedisServer":
        """A one-node Redis Cluster: this node serves all 16384 slots."""
        cli = [shutil.which("redis-cli") or "redis-cli", "-h", "127.0.0.1", "-p", str(self.port)]
        subprocess.run([*cli, "cluster", "addslotsrange", "0", "16383"], check=True, capture_output=True, timeout=10)
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in subprocess.run([*cli, "cluster", "info"], capture_output=True,
                                                         timeout=10).stdout:
            if time.monotonic() > deadline:
                raise TimeoutError("the one-node cluster did not come up")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.close()


def quota_rules(fake_url: str, section: str) -> str:
    return routed_rules(fake_url, "quotas:\n" + section)


def sdk(gw, session: str = "s-1", retries: int = 2, scenario: Scenario | None = None) -> anthropic.Anthropic:
    headers = {"x-claude-code-session-id": session}
    if scenario is not None:
        headers["x-fake-scenario"] = scenario.to_header()
    return anthropic.Anthropic(base_url=gw.base_url, api_key="sk-ant-test", max_retries=retries,
                               default_headers=headers, timeout=30)


def ask(client: anthropic.Anthropic):
    return client.messages.with_raw_response.create(
        model=MODEL, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": "hi"}])


def outcome(client: anthropic.Anthropic):
    """("ok", raw response) or (the SDK's exception class name, the exception)."""
    try:
        return "ok", ask(client)
    except anthropic.APIStatusError as e:
        return type(e).__name__, e


def test_parallel_requests_in_one_session_admit_only_what_fits_the_budget(fake, gateway_factory, redis_server):
    """20 parallel requests, one session, a $0.05 budget: reservations of in-flight exchanges count, so only what
    fits is admitted (overspend at most one exchange's estimate); the rest get the billing_error shape of Claude
    Code's gateway protocol, which the SDK raises without retrying."""
    gw = gateway_factory(quota_rules(fake.url, f"""\
  store: {redis_server.url}
  budgets:
    - {{name: per-session, per: session, usd: {{daily: 0.05}}}}
"""))
    client = sdk(gw, "swarm", retries=3, scenario=Scenario(usage=USAGE, delay=1.0))
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: outcome(client), range(20)))
    ok = [r for kind, r in results if kind == "ok"]
    refused = [r for kind, r in results if kind != "ok"]
    assert 0 < len(ok) < 20 and len(ok) + len(refused) == 20
    assert len(ok) * COST <= 0.05 + COST  # at most one exchange's estimate over the cap
    assert len(ok) == 6  # admitted while spent + held < $0.05: 0, .009, …, .045 held
    assert len(fake.messages_requests()) == len(ok)
    for e in refused:
        assert type(e).__name__ == "RateLimitError" and e.status_code == 429
        assert e.body["type"] == "error" and e.body["error"]["type"] == "billing_error"
        assert e.body["error"]["details"] == {"error_code": "spend_limit_reached"}
        assert "per-session" in e.body["error"]["message"] and "resets at" in e.body["error"]["message"]
        h = e.response.headers
        assert h["x-should-retry"] == "false" and int(h["retry-after"]) > 0
        assert h["anthropic-ratelimit-unified-status"] == "rejected"
        assert h["anthropic-ratelimit-unified-overage-utilization"] == "1"
        assert h["anthropic-ratelimit-unified-overage-period"] == "daily"
        assert h["anthropic-ratelimit-unified-overage-disabled-reason"] == "org_spend_cap_reached"
        assert int(h["anthropic-ratelimit-unified-reset"]) > time.time()
        assert "anthropic-ratelimit-unified-representative-claim" not in h
    # the SDK did not retry: one record per request, and every refusal says by which limit
    records = gw.wait_records(None, 20)
    assert len(records) == 20
    assert sorted(r["quota_refused"] or "-" for r in records) == ["-"] * 6 + ["per-session"] * 14
    assert all(r["quota_limits"] == ["per-session"] for r in records)
    assert {r["reason"] for r in records if r["quota_refused"]} == {"spend_limit_reached"}
    assert "quota refused" in gw.wait_for_output("quota refused")
    with urllib.request.urlopen(gw.base_url + "/-/metrics", timeout=5) as answer:
        metrics = answer.read().decode()
    assert 'llm_gateway_quota_refusals_total{limit="per-session",reason="spend_limit_reached"} 14.0' in metrics
    assert 'llm_gateway_quota_spend_usd_total{limit="per-session"}' in metrics
    # the caller's own standing replaced the upstream's headers on the admitted answers
    for raw in ok:
        assert raw.headers["anthropic-ratelimit-unified-representative-claim"] == "overage"
        assert float(raw.headers["anthropic-ratelimit-unified-overage-utilization"]) < 1


def test_the_standing_headers_cross_75_and_95_percent(fake, gateway_factory, redis_server):
    gw = gateway_factory(quota_rules(fake.url, f"""\
  store: {redis_server.url}
  budgets:
    - {{name: mine, per: session, usd: {{total: 0.0095}}}}
"""))
    client = sdk(gw, "notice", scenario=Scenario(usage={**USAGE, "output_tokens": 200},
                                                  ratelimit={"requests-remaining": 7}))
    seen = []
    for _ in range(3):  # $0.00303 each: 0 %, 32 %, 64 % before the answer
        raw = ask(client)
        assert "anthropic-ratelimit-requests-remaining" not in raw.headers  # the upstream's own: removed
        seen.append(raw.headers.get("anthropic-ratelimit-unified-overage-surpassed-threshold"))
        time.sleep(0.5)  # settlement runs after the answer
    raw = ask(client)  # 96 % spent
    assert raw.headers["anthropic-ratelimit-unified-status"] == "allowed_warning"
    assert raw.headers["anthropic-ratelimit-unified-overage-surpassed-threshold"] == "0.95"
    assert seen == [None, None, None]
    assert "anthropic-ratelimit-unified-reset" not in raw.headers  # a total budget never resets


def test_two_replicas_sharing_one_redis_enforce_one_budget(fake, gateway_factory, redis_server):
    rules = quota_rules(fake.url, f"""\
  store: {redis_server.url}
  budgets:
    - {{name: shared, per: session, usd: {{total: 0.02}}}}
""")
    a, b = gateway_factory(rules), gateway_factory(rules)
    kinds = []
    for gw in (a, b, a, b, a):
        kinds.append(outcome(sdk(gw, "one-agent", scenario=Scenario(usage=USAGE)))[0])
        time.sleep(0.3)
    # $0.009 each: admitted at 0, .009 and .018 spent (below .02), then refused by either replica
    assert kinds == ["ok", "ok", "ok", "RateLimitError", "RateLimitError"]
    assert len(fake.messages_requests()) == 3


def test_redis_stopped_mid_run_open_serves_closed_refuses_and_both_recover(fake, gateway_factory, redis_server):
    section = f"""\
  store: {redis_server.url}
  budgets:
    - {{name: b, per: session, usd: {{daily: 5}}}}
"""
    open_gw = gateway_factory(quota_rules(fake.url, section + "  on_store_error: open\n"))
    closed_gw = gateway_factory(quota_rules(fake.url, section + "  on_store_error: closed\n"))
    scenario = Scenario(usage=USAGE)
    assert outcome(sdk(open_gw, scenario=scenario))[0] == "ok"
    assert outcome(sdk(closed_gw, scenario=scenario))[0] == "ok"
    redis_server.stop()
    assert outcome(sdk(open_gw, scenario=scenario))[0] == "ok"
    kind, e = outcome(sdk(closed_gw, retries=2, scenario=scenario))
    assert kind == "RateLimitError" and e.status_code == 429
    assert e.response.headers["x-should-retry"] == "false"
    assert e.response.headers["anthropic-ratelimit-unified-overage-disabled-reason"] == "fetch_error"
    assert e.body["error"]["type"] == "billing_error" and "details" not in e.body["error"]
    assert "counting in this process only" in open_gw.wait_for_output("on_store_error: open")
    with urllib.request.urlopen(open_gw.base_url + "/-/ready", timeout=5) as ready:
        assert ready.status == 200
    redis_server.start()
    time.sleep(0.5)
    assert outcome(sdk(closed_gw, scenario=scenario))[0] == "ok"
    assert outcome(sdk(open_gw, scenario=scenario))[0] == "ok"
    refused = closed_gw.wait_record(lambda r: r.get("quota_refused") == "store")
    assert refused["reason"] == "fetch_error" and refused["status"] == 429


def test_a_killed_replica_frees_its_reservations_when_they_expire(fake, gateway_factory, redis_server):
    rules = quota_rules(fake.url, f"""\
  store: {redis_server.url}
  reservation_ttl: 3
  budgets:
    - {{name: tight, per: session, usd: {{total: 0.009}}}}
""")
    doomed, survivor = gateway_factory(rules), gateway_factory(rules)
    def held() -> None:
        try:
            ask(sdk(doomed, "held", retries=0, scenario=Scenario(hang=True)))
        except anthropic.APIError:  # the replica dies under it
            pass

    hung = threading.Thread(target=held, daemon=True)
    hung.start()
    fake.wait_for_requests(1)  # admitted: $0.009 of $0.009 reserved
    os.killpg(doomed.proc.pid, signal.SIGKILL)
    doomed.proc.wait(5)
    killed_at = time.monotonic()
    kind, e = outcome(sdk(survivor, "held", retries=0, scenario=Scenario(usage=USAGE)))
    assert kind == "RateLimitError" and "in flight" in e.body["error"]["message"]
    while time.monotonic() - killed_at < 3.5:
        time.sleep(0.1)
    assert outcome(sdk(survivor, "held", retries=0, scenario=Scenario(usage=USAGE)))[0] == "ok"


def test_a_rate_limit_answers_429_with_retry_after_and_admits_after_the_window(fake, gateway_factory, redis_server):
    gw = gateway_factory(quota_rules(fake.url, f"""\
  store: {redis_server.url}
  rates:
    - {{name: burst, per: session, per_minute: {{requests: 2}}}}
"""))
    while 50 < time.time() % 60 or time.time() % 60 < 1:  # not across a minute's end while counting
        time.sleep(0.5)
    client = sdk(gw, "fast", retries=0, scenario=Scenario(usage=USAGE))
    assert [outcome(client)[0] for _ in range(2)] == ["ok", "ok"]
    kind, e = outcome(client)
    assert kind == "RateLimitError" and e.body["error"]["type"] == "rate_limit_error"
    wait = int(e.response.headers["retry-after"])
    assert 0 < wait <= 60 and e.response.headers["x-should-retry"] == "true"
    time.sleep(wait + 0.5)
    assert outcome(client)[0] == "ok"
    assert gw.wait_record(lambda r: r.get("quota_refused") == "burst")["reason"] == "rate_limited"


def test_count_tokens_is_never_refused(fake, gateway_factory):
    gw = gateway_factory(quota_rules(fake.url, """\
  budgets:
    - {name: none-left, usd: {total: 0.000001}}
"""))
    client = sdk(gw, "c", retries=0, scenario=Scenario(usage=USAGE))
    assert outcome(client)[0] == "ok"  # spends the pool
    time.sleep(0.3)
    kind, e = outcome(client)
    assert kind == "RateLimitError" and "details" not in e.body["error"]  # a pool: the group form
    assert e.response.headers["anthropic-ratelimit-unified-overage-scope"] == "group_pool"
    request = urllib.request.Request(
        gw.base_url + "/v1/messages/count_tokens", method="POST",
        data=json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"content-type": "application/json", "x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def test_claude_code_gets_the_spend_limit_in_its_own_words_and_does_not_retry(fake, gateway_factory, redis_server):
    gw = gateway_factory(quota_rules(fake.url, f"""\
  store: {redis_server.url}
  budgets:
    - {{name: claude-code-daily, per: client, match: {{client: claude-code}}, usd: {{daily: 0.000001}}}}
"""))
    fake.script(Scenario(text="first answer", usage=USAGE))
    first = realclients.run_claude("hello", base_url=gw.base_url)
    assert first.returncode == 0, first.stderr
    first_records = gw.wait_records(lambda r: r["client"] == "claude-code", 1)
    assert first_records and first_records[0]["quota_limits"] == ["claude-code-daily"]
    time.sleep(0.3)
    before = len(fake.messages_requests())
    done = realclients.run_claude("hello again", base_url=gw.base_url, env_extra={"CLAUDE_CODE_MAX_RETRIES": "5"},
                                  timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "claude-code-daily" in out, out  # the message reached the user
    assert len(fake.messages_requests()) == before  # nothing went upstream
    refused = gw.wait_records(lambda r: r.get("quota_refused") == "claude-code-daily", 1)
    assert len(refused) == 1  # x-should-retry: false held Claude Code back, five retries allowed


def test_egress_mode_is_admitted_before_upstream_too(fake, gateway_factory):
    """HTTPS_PROXY (egress) traffic counts against the same budgets, with the memory store."""
    gw = gateway_factory(quota_rules(fake.url, """\
  budgets:
    - {name: egress-pool, usd: {daily: 0.000001}}
"""))
    env = {"HTTPS_PROXY": gw.proxy_url, "SSL_CERT_FILE": str(gw.ca_bundle())}
    scenario = {"x-fake-scenario": Scenario(usage=USAGE).to_header()}
    assert sdk_client.run("create", env=env, headers=scenario, model=MODEL)["ok"]
    time.sleep(0.3)
    refused = sdk_client.run("create", env=env, headers=scenario, model=MODEL, max_retries=2)
    assert not refused["ok"] and refused["status"] == 429 and refused["type"] == "billing_error", refused
    assert len(fake.messages_requests()) == 1
    records = gw.wait_records(None, 2)
    assert [r["mode"] for r in records] == ["regular", "regular"] and records[1]["quota_refused"] == "egress-pool"


def test_claude_code_receives_the_usage_notice_headers_it_reads(fake, gateway_factory, redis_server, tmp_path):
    """Past 75 % of a cap, what reaches Claude Code (mitmdump's own saved flows: the answer as sent) carries the
    `anthropic-ratelimit-unified-*` standing it shows its notice from, and none of the upstream's own headers."""
    from mitmproxy import http as mhttp
    from mitmproxy import io as mio

    saved = tmp_path / "flows.mitm"
    gw = gateway_factory(quota_rules(fake.url, f"""\
  store: {redis_server.url}
  budgets:
    - {{name: team, usd: {{daily: 0.0112}}}}
"""), extra_args=("-w", str(saved)))
    assert outcome(sdk(gw, "before", scenario=Scenario(usage=USAGE)))[0] == "ok"  # $0.00903 of $0.0112: 80 %
    time.sleep(0.3)
    fake.script(*[Scenario(text="noticed", usage={**USAGE, "output_tokens": 1}, ratelimit={"requests-remaining": 5})
                  for _ in range(4)])
    done = realclients.run_claude("hello", base_url=gw.base_url)
    assert done.returncode == 0, done.stderr
    gw.stop()  # the flow file is complete
    with open(saved, "rb") as f:
        flows = [x for x in mio.FlowReader(f).stream() if isinstance(x, mhttp.HTTPFlow)]
    cc = [x for x in flows if x.request.path.startswith("/v1/messages") and "count_tokens" not in x.request.path
          and x.request.headers.get("x-claude-code-session-id", "before") != "before"]
    assert cc, [x.request.path for x in flows]
    for flow in cc:
        h = flow.response.headers
        assert h["anthropic-ratelimit-unified-status"] == "allowed_warning"
        assert h["anthropic-ratelimit-unified-representative-claim"] == "overage"
        assert h["anthropic-ratelimit-unified-overage-status"] == "allowed_warning"
        assert float(h["anthropic-ratelimit-unified-overage-utilization"]) >= 0.75
        assert h["anthropic-ratelimit-unified-overage-surpassed-threshold"] == "0.75"
        assert int(h["anthropic-ratelimit-unified-reset"]) > time.time()
        assert "anthropic-ratelimit-requests-remaining" not in h


def test_a_client_leaving_mid_stream_is_charged_what_it_used_with_a_password_from_a_file(fake, gateway_factory, tmp_path):
    """The store's password comes from a file the rules name; a stream the client leaves is settled with the usage
    it reported (no reservation left held), and the counter holds exactly the record's cost."""
    import redis

    server = RedisServer(password="s3cret-for-the-test").start()
    try:
        (tmp_path / "redis-password").write_text("s3cret-for-the-test\n")
        gw = gateway_factory(quota_rules(fake.url, f"""\
  store: {server.url}
  password_file: {tmp_path / "redis-password"}
  budgets:
    - {{name: stream-cap, per: session, usd: {{total: 1}}}}
"""))
        body = {"model": MODEL, "max_tokens": MAX_TOKENS, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"x-claude-code-session-id": "leaver", "x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01",
                   "x-fake-scenario": Scenario(usage={**USAGE, "input_tokens": 5000}, burst=200, event_delay=0.05).to_header()}
        conn = http.client.HTTPConnection("127.0.0.1", gw.reverse_port, timeout=30)
        conn.request("POST", "/v1/messages", json.dumps(body), {**headers, "content-type": "application/json"})
        answer = conn.getresponse()
        assert answer.status == 200
        assert answer.headers["anthropic-ratelimit-unified-status"] == "allowed"
        for _ in range(12):  # message_start and a few deltas, then leave
            answer.readline()
        conn.sock.close()
        conn.close()
        record = gw.wait_record(lambda r: r["session"] == "leaver")
        assert record["complete"] is False and record["cost_usd"] > 0 and record["quota_limits"] == ["stream-cap"]
        store = redis.Redis.from_url(server.url, password="s3cret-for-the-test")
        [key] = [k for k in store.keys("*stream-cap*") if not k.endswith(b":r")]
        deadline = time.monotonic() + 5
        while int(store.hget(key, "held") or 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert int(store.hget(key, "held")) == 0
        assert int(store.hget(key, "spent")) == round(record["cost_usd"] * 1_000_000)
        store.close()
    finally:
        server.close()


def test_a_bad_quotas_section_on_reload_keeps_the_last_good_rules(fake, gateway_factory):
    good = quota_rules(fake.url, """\
  budgets:
    - {name: tiny, usd: {total: 0.000001}}
""")
    gw = gateway_factory(good)
    client = sdk(gw, "reload", retries=0, scenario=Scenario(usage=USAGE))
    assert outcome(client)[0] == "ok"
    time.sleep(0.3)
    gw.write_rules(good.replace("total: 0.000001", "total: -5"))
    text = gw.wait_for_output("quotas.budgets[0].usd.total must be a non-negative number")
    assert "rules.yaml:" in text
    assert outcome(client)[0] == "RateLimitError"  # the last good budget still holds


def test_a_redis_cluster_store_runs_the_scripts_on_one_slot(fake, gateway_factory):
    """`cluster: true`: redis-py's cluster client against a (one-node) Redis Cluster; the keys' one hash tag keeps
    every script on one slot, which the cluster requires."""
    server = RedisServer(cluster=True).start()
    try:
        gw = gateway_factory(quota_rules(fake.url, f"""\
  store: {server.url}
  cluster: true
  on_store_error: closed
  budgets:
    - {{name: clustered, per: session, usd: {{total: 0.01}}}}
    - {{name: clustered-pool, usd: {{daily: 100}}}}
"""))
        client = sdk(gw, "in-a-cluster", retries=0, scenario=Scenario(usage=USAGE))
        assert outcome(client)[0] == "ok"
        time.sleep(0.5)
        assert outcome(client)[0] == "ok"  # $0.00903 spent of $0.01
        time.sleep(0.5)
        kind, e = outcome(client)
        assert kind == "RateLimitError" and e.body["error"]["details"] == {"error_code": "spend_limit_reached"}
        assert "quota store" not in gw.output()  # no store failure: the cluster ran every script
        assert gw.wait_record(lambda r: r.get("quota_refused"))["quota_refused"] == "clustered"
    finally:
        server.close()


def test_another_spelling_of_the_messages_path_is_refused_too(fake, gateway_factory):
    """`/v1/messages/` is routed upstream like `/v1/messages`: it must not pass a budget that is spent (it went
    upstream uncounted: 200)."""
    gw = gateway_factory(quota_rules(fake.url, """\
  budgets:
    - {name: none-left, usd: {total: 0.000001}}
"""))
    assert outcome(sdk(gw, "p", retries=0, scenario=Scenario(usage=USAGE)))[0] == "ok"  # spends the pool
    time.sleep(0.3)
    request = urllib.request.Request(
        gw.base_url + "/v1/messages/", method="POST",
        data=json.dumps({"model": MODEL, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"content-type": "application/json", "x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01",
                 "x-claude-code-session-id": "p", "x-fake-scenario": Scenario(usage=USAGE).to_header()})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            status = answer.status
    except urllib.error.HTTPError as e:
        status, body = e.code, json.loads(e.read())
    assert status == 429 and body["error"]["type"] == "billing_error"
