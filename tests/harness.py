"""A real `mitmdump -s addons/gateway.py` process for end-to-end tests.

Each gateway gets its own temporary confdir (so its own CA), its own rule file and usage log, and
listens on 127.0.0.1 ports the OS picks; the ports are read back from mitmdump's own output.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_SCRIPT = ROOT / "addons" / "gateway.py"
BIN = Path(sys.executable).parent
LISTEN_RE = re.compile(r"(HTTP\(S\) proxy|[Rr]everse proxy to \S+) listening at \*?\[?([\d.:]+?)\]?:(\d+)")
WEB_RE = re.compile(r"Web server listening at (http://\S+?/)(?:\?token=(\w+))?(?:\s|$)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """Start with `Gateway(rules_text, reverse_to=…)`; use as a context manager."""

    def __init__(
        self,
        rules: str,
        *,
        reverse_to: str | None = "https://api.anthropic.com",
        regular: bool = True,
        tool: str = "mitmdump",
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        workdir: Path | None = None,
        web_password: str | None = None,
        split_stdout: bool = False,
    ) -> None:
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="llmgw-e2e-"))
        self.confdir = self.dir / "confdir"
        self.confdir.mkdir(exist_ok=True)
        self.rules_path = self.dir / "rules.yaml"
        self.rules_path.write_text(rules)
        self.usage_log = self.dir / "usage.jsonl"
        self.output_path = self.dir / "mitmdump.log"
        # split_stdout: standard output goes to stdout_path alone (gateway_log=- records), stderr to output_path
        self.stdout_path = self.dir / "stdout.log" if split_stdout else None
        self.reverse_to = reverse_to
        self.regular = regular
        self.tool = tool
        self.extra_args = extra_args
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.regular_port: int | None = None
        self.reverse_port: int | None = None
        # mitmweb only: its UI/REST API on 127.0.0.1:web_port, and the token it accepts
        self.web_password = web_password
        self.web_port: int | None = None
        self.web_url: str | None = None
        self.web_token: str | None = web_password

    # -- life cycle -------------------------------------------------------------------------------

    def args(self) -> list[str]:
        # mitmproxy refuses two listeners on port 0, so pick free ports (mitmdump reports what it bound)
        args = [str(BIN / self.tool), "-s", str(GATEWAY_SCRIPT)]
        if self.regular:
            args += ["--mode", f"regular@127.0.0.1:{free_port()}"]
        if self.reverse_to:
            args += ["--mode", f"reverse:{self.reverse_to}@127.0.0.1:{free_port()}"]
        args += [
            "--set", f"confdir={self.confdir}",
            "--set", f"gateway_rules={self.rules_path}",
            "--set", f"gateway_log={self.usage_log}",
            "--set", "connection_strategy=lazy",
        ]
        if self.tool == "mitmweb":
            self.web_port = self.web_port or free_port()
            args += ["--set", "web_host=127.0.0.1", "--set", f"web_port={self.web_port}", "--set", "web_open_browser=false"]
            if self.web_password:
                args += ["--set", f"web_password={self.web_password}"]
        return args + list(self.extra_args)

    def start(self, timeout: float = 30) -> "Gateway":
        out = open(self.output_path, "wb")
        stdout = open(self.stdout_path, "wb") if self.stdout_path else out
        self.proc = subprocess.Popen(
            self.args(), stdout=stdout, stderr=out if self.stdout_path else subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.env or {})}, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        wanted = int(self.regular) + int(bool(self.reverse_to))
        while time.monotonic() < deadline:
            output = self.output()
            found = LISTEN_RE.findall(output)
            web = WEB_RE.search(output) if self.tool == "mitmweb" else None
            if len(found) >= wanted and (web or self.tool != "mitmweb"):
                if web:
                    self.web_url = web.group(1)
                    self.web_token = self.web_password or web.group(2)
                for kind, _addr, port in found:
                    if kind.startswith("HTTP(S)"):
                        self.regular_port = int(port)
                    else:
                        self.reverse_port = int(port)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.tool} exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.tool} did not start listening:\n{self.output()}")

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode if self.proc else None

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what tests look at ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.reverse_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.regular_port}"

    @property
    def ca_cert(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def ca_bundle(self) -> Path:
        """A bundle for SSL_CERT_FILE: certifi's CAs plus this gateway's (SSL_CERT_FILE replaces the bundle)."""
        import certifi

        bundle = self.dir / "ca-bundle.pem"
        bundle.write_text(Path(certifi.where()).read_text() + "\n" + self.ca_cert.read_text())
        return bundle

    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def write_rules(self, text: str) -> None:
        """Replace the rule file atomically (as an editor's save or a ConfigMap update would)."""
        tmp = self.rules_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.rules_path)

    def wait_for_output(self, needle: str, timeout: float = 10, after: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.output()
            if needle in text[after:]:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in gateway output:\n{self.output()}")

    def records(self, timeout: float = 5, count: int = 1, kind: str | None = "usage") -> list[dict]:
        """The records of `kind` (None: every kind) written so far, waiting up to `timeout` for `count`."""
        return self.wait_records(None, count, timeout, kind)

    def wait_records(self, match, count: int, timeout: float = 10, kind: str | None = "usage") -> list[dict]:
        """The records of `kind` for which `match(record)` is true (every one for None), once there are `count`
        of them or `timeout` passed (the gateway writes records off the request path, up to 0.1 s after the
        exchange ended)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.usage_log.read_text().splitlines() if self.usage_log.exists() else []
            found = [r for r in map(json.loads, lines)
                     if (kind is None or r.get("kind") == kind) and (match is None or match(r))]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def wait_record(self, match, timeout: float = 10, kind: str | None = "usage") -> dict:
        """The first record for which `match(record)` is true, waiting up to `timeout` for it."""
        found = self.wait_records(match, 1, timeout, kind)
        if not found:
            raise AssertionError(f"no matching record within {timeout}s; records: {self.records(timeout=0, kind=None)}")
        return found[0]
