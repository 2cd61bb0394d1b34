"""`--help` of the set-up scripts answers at once: it installs nothing, builds no venv and runs no test.

A new user's first command is `scripts/test --help`: it used to install Claude Code, LiteLLM and Chromium
(test-tools) before pytest printed its options; `scripts/test-latest --help` built a fresh venv from PyPI and
then ran an end-to-end test. Run with an empty cache folder, no venv and a PATH without uv, Python 3.12+, npm
or pyenv, so that any attempt to install fails instead of taking minutes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("script", ["test", "test-latest", "lock", "test-tools", "gateway", "trial"])
def test_help_installs_nothing(script, tmp_path):
    cache, venv = tmp_path / "cache", tmp_path / "venv"
    cache.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LLM_GATEWAY_CACHE": str(cache),
           "LLM_GATEWAY_VENV": str(venv), "LLM_GATEWAY_PYTHON": "/nonexistent/python3.12"}
    done = subprocess.run([str(ROOT / "scripts" / script), "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"scripts/{script}" in done.stdout and "usage" in done.stdout.lower()
    assert list(cache.iterdir()) == [] and not venv.exists()


def test_a_python_older_than_3_12_is_refused_before_anything_is_installed(tmp_path):
    """LLM_GATEWAY_PYTHON naming Python 3.11, or a venv left from one, used to end in uv's resolver error, and
    the broken venv stayed: every later run reused it, whatever Python was named then."""
    old = "/usr/bin/python3.11"
    if not os.path.exists(old):
        pytest.skip("no Python 3.11 on this machine")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LLM_GATEWAY_CACHE": str(tmp_path / "cache")}

    def gateway(**more: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "scripts" / "gateway"), "--egress-port", "0", "--base-port", "0"],
                              cwd=ROOT, env={**env, **more}, capture_output=True, text=True, timeout=60)

    done = gateway(LLM_GATEWAY_PYTHON=old, LLM_GATEWAY_VENV=str(tmp_path / "new"))
    assert done.returncode != 0 and "LLM_GATEWAY_PYTHON" in done.stderr and "3.12" in done.stderr, done.stderr
    assert not (tmp_path / "new").exists() and not (tmp_path / "cache").exists()
    subprocess.run([old, "-m", "venv", "--without-pip", str(tmp_path / "stale")], check=True, timeout=60)
    done = gateway(LLM_GATEWAY_VENV=str(tmp_path / "stale"))
    assert done.returncode != 0 and f"rm -rf {tmp_path / 'stale'}" in done.stderr, done.stderr
    assert not (tmp_path / "cache").exists()
