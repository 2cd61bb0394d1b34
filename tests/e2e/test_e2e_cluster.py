"""End to end, as the cluster runs it: replicas from one CA, ConfigMap symlink swaps, JSON-only standard
output, Prometheus metrics that match the traffic, and the Deployment's probes answered by the entrypoint."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import ssl
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import certifi
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import sdk_client
from conftest import routed_rules
from fakes.upstream import FakeUpstream, Scenario, litellm_wrapped_error
from harness import BIN, ROOT, Gateway, free_port
from llm_gateway.util import cafiles

pytestmark = pytest.mark.e2e

CONFDIR_RE = re.compile(r"confdir is now (\S+)")


@pytest.fixture(scope="module")
def shared_ca(tmp_path_factory) -> Path:
    """The CA scripts/make-ca would make once, as the Secret's tls.crt and tls.key."""
    folder = tmp_path_factory.mktemp("shared") / "ca"
    cafiles.save(cafiles.create("E2E shared gateway CA", days=2), folder)
    return folder


def client_bundle(ca_dir: Path, path: Path) -> Path:
    """What an agent's SSL_CERT_FILE holds: the usual CAs plus the gateway's."""
    path.write_text(Path(certifi.where()).read_text() + "\n" + (ca_dir / "tls.crt").read_text())
    return path


def kubelet_write(volume: Path, files: dict[str, str]) -> None:
    """Update a ConfigMap/Secret volume the way kubelet's AtomicWriter does: the files go into a new
    timestamped folder, `..data` is re-pointed to it by renaming a fresh symlink over it, the visible
    names are symlinks through `..data`, and the old folder is removed."""
    volume.mkdir(exist_ok=True)
    stamp = volume / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    for name, text in files.items():
        (stamp / name).parent.mkdir(parents=True, exist_ok=True)
        (stamp / name).write_text(text)
    data = volume / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    os.symlink(stamp.name, volume / "..data_tmp")
    os.rename(volume / "..data_tmp", data)
    for top in {name.split("/", 1)[0] for name in files}:
        if not (volume / top).is_symlink():
            os.symlink(f"..data/{top}", volume / top)
    if old:
        shutil.rmtree(volume / old)


def scrape(url: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value}, parsed with prometheus_client's own parser."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["content-type"].startswith("text/plain")
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def connect(proxy_port: int, target: str) -> int:
    """Send a CONNECT through the egress listener; the status it got."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
    try:
        conn.request("CONNECT", target)
        return conn.getresponse().status
    finally:
        conn.close()


def messages(url: str, *, model: str = "claude-test-1", headers: dict | None = None, stream: bool = False,
             proxy: str | None = None, cafile: Path | None = None) -> tuple[int, bytes]:
    """One Messages request with a plain HTTP client (quicker to start than the SDK); (status, body)."""
    body = json.dumps({"model": model, "max_tokens": 64, "stream": stream,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "content-type": "application/json", "x-api-key": "sk-ant-test-key-never-logged",
        "anthropic-version": "2023-06-01", **(headers or {}),
    })
    handlers = [urllib.request.ProxyHandler({"https": proxy} if proxy else {})]
    if cafile:
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(cafile))))
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- one CA for every replica ---------------------------------------------------------------------------


def test_two_replicas_from_one_ca_are_trusted_by_one_client_bundle(gateway_factory, fake, shared_ca, tmp_path):
    bundle = client_bundle(shared_ca, tmp_path / "bundle.pem")
    replicas = [
        gateway_factory(routed_rules(fake.url), reverse_to=None, extra_args=("--set", f"gateway_ca={shared_ca}"))
        for _ in range(2)
    ]
    folders = []
    for gw in replicas:
        result = sdk_client.run("create", env={"HTTPS_PROXY": gw.proxy_url, "SSL_CERT_FILE": str(bundle)})
        assert result["ok"], result
        folder = Path(CONFDIR_RE.search(gw.output()).group(1))
        folders.append(folder)
        assert mode(folder) == 0o700 and mode(folder / "mitmproxy-ca.pem") == 0o600
        assert (folder / "mitmproxy-ca-cert.pem").read_bytes() == (shared_ca / "tls.crt").read_bytes()
        # the confdir the gateway was given holds mitmproxy's own CA, untouched
        assert gw.ca_cert.read_bytes() != (shared_ca / "tls.crt").read_bytes()
    assert len(fake.messages_requests()) == 2

    # the control: a gateway with a CA of its own is not trusted by that bundle
    own = gateway_factory(routed_rules(fake.url), reverse_to=None)
    result = sdk_client.run("create", env={"HTTPS_PROXY": own.proxy_url, "SSL_CERT_FILE": str(bundle)})
    assert not result["ok"] and result["error"] == "APIConnectionError", result
    assert len(fake.messages_requests()) == 2

    for gw, folder in zip(replicas, folders):
        gw.stop()
        assert not folder.exists()  # the private copy of the key goes with the process


# -- ConfigMap updates ----------------------------------------------------------------------------------


def test_configmap_symlink_swap_is_reloaded(tmp_path):
    with FakeUpstream() as first, FakeUpstream() as second:
        volume = tmp_path / "config"
        kubelet_write(volume, {"rules.yaml": routed_rules(first.url)})
        gw = Gateway(routed_rules(first.url), regular=False)
        # as the pod sees it (not through extra_args: mitmproxy drops an addon option given twice)
        gw.rules_path = rules_path = volume / "rules.yaml"
        with gw:
            assert f"rules loaded from {rules_path}" in gw.output()
            assert messages(f"{gw.base_url}/v1/messages")[0] == 200
            assert len(first.requests) == 1

            mark = len(gw.output())
            kubelet_write(volume, {"rules.yaml": routed_rules(second.url)})
            gw.wait_for_output(f"rules reloaded from {rules_path}", after=mark)
            assert messages(f"{gw.base_url}/v1/messages")[0] == 200
            assert (len(first.requests), len(second.requests)) == (1, 1)

            mark = len(gw.output())
            kubelet_write(volume, {"rules.yaml": routed_rules(first.url) + "bogus: [\n"})
            gw.wait_for_output("keeping the last good rules", after=mark)
            assert messages(f"{gw.base_url}/v1/messages")[0] == 200
            assert (len(first.requests), len(second.requests)) == (1, 2)


# -- records on standard output -------------------------------------------------------------------------


def test_stdout_carries_only_json_records(fake):
    # flow_detail stays at mitmdump's default (1): the flow dumper prints every flow, to stderr.
    gw = Gateway(routed_rules(fake.url), tool="llm-gateway-dump", split_stdout=True)
    gw.usage_log = "-"  # not through extra_args: mitmproxy drops an addon option given twice
    with gw:
        url = f"{gw.base_url}/v1/messages"
        assert messages(url)[0] == 200
        assert messages(url, stream=True)[0] == 200
        fake.script(Scenario.error(529))
        assert messages(url)[0] == 529
        egress = {"proxy": gw.proxy_url, "cafile": gw.ca_cert}
        assert messages("https://api.anthropic.com/v1/messages", **egress)[0] == 200
        assert connect(gw.regular_port, "denied.example:443") == 403
        deadline = time.monotonic() + 10
        while gw.stdout_path.read_text().count("\n") < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    out = gw.stdout_path.read_text()
    assert out.endswith("\n")
    records = [json.loads(line) for line in out.splitlines()]  # every line is one JSON record
    assert all(isinstance(r, dict) for r in records)
    kinds = Counter(r["kind"] for r in records)
    assert kinds == {"usage": 4, "egress": 2}
    assert sorted(r["status"] for r in records if r["kind"] == "usage") == [200, 200, 200, 529]
    assert sorted(r["decision"] for r in records if r["kind"] == "egress") == ["allowed", "denied"]
    err = gw.output()
    assert "Loading script" in err and "listening at" in err  # mitmproxy's log: standard error
    assert re.search(r"<< 200 OK", err)  # the flow dumper too
    assert '"kind":' not in err  # and records never there


# -- metrics --------------------------------------------------------------------------------------------


def test_metrics_endpoint_counts_match_the_traffic(fake, tmp_path):
    metrics_port = free_port()
    gw = Gateway(routed_rules(fake.url), extra_args=("--set", f"gateway_metrics_port={metrics_port}"))
    sent: list[tuple[str, str, int]] = []  # (client, model, status) per Messages request, in order

    def call(client: str, model: str, status: int, *, stream=False, scenario=None, session=None, egress=False):
        if scenario is not None:
            fake.script(scenario)
        headers = {"x-gateway-client": client, **({"x-session-id": session} if session else {})}
        if egress:
            got, body = messages("https://api.anthropic.com/v1/messages", model=model, headers=headers,
                                 stream=stream, proxy=gw.proxy_url, cafile=gw.ca_cert)
        else:
            got, body = messages(f"{gw.base_url}/v1/messages", model=model, headers=headers, stream=stream)
        assert got == status, body
        sent.append((client, model, status))

    with gw:
        call("team-a", "claude-a", 200)
        call("team-a", "claude-a", 200, session="s-1")
        call("team-a", "claude-a", 200, session="s-1", scenario=Scenario(usage={"cache_read_input_tokens": 0}))
        call("team-a", "claude-a", 429, scenario=Scenario.error(429))
        call("team-b", "claude-b", 200, stream=True, scenario=Scenario(usage={"input_tokens": 1000, "output_tokens": 77}))
        call("team-b", "claude-b", 200, egress=True)
        call("team-b", "claude-b", 401, scenario=litellm_wrapped_error(401))
        assert connect(gw.regular_port, "denied.example:443") == 403
        gw.records(count=len(sent))

        on_port = scrape(f"http://127.0.0.1:{metrics_port}/-/metrics")
        on_reverse = scrape(f"{gw.base_url}/-/metrics")
        ready = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/-/ready", timeout=5)
        assert ready.status == 200
    assert on_port == on_reverse

    # The oracle: what the fake upstream served, independent of the gateway.
    served = fake.messages_requests()
    assert len(served) == len(sent)
    expected: Counter = Counter()

    def sample(name: str, **labels: str) -> tuple:
        return name, tuple(sorted(labels.items()))

    prompt: dict = {}
    fields = {"input": "input_tokens", "output": "output_tokens", "cache_read": "cache_read_input_tokens",
              "cache_write": "cache_creation_input_tokens"}
    for (client, model, status), request in zip(sent, served):
        assert request.json["model"] == model
        labels = (("client", client), ("model", model))
        expected[sample("llm_gateway_requests_total", client=client, model=model, status=str(status))] += 1
        # no credentials section: every exchange is the principal "none"
        expected[sample("llm_gateway_principal_requests_total", principal="none", status=str(status))] += 1
        usage = request.message["usage"] if request.message else None
        if usage:
            for kind, field in fields.items():
                if usage[field]:
                    expected[sample("llm_gateway_tokens_total", client=client, model=model, kind=kind)] += usage[field]
                    expected[sample("llm_gateway_principal_tokens_total", principal="none", kind=kind)] += usage[field]
            read = usage["cache_read_input_tokens"]
            total = read + usage["input_tokens"] + usage["cache_creation_input_tokens"]
            prompt[labels] = [a + b for a, b in zip(prompt.get(labels, [0, 0]), [read, total])]
    a, b = {"client": "team-a", "model": "claude-a"}, {"client": "team-b", "model": "claude-b"}
    expected[sample("llm_gateway_cache_breaks_total", **a)] = 1
    # the fake's fixed usage: a 28-token prompt, which no model caches
    expected[sample("llm_gateway_cache_break_reasons_total", client="team-a", reason="below_minimum")] = 1
    expected[sample("llm_gateway_errors_total", **a, error_type="rate_limit_error")] = 1
    expected[sample("llm_gateway_errors_total", **b, error_type="authentication_error")] = 1
    expected[sample("llm_gateway_unwrapped_errors_total", **b, error_type="authentication_error")] = 1
    expected[sample("llm_gateway_egress_decisions_total", decision="allowed")] = 1
    expected[sample("llm_gateway_egress_decisions_total", decision="denied")] = 1

    counters = {k: v for k, v in on_port.items() if k[0].endswith("_total")}
    assert counters == dict(expected)
    ratios = {k[1]: v for k, v in on_port.items() if k[0] == "llm_gateway_cache_hit_ratio"}
    assert ratios == pytest.approx({labels: read / total for labels, (read, total) in prompt.items()})
    assert set(ratios) == {tuple(sorted(a.items())), tuple(sorted(b.items()))}


# -- the Deployment, run on the host --------------------------------------------------------------------


def test_the_deployments_probes_are_answered_by_the_entrypoint(shared_ca, tmp_path):
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "config"]
    [tmp_mount] = [m for m in container["volumeMounts"] if m["name"] == "tmp"]
    configmap = yaml.safe_load((ROOT / "deploy" / "k8s" / "configmap.yaml").read_text())

    # The pod's volume, laid out on the host as kubelet would: the ConfigMap's rules and the Secret's CA.
    volume = tmp_path / "etc-llm-gateway"
    kubelet_write(volume, {
        "rules.yaml": configmap["data"]["rules.yaml"],
        "ca/tls.crt": (shared_ca / "tls.crt").read_text(),
        "ca/tls.key": (shared_ca / "tls.key").read_text(),
    })
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    host_port = {number: free_port() for number in named.values()}
    on_host = {mount["mountPath"]: volume, tmp_mount["mountPath"]: tmp_path / "tmp"}
    env = {}
    for var in container["env"]:
        value = var["value"]
        if value.isdigit() and int(value) in host_port:
            value = str(host_port[int(value)])
        for in_pod, here in on_host.items():
            if value == in_pod or value.startswith(in_pod + "/"):
                value = str(here) + value[len(in_pod):]
                break
        env[var["name"]] = value
    env |= {"LLM_GATEWAY_HOST": "127.0.0.1", "LLM_GATEWAY_SCRIPT": str(ROOT / "addons" / "gateway.py"),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen([str(ROOT / "deploy" / "entrypoint.sh")], env={**os.environ, **env},
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while stderr.read_text().count("listening at") < 3:
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.05)
        log = stderr.read_text()
        assert f"rules loaded from {volume}/rules.yaml" in log
        assert f"from {volume}/ca" in log  # the Secret's CA

        for probe in ("readinessProbe", "livenessProbe"):
            spec = container[probe]["httpGet"]
            port = host_port[named[spec["port"]] if isinstance(spec["port"], str) else spec["port"]]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{spec['path']}", timeout=5) as answer:
                assert answer.status == 200, probe
        annotations = pod["metadata"]["annotations"]
        metrics = scrape(f"http://127.0.0.1:{host_port[int(annotations['prometheus.io/port'])]}"
                         f"{annotations['prometheus.io/path']}")
        assert ("llm_gateway_egress_decisions_total", (("decision", "denied"),)) not in metrics
        assert connect(host_port[named["egress"]], "denied.example:443") == 403  # the ConfigMap's egress policy
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    [record] = [json.loads(line) for line in stdout.read_text().splitlines()]
    assert record["kind"] == "egress" and record["decision"] == "denied"
