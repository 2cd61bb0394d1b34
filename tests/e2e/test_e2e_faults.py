"""Faults end to end, through a real mitmdump: the upstream closes mid-stream, never answers, fails TLS or
speaks garbage; the client walks away mid-stream; LiteLLM restarts in the middle of traffic.

In every case the gateway keeps serving other flows (a good request runs during and after the fault),
writes exactly one usage record per exchange (`complete: false` where it ended early; `status` and
`error_type` what the client got, with a `reason`), never kills a connection itself (the client sees the
upstream's failure, or mitmproxy's 502 naming it), and the process
stays up without a traceback in its output.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import realclients
from conftest import routed_rules
from fakes.upstream import FakeUpstream, Scenario
from harness import Gateway
from llm_gateway.util import cafiles

pytestmark = pytest.mark.e2e

TCP_TIMEOUT = 4  # mitmproxy's own inactivity timeout, short for the upstream that never answers
STREAM = {"model": "claude-test-1", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "hi"}]}


# --------------------------------------------------------------------------------------------- client


@dataclass
class Result:
    status: int | None = None
    body: bytes = b""
    error: str | None = None  # what the client's HTTP library raised, if anything

    @property
    def whole_stream(self) -> bool:
        return self.status == 200 and self.error is None and b"event: message_stop" in self.body


def post(
    port: int,
    session: str,
    scenario: Scenario | None = None,
    *,
    stream: bool = True,
    path: str = "/v1/messages",
    timeout: float = 15,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Result:
    """One Messages request with a deadline; tagged with its own session id so its record can be found."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"content-type": "application/json", "x-api-key": "sk-ant-fault-test", "x-session-id": session, **(headers or {})}
    if scenario is not None:
        h["x-fake-scenario"] = scenario.to_header()
    result = Result()
    try:
        conn.request("POST", path, json.dumps({**STREAM, "stream": stream}), h)
        response = conn.getresponse()
        result.status = response.status
        result.body = response.read()
    except http.client.IncompleteRead as e:
        result.body, result.error = e.partial, "IncompleteRead"
    except (OSError, http.client.HTTPException) as e:
        result.error = type(e).__name__
        conn.close()
    finally:
        if own:
            conn.close()
    return result


def record_of(gw: Gateway, session: str, timeout: float = 10) -> dict:
    """The one usage record of the exchange tagged `session` (and never a second one)."""
    record = gw.wait_record(lambda r: r["session"] == session, timeout=timeout)
    time.sleep(0.2)
    mine = [r for r in gw.records(timeout=0, count=0) if r["session"] == session]
    assert len(mine) == 1, mine
    return record


def assert_healthy(gw: Gateway) -> None:
    assert gw.proc.poll() is None, "the gateway process died"
    out = gw.output()
    assert "mitmproxy has crashed" not in out and "Traceback" not in out, out[-4000:]
    for line in gw.usage_log.read_text().splitlines():  # every line one whole record
        json.loads(line)


def good(gw: Gateway, session: str) -> None:
    """The gateway still serves: a whole stream, and its complete record."""
    result = post(gw.reverse_port, session)
    assert result.whole_stream, result
    assert record_of(gw, session)["complete"] is True


def during(gw: Gateway, session: str) -> threading.Thread:
    """A slow, good stream that runs while the fault happens (joined by `check_during`)."""
    box: dict = {}
    t = threading.Thread(
        target=lambda: box.setdefault("r", post(gw.reverse_port, session, Scenario(burst=60, event_delay=0.02)))
    )
    t.box = box  # type: ignore[attr-defined]
    t.start()
    return t


def check_during(gw: Gateway, t: threading.Thread) -> None:
    t.join(30)
    result = t.box["r"]  # type: ignore[attr-defined]
    assert result.whole_stream, result
    assert b"w59" in result.body


# ------------------------------------------------------------------------------------------- upstreams


class BadUpstream:
    """A TCP server on 127.0.0.1 that reads a request and answers each connection with `answer`."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class TLSUpstream(BadUpstream):
    """An HTTPS server with a certificate the gateway does not trust."""

    def __init__(self, folder: Path) -> None:
        cert = cafiles.create("untrusted.test", 2)
        (folder / "key.pem").write_bytes(cert.key_pem())
        (folder / "cert.pem").write_bytes(cert.cert_pem())
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(65536)
                tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
        except OSError:  # the gateway refuses the certificate and hangs up: expected
            pass


class GarbageUpstream(BadUpstream):
    """A plain TCP server that answers anything with bytes that are not HTTP."""

    def answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"\x00\xff\x13garbage, not HTTP\r\n\r\n" * 4)
            except OSError:
                pass


def faulty_rules(fake_url: str, tls_port: int, garbage_port: int) -> str:
    """The fake for /v1/messages; /tls/… to the untrusted HTTPS server; /garbage/… to the garbage one."""
    rules = routed_rules(fake_url)
    rules = rules.replace('paths: ["/v1/messages"', 'paths: ["/tls/v1/messages", "/garbage/v1/messages", "/v1/messages"')
    return rules.replace(
        "routes:\n",
        "routes:\n"
        f'  - {{match: {{path: "/tls/*"}}, upstream: "https://127.0.0.1:{tls_port}"}}\n'
        f'  - {{match: {{path: "/garbage/*"}}, upstream: "http://127.0.0.1:{garbage_port}"}}\n',
        1,
    )


@pytest.fixture(scope="module")
def gw(module_fake, tmp_path_factory):
    tls, garbage = TLSUpstream(tmp_path_factory.mktemp("tls")), GarbageUpstream()
    rules = faulty_rules(module_fake.url, tls.port, garbage.port)
    try:
        with Gateway(rules, extra_args=("--set", f"tcp_timeout={TCP_TIMEOUT}")) as gateway:
            yield gateway
            assert_healthy(gateway)
    finally:
        tls.close()
        garbage.close()


# ----------------------------------------------------------------------------------------------- tests


def test_upstream_closing_mid_stream(gw):
    slow = during(gw, "close-during")
    cut = post(gw.reverse_port, "close-stream", Scenario(abort_after=4, event_delay=0.05))
    cut_json = post(gw.reverse_port, "close-json", Scenario(abort_after=40), stream=False)
    check_during(gw, slow)

    # The stream: what the upstream sent arrived, then the connection ended as the upstream's did.
    assert cut.status == 200 and cut.error == "IncompleteRead" and b"message_start" in cut.body
    assert b"message_stop" not in cut.body
    record = record_of(gw, "close-stream")
    assert record["complete"] is False and record["status"] == 200
    assert record["input_tokens"] == 21  # message_start had passed
    # The buffered answer: the upstream's failure, as mitmproxy's 502 naming it.
    assert cut_json.status == 502 and b"peer closed connection" in cut_json.body
    record = record_of(gw, "close-json")  # what the client got: mitmproxy's 502, and why
    assert (record["complete"], record["status"], record["error_type"], record["reason"]) == (
        False, 502, "api_error", "upstream closed before the end of its body")
    assert record_of(gw, "close-during")["complete"] is True
    good(gw, "close-after")
    assert_healthy(gw)


def test_upstream_that_never_answers(gw):
    """Either the client gives up, or mitmproxy's inactivity timeout (tcp_timeout) ends the flow: the
    record appears then, incomplete and without a status."""
    with ThreadPoolExecutor(2) as pool:
        impatient = pool.submit(post, gw.reverse_port, "hang-client-gives-up", Scenario(hang=True), timeout=1.5)
        patient = pool.submit(post, gw.reverse_port, "hang-timeout", Scenario(hang=True), timeout=3 * TCP_TIMEOUT)
        time.sleep(0.3)
        slow = during(gw, "hang-during")
        check_during(gw, slow)
        assert impatient.result().error == "TimeoutError"
        started = time.monotonic()
        assert patient.result().error == "RemoteDisconnected"  # closed for inactivity, no response sent
        assert time.monotonic() - started < 2 * TCP_TIMEOUT
    for session in ("hang-client-gives-up", "hang-timeout"):
        record = record_of(gw, session)
        assert record["complete"] is False and record["status"] is None and record["ttfb_ms"] is None
    assert record_of(gw, "hang-during")["complete"] is True
    good(gw, "hang-after")
    assert_healthy(gw)


@pytest.mark.parametrize(
    "prefix, reason",
    [("/tls", b"Certificate verify failed"), ("/garbage", b"Cannot parse HTTP response")],
    ids=["untrusted-tls", "garbage"],
)
def test_upstream_tls_failure_and_garbage(gw, prefix, reason):
    slow = during(gw, f"{prefix[1:]}-during")
    results = [post(gw.reverse_port, f"{prefix[1:]}-{i}", path=f"{prefix}/v1/messages") for i in range(3)]
    check_during(gw, slow)
    for i, result in enumerate(results):
        assert result.status == 502 and reason in result.body, result
        record = record_of(gw, f"{prefix[1:]}-{i}")
        assert record["complete"] is False and (record["status"], record["error_type"]) == (502, "api_error")
        assert record["reason"] == ("upstream TLS failed" if prefix == "/tls" else "upstream failed")
        assert record["upstream"].startswith("https://" if prefix == "/tls" else "http://")
    good(gw, f"{prefix[1:]}-after")
    assert_healthy(gw)


def test_client_walking_away_mid_stream(gw):
    slow = during(gw, "walk-during")
    conn = http.client.HTTPConnection("127.0.0.1", gw.reverse_port, timeout=10)
    conn.request("POST", "/v1/messages", json.dumps(STREAM), {
        "content-type": "application/json", "x-session-id": "walk-away",
        "x-fake-scenario": Scenario(burst=300, event_delay=0.01).to_header()})
    response = conn.getresponse()
    assert response.status == 200 and b"message_start" in response.read1(65536)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    check_during(gw, slow)
    record = record_of(gw, "walk-away")
    assert record["complete"] is False and record["status"] == 200 and record["input_tokens"] == 21
    good(gw, "walk-after")
    assert_healthy(gw)


# ------------------------------------------------------------------------------------- LiteLLM restart

LITELLM_VERSION = realclients.LITELLM_VERSIONS[0]


def test_litellm_restarting_in_the_middle_of_traffic(tmp_path):
    """gateway -> LiteLLM pass-through -> fake, while LiteLLM is stopped and started again. Another route
    (straight to the fake) keeps working throughout."""
    with FakeUpstream() as fake, realclients.LiteLLMProxy(LITELLM_VERSION, anthropic_base_url=fake.url) as litellm:
        rules = routed_rules(f"{litellm.url}/anthropic").replace(
            'paths: ["/v1/messages"', 'paths: ["/direct/v1/messages", "/v1/messages"'
        ).replace("routes:\n", f'routes:\n  - {{match: {{path: "/direct/*"}}, upstream: "{fake.url}"}}\n', 1)
        auth = {"authorization": f"Bearer {litellm.master_key}"}
        stop = threading.Event()
        results: dict[str, Result] = {}
        lock = threading.Lock()

        with Gateway(rules) as gw:

            def worker(name: str, path: str, pause: float) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", gw.reverse_port, timeout=15)  # kept alive
                for n in range(400):  # bounded
                    if stop.is_set():
                        break
                    session = f"{name}-{n:03d}"
                    result = post(gw.reverse_port, session, path=path, headers=auth, conn=conn)
                    with lock:
                        results[session] = result
                    time.sleep(pause if result.whole_stream else 0.1)
                conn.close()

            workers = [threading.Thread(target=worker, args=(f"ll{i}", "/v1/messages", 0.02)) for i in range(2)]
            workers.append(threading.Thread(target=worker, args=("direct", "/direct/v1/messages", 0.1)))
            for t in workers:
                t.start()
            try:
                time.sleep(1.5)
                litellm.stop()
                stopped_at = len(results)
                time.sleep(1.0)
                litellm.start()  # a new process on the same port (takes a few seconds)
                restarted_at = len(results)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    with lock:
                        after = [r for s, r in list(results.items())[restarted_at:] if s.startswith("ll")]
                    if sum(r.whole_stream for r in after) >= 6:
                        break
                    time.sleep(0.2)
            finally:
                stop.set()
                for t in workers:
                    t.join(30)

            via_litellm = {s: r for s, r in results.items() if s.startswith("ll")}
            direct = {s: r for s, r in results.items() if s.startswith("direct")}
            ordered = list(results.items())
            assert any(r.whole_stream for s, r in ordered[:stopped_at] if s.startswith("ll")), "no traffic before"
            assert sum(r.whole_stream for s, r in ordered[restarted_at:] if s.startswith("ll")) >= 6, "none after"
            failed = {s: r for s, r in via_litellm.items() if not r.whole_stream}
            assert failed, "the restart was not noticed"
            for r in failed.values():  # LiteLLM down: mitmproxy's 502 naming the refused connection
                assert r.status == 502 or r.error is not None, r
            assert all(r.whole_stream for r in direct.values()) and len(direct) >= 10, direct

            records = gw.records(count=len(results), timeout=10)
            by_session: dict[str, list[dict]] = {}
            for record in records:
                by_session.setdefault(record["session"], []).append(record)
            assert set(by_session) == set(results), "one record for every exchange, and no other"
            assert all(len(rs) == 1 for rs in by_session.values())
            for session, result in results.items():
                assert by_session[session][0]["complete"] is result.whole_stream, (session, result)
            assert_healthy(gw)
            report = (
                f"LiteLLM {LITELLM_VERSION} restart: {len(via_litellm)} exchanges via LiteLLM "
                f"({len(failed)} failed while it was down), {len(direct)} direct, all recorded once"
            )
            print(report)
