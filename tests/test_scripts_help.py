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

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["test", "test-latest", "lock"])
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
