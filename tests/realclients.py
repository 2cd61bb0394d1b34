"""Helpers for tests that drive real clients: Claude Code and the LiteLLM proxy.

The clients live outside the repo, in ``${LLM_GATEWAY_CACHE:-$HOME/.cache/llm-gateway}``, put there by
``scripts/test-tools``. A missing client FAILS the test, unless ``LLM_GATEWAY_ALLOW_SKIP=1`` is set, in which
case it is skipped: CI must not skip real-client tests silently.

    def test_x(fake):
        done = run_claude("hello", base_url=fake.url)
        assert done.stdout.strip() == "Hello from the fake upstream"

    with LiteLLMProxy("1.91.5", anthropic_base_url=fake.url) as proxy:
        httpx.post(proxy.url + "/anthropic/v1/messages", headers={"Authorization": f"Bearer {proxy.master_key}"}, ...)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping

import pytest

CLAUDE_CODE_VERSION = "2.1.330"  # what scripts/test-tools installs
LITELLM_VERSIONS = ("1.91.5", "1.106.2")
INSTALL_HINT = "run scripts/test-tools to install it"

# Variables of the parent environment that must not leak into a client run (they would send it elsewhere).
_LEAKY_PREFIXES = ("ANTHROPIC_", "CLAUDE", "LITELLM_", "OPENAI_", "AWS_", "GOOGLE_", "VERTEX", "BEDROCK")
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def cache_dir() -> Path:
    """Where scripts/test-tools installs the real clients."""
    base = os.environ.get("LLM_GATEWAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llm-gateway")
    return Path(base)


def _missing(what: str) -> None:
    reason = f"{what}: {INSTALL_HINT} (cache: {cache_dir()})"
    if os.environ.get("LLM_GATEWAY_ALLOW_SKIP") == "1":
        pytest.skip(reason)
    pytest.fail(reason + "; set LLM_GATEWAY_ALLOW_SKIP=1 to skip instead", pytrace=False)


def claude_binary() -> Path:
    """The Claude Code executable, or fail (skip with LLM_GATEWAY_ALLOW_SKIP=1)."""
    path = cache_dir() / "claude-code" / "node_modules" / ".bin" / "claude"
    if not (path.exists() and os.access(path, os.X_OK)):
        _missing(f"Claude Code is not installed at {path}")
    return path


def litellm_binary(version: str) -> Path:
    """The ``litellm`` proxy executable of this version, or fail (skip with LLM_GATEWAY_ALLOW_SKIP=1)."""
    root = cache_dir() / f"litellm-{version}"
    path = root / "bin" / "litellm"
    if not (path.exists() and os.access(path, os.X_OK)):
        _missing(f"LiteLLM {version} is not installed at {path}")
    if not any(root.glob(f"lib/python3*/site-packages/litellm-{version}.dist-info")):
        _missing(f"{root} does not hold litellm {version}")
    return path


def _base_env(env_extra: Mapping[str, str] | None) -> dict[str, str]:
    """A clean environment: the parent's, less anything that would point a client somewhere else."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(_LEAKY_PREFIXES) and k.lower() not in _PROXY_VARS
        and not k.startswith(("PYTEST_", "NODE_OPTIONS", "NODE_EXTRA_CA_CERTS", "SSL_CERT_", "REQUESTS_CA_BUNDLE"))
    }
    env.update(env_extra or {})
    return env


# ---------------------------------------------------------------------------------------------- Claude Code
def claude_env(home: str | os.PathLike, *, base_url: str | None = None, env_extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment run_claude uses: offline, non-interactive, with a throwaway HOME."""
    env = _base_env(None)
    env.update(
        {
            "HOME": str(home),
            "XDG_CONFIG_HOME": os.path.join(str(home), ".config"),
            "XDG_CACHE_HOME": os.path.join(str(home), ".cache"),
            "ANTHROPIC_API_KEY": "sk-ant-api03-dummy-key-for-tests-000000000000000000000000",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "DISABLE_BUG_COMMAND": "1",
            "CLAUDE_CODE_DISABLE_TERMINAL_TITLE": "1",
            "CLAUDE_CODE_DISABLE_FEEDBACK_SURVEY": "1",
            "CLAUDE_CODE_MAX_RETRIES": "0",
            "TERM": "dumb",
            "NO_COLOR": "1",
        }
    )
    if base_url is not None:
        env["ANTHROPIC_BASE_URL"] = base_url
    env.update(env_extra or {})
    return env


def run_claude(
    prompt: str,
    *,
    base_url: str | None = None,
    env_extra: Mapping[str, str] | None = None,
    timeout: float = 120,
    args: Iterable[str] = (),
    cwd: str | os.PathLike | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``claude -p PROMPT`` offline, non-interactively, with a throwaway HOME (and working folder).

    ``base_url`` sets ANTHROPIC_BASE_URL (leave it None for egress mode and pass HTTPS_PROXY and
    NODE_EXTRA_CA_CERTS in ``env_extra``). ``env_extra`` overrides anything, e.g. ``CLAUDE_CODE_MAX_RETRIES``
    (0 by default so an error answer ends the run at once). ``args`` are extra CLI arguments
    (e.g. ``["--output-format", "json"]``). The result also carries ``.home`` (already deleted) and ``.env``.
    """
    binary = claude_binary()
    home = tempfile.mkdtemp(prefix="claude-home-")
    try:
        # Mark onboarding and the folder's trust dialog as done, so nothing can stop to ask.
        workdir = Path(cwd) if cwd is not None else Path(home) / "work"
        workdir.mkdir(parents=True, exist_ok=True)
        (Path(home) / ".claude.json").write_text(
            json.dumps(
                {
                    "hasCompletedOnboarding": True,
                    "bypassPermissionsModeAccepted": True,
                    "projects": {str(workdir): {"hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True}},
                }
            )
        )
        env = claude_env(home, base_url=base_url, env_extra=env_extra)
        cmd = [str(binary), "-p", prompt, *args]
        try:
            done = subprocess.run(
                cmd, env=env, cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            raise AssertionError(f"claude -p timed out after {timeout}s\nstdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}") from None
        done.home = home  # type: ignore[attr-defined]
        done.env = env  # type: ignore[attr-defined]
        if check and done.returncode != 0:
            raise AssertionError(f"claude -p exited {done.returncode}\nstdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}")
        return done
    finally:
        shutil.rmtree(home, ignore_errors=True)


# -------------------------------------------------------------------------------------------------- LiteLLM
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _yaml(obj: Any) -> str:
    # JSON is valid YAML: no yaml dependency needed to write LiteLLM's config.
    return json.dumps(obj, indent=2)


class LiteLLMProxy:
    """A real LiteLLM proxy of one version on a free 127.0.0.1 port, no database, offline.

    ``anthropic_base_url``: where the pass-through route ``/anthropic/…`` forwards (ANTHROPIC_API_BASE).
    ``models``: routed ``model_list`` entries, each a model name (served as ``anthropic/<name>`` at
    ``routed_api_base``, default ``anthropic_base_url``) or a full LiteLLM model_list dict.
    ``config_extra`` is merged into the top level of the generated config; ``env_extra`` into its environment.
    Clients authenticate with ``Authorization: Bearer <master_key>`` (or ``x-api-key`` on the pass-through).
    """

    def __init__(
        self,
        version: str = LITELLM_VERSIONS[0],
        *,
        anthropic_base_url: str | None = None,
        models: Iterable[str | Mapping[str, Any]] = (),
        routed_api_base: str | None = None,
        api_key: str = "sk-ant-api03-litellm-upstream-dummy-key",
        master_key: str | None = None,
        port: int | None = None,
        env_extra: Mapping[str, str] | None = None,
        config_extra: Mapping[str, Any] | None = None,
        ready_timeout: float = 90,
    ):
        self.version = version
        self.anthropic_base_url = anthropic_base_url
        self.models = list(models)
        self.routed_api_base = routed_api_base or anthropic_base_url
        self.api_key = api_key
        self.master_key = master_key or "sk-" + secrets.token_hex(24)
        self.port = port
        self.env_extra = dict(env_extra or {})
        self.config_extra = dict(config_extra or {})
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.log_path: Path | None = None
        self.config_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict:
        model_list = []
        for m in self.models:
            if isinstance(m, Mapping):
                model_list.append(dict(m))
                continue
            params: dict[str, Any] = {"model": f"anthropic/{m}", "api_key": "os.environ/ANTHROPIC_API_KEY"}
            if self.routed_api_base:
                params["api_base"] = self.routed_api_base
            model_list.append({"model_name": m, "litellm_params": params})
        cfg: dict[str, Any] = {
            "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
            "litellm_settings": {"telemetry": False, "drop_params": True},
            "router_settings": {"num_retries": 0, "disable_cooldowns": True},
        }
        if model_list:
            cfg["model_list"] = model_list
        for k, v in self.config_extra.items():
            if isinstance(v, Mapping) and isinstance(cfg.get(k), dict):
                cfg[k] = {**cfg[k], **v}
            else:
                cfg[k] = v
        return cfg

    def env(self) -> dict[str, str]:
        env = _base_env(None)
        env.update(
            {
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
                "LITELLM_MASTER_KEY": self.master_key,
                "ANTHROPIC_API_KEY": self.api_key,
                "LITELLM_LOG": "INFO",
                "LITELLM_TELEMETRY": "False",
                "DISABLE_ADMIN_UI": "True",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.anthropic_base_url:
            env["ANTHROPIC_API_BASE"] = self.anthropic_base_url
            env["ANTHROPIC_BASE_URL"] = self.anthropic_base_url
        env.update(self.env_extra)
        return env

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def _fail(self, why: str) -> None:
        log = self.log_text()
        self.stop()
        raise RuntimeError(f"LiteLLM {self.version} proxy {why}; its log ({self.log_path}):\n{log[-6000:]}")

    def start(self) -> "LiteLLMProxy":
        binary = litellm_binary(self.version)
        self._tmp = tempfile.TemporaryDirectory(prefix=f"litellm-{self.version}-")
        tmp = Path(self._tmp.name)
        self.config_path = tmp / "config.yaml"
        self.config_path.write_text(_yaml(self.config()))
        self.log_path = tmp / "litellm.log"
        if self.port is None:
            self.port = free_port()
        cmd = [str(binary), "--config", str(self.config_path), "--host", "127.0.0.1", "--port", str(self.port), "--num_workers", "1"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env(), cwd=tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                self._fail(f"exited with {self.proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(self.url + "/health/liveliness", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self._fail(f"not ready after {self.ready_timeout}s")
            time.sleep(0.25)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # our own process group: the proxy and its workers
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "LiteLLMProxy":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.close()
