"""Fixtures shared by the end-to-end tests: a fake Anthropic upstream and real gateway processes.

Also the suite's hygiene check: a run that leaves a new file in the checkout (a record log appended to
`usage.jsonl` at the project root, which `scripts/usage_report` reads by default) fails, naming the files.
Tests write into their temporary folders only (the mitmweb screenshots too, unless LLM_GATEWAY_ARTIFACTS names a folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from fakes.upstream import FakeUpstream
from harness import Gateway


ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RULES = ROOT / "rules.yaml"
# Folders a run may write in the checkout: tool state and caches.
_MAY_WRITE = {".git", ".hypothesis", ".pytest_cache", "__pycache__", "node_modules"}


def _checkout_files() -> set[str]:
    """Every file in the checkout outside the folders a run may write and the virtual environments."""
    found = set()
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _MAY_WRITE and not d.startswith(".venv") and not d.endswith(".egg-info")]
        found.update(os.path.relpath(os.path.join(folder, n), ROOT) for n in names)
    return found


def pytest_sessionstart(session):
    session.config.stash[_BEFORE] = _checkout_files()


def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_BEFORE, None)
    if before is None:
        return
    left = sorted(_checkout_files() - before)
    if left:
        session.config.get_terminal_writer().line(
            "tests left files in the checkout (write into tmp_path instead): " + ", ".join(left), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_BEFORE = pytest.StashKey[set]()


def routed_rules(fake_url: str, extra: str = "", clients: list[dict] | None = None) -> str:
    """Rules that treat api.anthropic.com as the API and send it to `fake_url`, in both modes.

    The client signatures are the default rule file's unless `clients` is given.
    """
    if clients is None:
        clients = yaml.safe_load(DEFAULT_RULES.read_text())["clients"]
    return yaml.safe_dump({"clients": clients}) + f"""\
apis:
  - name: anthropic
    hosts: [api.anthropic.com]
    paths: ["/v1/messages", "/v1/messages/*", "/anthropic/v1/messages", "/anthropic/v1/messages/*"]
routes:
  - match: {{host: api.anthropic.com}}
    upstream: {fake_url}
egress:
  default: deny
  allow: [api.anthropic.com]
  inspect: [api.anthropic.com]
{extra}"""


@pytest.fixture
def fake():
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def module_fake():
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def custody_gw(tmp_path_factory, module_fake):
    """A gateway holding the key (the credentials tests' rules) in front of the module's fake: the gateway's own
    401 and the rules around key custody (tests/conformance, tests/e2e/test_e2e_fidelity.py)."""
    from e2e.test_e2e_credentials import UPSTREAM_KEY, credentials_rules
    from secretvolume import write_secret

    key_file = write_secret(tmp_path_factory.mktemp("custody") / "secret", "api-key", UPSTREAM_KEY + "\n")
    with Gateway(credentials_rules(module_fake.url, key_file)) as gateway:
        yield gateway


@pytest.fixture
def gateway_factory():
    """Start gateways for one test; all are stopped at its end."""
    started: list[Gateway] = []

    def start(rules: str, **kw) -> Gateway:
        gw = Gateway(rules, **kw).start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()
