"""The README's "Try it locally", run as a new user would: its shell blocks, as written, in order.

`scripts/trial` (the fake upstream and the gateway in both modes), then the base-URL block (curl and Claude Code),
the egress block (scripts/agent-env, curl and Claude Code), and the usage report. Only the places are changed:
free ports for the README's 8080, 8081 and the fake's 8090, and a temporary folder for
~/.cache/llm-gateway/trial; `claude` is the Claude Code that scripts/test-tools installed, run offline with a
throwaway HOME (realclients.claude_env).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import realclients
from harness import ROOT, free_port

pytestmark = pytest.mark.e2e

README = ROOT / "README.md"
HELLO = "Hello from the fake upstream"


def trial_blocks() -> list[str]:
    """The ```sh blocks of the README's "Try it locally" section, in order."""
    text = README.read_text()
    section = text.split("\n## Try it locally", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def test_readme_has_the_four_trial_steps():
    start, base, egress, report = trial_blocks()
    assert start.strip() == "scripts/trial"
    assert "curl" in base and "claude -p" in base and "ANTHROPIC_BASE_URL=http://127.0.0.1:8081" in base
    assert "scripts/agent-env" in egress and "https://api.anthropic.com/v1/messages" in egress and "claude -p" in egress
    assert report.startswith("scripts/usage_report")


def wait_for(path: Path, needle: str, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        assert proc.poll() is None, f"scripts/trial exited {proc.returncode}:\n{text[-4000:]}"
        assert time.monotonic() < deadline, f"no {needle!r} after {timeout}s:\n{text[-4000:]}"
        time.sleep(0.2)


def test_readme_trial_gives_both_modes_records_and_a_report(tmp_path):
    claude = realclients.claude_binary()
    ports = {"8080": free_port(), "8081": free_port(), "8090": free_port()}
    folder = tmp_path / "trial"
    home = tmp_path / "home"
    workdir = home / "work"
    workdir.mkdir(parents=True)
    # Claude Code's onboarding and the folder's trust dialog done, as run_claude does
    (home / ".claude.json").write_text(json.dumps({
        "hasCompletedOnboarding": True,
        "projects": {str(workdir): {"hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True}},
    }))

    def placed(block: str) -> str:
        block = block.replace("~/.cache/llm-gateway/trial", str(folder))
        for port, free in ports.items():
            block = block.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free}")
        return block

    env = realclients.claude_env(home)
    env["PATH"] = f"{claude.parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("ANTHROPIC_API_KEY")  # the README's lines give the key themselves

    def shell(block: str) -> subprocess.CompletedProcess:
        script = f"cd {ROOT}\nset -euo pipefail\n{placed(block)}"
        done = subprocess.run(["bash", "-c", script], env=env, cwd=workdir, capture_output=True, text=True,
                              timeout=180, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"{block}\nexit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
        return done

    start, base, egress, report = trial_blocks()
    start = start.strip() + f" --dir {folder} --egress-port {ports['8080']} --base-port {ports['8081']} " \
                            f"--fake-port {ports['8090']}"
    log = tmp_path / "trial.log"
    with open(log, "wb") as out:
        trial = subprocess.Popen(["bash", "-c", f"exec {start}"], cwd=ROOT, env={**os.environ, "HOME": str(home)},
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    try:
        printed = wait_for(log, "Ctrl-C stops the trial.", trial, timeout=180)
        # what it prints is what the README says, at these ports and in this folder
        assert f"ANTHROPIC_BASE_URL=http://127.0.0.1:{ports['8081']} ANTHROPIC_API_KEY=trial claude -p hello" in printed
        assert f"--confdir {folder}/mitmproxy" in printed

        done = shell(base)
        assert done.stdout.count(HELLO) == 2, done.stdout  # curl's JSON, then Claude Code's answer
        assert json.loads(done.stdout.splitlines()[0])["content"][0]["text"] == HELLO
        done = shell(egress)
        assert done.stdout.count(HELLO) == 2, done.stdout

        # a record is written off the answer's path (records/writer.py): the client may finish a moment before it
        deadline = time.monotonic() + 15
        while True:
            records = [json.loads(line) for line in (folder / "usage.jsonl").read_text().splitlines()]
            usage = [r for r in records if r["kind"] == "usage" and r["path"] == "/v1/messages"]
            if len(usage) >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert {(r["mode"], r["client"]) for r in usage} == {
            ("reverse", "unknown"), ("reverse", "claude-code"), ("regular", "unknown"), ("regular", "claude-code")}
        assert all(r["status"] == 200 and r["cost_usd"] is not None for r in usage), usage
        assert all(r["upstream"].startswith(f"http://127.0.0.1:{ports['8090']}") for r in usage)
        refused = [r for r in records if r["kind"] == "egress" and r.get("decision") == "blocked"]
        assert refused and all(r["path"].startswith("/api/") for r in refused)  # Claude Code's own calls, refused

        done = shell(report)
        rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.strip()}
        assert rows["claude-code"][1] == "2" and rows["unknown"][1] == "2" and rows["TOTAL"][1] == "4", done.stdout
    finally:
        if trial.poll() is None:
            trial.send_signal(signal.SIGINT)  # as Ctrl-C: the script stops the gateway and the fake
            try:
                trial.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(trial.pid, signal.SIGKILL)
                trial.wait(5)
    # the trial's rules summarise allowed tunnels (egress.record_allowed: summary): no record per CONNECT while it
    # ran, one count per host and rule written when the gateway stopped
    records = [json.loads(line) for line in (folder / "usage.jsonl").read_text().splitlines()]
    allowed = [r for r in records if r["kind"] == "egress" and r["decision"] in ("allowed", "tunnelled")]
    assert allowed and all(r.get("summary") is True for r in allowed), allowed
    [connects] = [r for r in allowed if (r["method"], r["host"]) == ("CONNECT", "api.anthropic.com")]
    assert connects["count"] >= 2 and connects["since"] <= connects["ts"]  # curl's tunnel and Claude Code's
    # both are gone: the ports are free again
    for port in ports.values():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still listening after the trial stopped"
