"""The processes the benchmark starts, and what it reads about them from /proc.

Every process runs in a session of its own and is stopped through its process group, so a proxy's
workers go with it; `Processes` stops everything it started, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import Gateway, free_port

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Child:
    """A helper server (the load sources): started, waited for, stopped with its group."""

    def __init__(self, name: str, args: list[str], ready: str, env: dict[str, str] | None = None) -> None:
        self.name, self.args, self.ready = name, args, re.compile(ready)
        self.env = env
        self.dir = Path(tempfile.mkdtemp(prefix=f"llmgw-bench-{name}-"))
        self.log = self.dir / "output.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 30) -> "Child":
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{ROOT / 'addons'}", **(self.env or {})},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.ready.search(self.log.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        text = self.log.read_text(errors="replace")
        self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{text[-3000:]}")

    def stop(self) -> None:
        stop_group(self.proc)


def stop_group(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def source() -> Child:
    return Child("source", [sys.executable, "-m", "bench.source", "--port", "0"], r"listening on http://127\.0\.0\.1:(\d+)")


def fake_upstream() -> Child:
    return Child("fake", [sys.executable, str(TESTS / "fakes" / "upstream.py"), "--port", "0"],
                 r"listening on http://127\.0\.0\.1:(\d+)")


class BareMitmdump(Gateway):
    """mitmdump with no addon: reverse mode straight to the upstream, the harness's other options."""

    def __init__(self, upstream: str, options: tuple[str, ...]) -> None:
        super().__init__("", reverse_to=upstream, regular=False, extra_args=options)

    def args(self) -> list[str]:
        args = [str(BIN / "mitmdump"), "--mode", f"reverse:{self.reverse_to}@127.0.0.1:{free_port()}",
                "--set", f"confdir={self.confdir}", "--set", "connection_strategy=lazy"]
        return args + list(self.extra_args)


# ----------------------------------------------------------------------------------------- /proc


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of these processes (all their threads)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_kb(pids: list[int]) -> int:
    return sum(status_kb(p, "VmRSS:") for p in pids)


def reset_peak(pids: list[int]) -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not allowed."""
    ok = True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


def peak_kb(pids: list[int]) -> int:
    return sum(status_kb(p, "VmHWM:") for p in pids)
