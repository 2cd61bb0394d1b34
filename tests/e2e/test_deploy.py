"""deploy/: the manifests parse and agree with each other, with the image, the entrypoint and the gateway.

No cluster and no container engine here, so this is what can be checked without them; the probes and the
entrypoint are run for real in test_e2e_cluster.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from mitmproxy.utils import human

from llm_gateway.util import cafiles
from llm_gateway.addons import endpoints, heads
from llm_gateway.policy import rules
from llm_gateway.policy.spec import Limits

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def one(kind: str, name: str | None = None) -> dict:
    found = [d for d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def deployment() -> dict:
    return one("Deployment", "llm-gateway")


def container() -> dict:
    [c] = deployment()["spec"]["template"]["spec"]["containers"]
    return c


def env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in container()["env"]}


def ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container()["ports"]}


def entrypoint_defaults() -> dict[str, str]:
    text = (DEPLOY / "entrypoint.sh").read_text()
    return dict(re.findall(r"\$\{(LLM_GATEWAY_\w+):?-([^}]*)\}", text))


def test_every_manifest_parses_and_kustomization_lists_them_all():
    docs = documents()
    for doc in docs:
        assert {"apiVersion", "kind"} <= doc.keys(), doc["__file__"]
        if doc["kind"] != "Kustomization":
            assert doc["metadata"].get("name"), doc["__file__"]
        if doc["kind"] not in ("Kustomization", "Namespace"):
            assert doc["metadata"].get("namespace"), doc["__file__"]  # kustomization sets none
    kustomization = one("Kustomization")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_image_is_named_the_same_everywhere():
    image = container()["image"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert image == f"llm-gateway:{version}"
    assert f"-t {image} ." in (DEPLOY / "Containerfile").read_text()
    assert f"-t {image} ." in (ROOT / "docs" / "cluster.md").read_text()
    assert "not built" in (ROOT / "docs" / "cluster.md").read_text().lower()


def test_containerfile_is_minimal_and_runs_as_the_non_root_user_the_pod_expects():
    text = (DEPLOY / "Containerfile").read_text()
    instructions = [line.split()[0] for line in text.splitlines() if line and not line.startswith(("#", " "))]
    assert instructions[0] == "FROM" and "FROM python:3.12-slim\n" in text
    [user] = re.findall(r"^USER (\d+):(\d+)$", text, re.M)
    pod = deployment()["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert (int(user[0]), int(user[1])) == (pod["runAsUser"], pod["runAsGroup"]) and pod["runAsUser"] != 0
    [exposed] = re.findall(r"^EXPOSE (.+)$", text, re.M)
    assert sorted(map(int, exposed.split())) == sorted(ports().values())
    assert 'ENTRYPOINT ["/usr/local/bin/llm-gateway-entrypoint"]' in text
    assert "COPY deploy/entrypoint.sh /usr/local/bin/llm-gateway-entrypoint" in text
    assert "RUN pip install --require-hashes --no-deps -r requirements/gateway.txt" in text  # the lock, hashed
    assert "RUN pip install --no-deps /app" in text
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True


def test_entrypoint_defaults_match_the_deployment():
    defaults, settings = entrypoint_defaults(), env()
    assert set(settings) <= set(defaults)
    for name, value in settings.items():
        assert defaults[name] == value, name
    assert defaults["LLM_GATEWAY_HOST"] == "0.0.0.0"
    assert {"egress": settings["LLM_GATEWAY_EGRESS_PORT"], "base-url": settings["LLM_GATEWAY_BASE_PORT"],
            "metrics": settings["LLM_GATEWAY_METRICS_PORT"]} == {k: str(v) for k, v in ports().items()}
    text = (DEPLOY / "entrypoint.sh").read_text()
    assert "exec llm-gateway-dump " in text and "--set gateway_log=-" in text
    # non-API bodies are bounded (issue 30), above the API's own limit so API requests still get the native 413
    assert '--set "body_size_limit=$body_size_limit"' in text
    assert human.parse_size(defaults["LLM_GATEWAY_BODY_SIZE_LIMIT"]) > Limits().request_body
    # and so are heads: a head that never ends is refused at gateway_head_size_limit, the addon's own default
    assert '--set "gateway_head_size_limit=$head_size_limit"' in text
    assert human.parse_size(defaults["LLM_GATEWAY_HEAD_SIZE_LIMIT"]) == human.parse_size(heads.DEFAULT_LIMIT)


def test_probes_name_paths_and_ports_the_gateway_serves():
    c, named = container(), ports()
    readiness, liveness = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert readiness["path"] == endpoints.READY and liveness["path"] == endpoints.HEALTHZ
    assert readiness["port"] in named and liveness["port"] in named
    # readiness on the base-URL listener (the data path), liveness on the metrics port
    assert (readiness["port"], liveness["port"]) == ("base-url", "metrics")
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == endpoints.METRICS
    assert int(annotations["prometheus.io/port"]) == named["metrics"]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert deployment()["spec"]["replicas"] >= 2


def test_rules_come_from_the_configmap_and_the_ca_from_the_secret():
    spec = deployment()["spec"]["template"]["spec"]
    [mount] = [m for m in container()["volumeMounts"] if m["name"] == "config"]
    [volume] = [v for v in spec["volumes"] if v["name"] == "config"]
    sources = volume["projected"]["sources"]
    [cm] = [s["configMap"] for s in sources if "configMap" in s]
    [secret] = [s["secret"] for s in sources if "secret" in s]
    configmap = one("ConfigMap")
    assert cm["name"] == configmap["metadata"]["name"] == "llm-gateway-rules"
    assert cm["items"] == [{"key": "rules.yaml", "path": "rules.yaml"}] and "rules.yaml" in configmap["data"]
    assert env()["LLM_GATEWAY_RULES"] == f"{mount['mountPath']}/rules.yaml"
    assert secret["name"] == cafiles.SECRET_NAME
    assert {i["key"]: i["path"] for i in secret["items"]} == {"tls.crt": "ca/tls.crt", "tls.key": "ca/tls.key"}
    assert env()["LLM_GATEWAY_CA"] == f"{mount['mountPath']}/ca"
    assert not any("subPath" in m for m in container()["volumeMounts"])  # subPath mounts never see updates
    # the confdir is on a writable volume, the root filesystem is not
    [tmp] = [m for m in container()["volumeMounts"] if m["name"] == "tmp"]
    assert env()["LLM_GATEWAY_CONFDIR"].startswith(tmp["mountPath"] + "/")
    namespace = deployment()["metadata"]["namespace"]
    assert namespace == cafiles.NAMESPACE == configmap["metadata"]["namespace"]
    docs = (ROOT / "docs" / "cluster.md").read_text()
    assert f"-n {namespace} create secret tls {cafiles.SECRET_NAME}" in docs


def test_configmap_is_make_configmaps_output_for_the_default_rules(tmp_path):
    made = subprocess.run([sys.executable, str(DEPLOY / "make-configmap")], capture_output=True, text=True, check=True)
    assert made.stdout == (K8S / "configmap.yaml").read_text(), "regenerate: deploy/make-configmap > deploy/k8s/configmap.yaml"
    text = one("ConfigMap")["data"]["rules.yaml"]
    assert text == (ROOT / "rules.yaml").read_text()
    (tmp_path / "rules.yaml").write_text(text)
    assert rules.load(tmp_path / "rules.yaml").clients


def test_one_service_per_listener_selecting_the_pods():
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    named = ports()
    services = [d for d in documents() if d["kind"] == "Service"]
    targets = {}
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named
            assert port["port"] == named[port["targetPort"]]
            targets[port["targetPort"]] = service["metadata"]["name"]
    assert set(targets) == {"egress", "base-url", "metrics"}
    docs = (ROOT / "docs" / "cluster.md").read_text()
    assert f"HTTPS_PROXY=http://{targets['egress']}.{cafiles.NAMESPACE}.svc:{named['egress']}" in docs
    assert f"ANTHROPIC_BASE_URL=http://{targets['base-url']}.{cafiles.NAMESPACE}.svc:{named['base-url']}" in docs


def test_agent_services_keep_one_client_on_one_replica():
    """Cache-break explanations compare a session's turns in one replica's memory (cachewatch.py)."""
    for name in ("llm-gateway", "llm-gateway-egress"):
        assert one("Service", name)["spec"]["sessionAffinity"] == "ClientIP"
    docs = (ROOT / "docs" / "cluster.md").read_text()
    assert "sessionAffinity: ClientIP" in docs and "--recompute-breaks" in docs


def test_networkpolicy_lets_agents_reach_only_the_gateway_listeners():
    policies = {d["metadata"]["name"]: d for d in documents() if d["kind"] == "NetworkPolicy"}
    agents = policies["agents-egress-via-llm-gateway"]["spec"]
    assert agents["policyTypes"] == ["Egress"]

    def to_gateway_pods(rule: dict) -> bool:
        return any("namespaceSelector" in t and t.get("podSelector", {}).get("matchLabels", {}).get(
            "app.kubernetes.io/name") == "llm-gateway" for t in rule["to"])

    [to_gateway] = [rule for rule in agents["egress"] if to_gateway_pods(rule)]
    listener_ports = {ports()["egress"], ports()["base-url"]}
    assert {p["port"] for p in to_gateway["ports"]} == listener_ports
    others = [rule for rule in agents["egress"] if rule is not to_gateway]
    assert all({p["port"] for p in rule["ports"]} == {53} for rule in others)  # DNS only
    gateway = policies["llm-gateway"]["spec"]
    pod_labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert gateway["podSelector"]["matchLabels"].items() <= pod_labels.items()
    ingress_ports = {p["port"] for rule in gateway["ingress"] for p in rule["ports"]}
    assert ingress_ports == set(ports().values())
    assert any(t.get("ipBlock", {}).get("cidr") == "0.0.0.0/0" for rule in gateway["egress"] for t in rule["to"])


@pytest.mark.parametrize("script", ["scripts/make-ca", "deploy/make-configmap", "deploy/entrypoint.sh"])
def test_scripts_are_executable(script):
    assert (ROOT / script).stat().st_mode & 0o111


@pytest.mark.e2e
def test_containerfile_install_steps_give_a_working_gateway(tmp_path):
    """The image's RUN pip lines, run as they stand in a new venv with plain pip (no container engine here):
    the hashed lock installs, and the installed gateway loads its addons in mitmdump."""

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    text = (DEPLOY / "Containerfile").read_text()
    runs = [line[len("RUN "):].split(" && ")[0] for line in text.splitlines() if line.startswith("RUN pip install")]
    assert len(runs) == 2
    # /app as the image has it: a copy of what the Containerfile copies (pip builds in the source folder, and the
    # checkout must stay clean)
    app = tmp_path / "app"
    for name in ("pyproject.toml", "rules.yaml", "addons/gateway.py"):
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, app / name)
    shutil.copytree(ROOT / "addons" / "llm_gateway", app / "addons" / "llm_gateway",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for run in runs:
        args = run.split()[2:]  # after "pip install"
        args = [str(app) if a == "/app" else a for a in args]
        result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args],
                                cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import llm_gateway.protocol.decoding, llm_gateway.util.cafiles, mitmproxy.tools.dump"],
        capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
