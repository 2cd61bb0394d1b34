"""Declared dependencies: deptry finds every import declared, none transitive, none unused; the lock holds them.

A module that only arrives as another package's dependency breaks a fresh machine while every warm venv
passes (mitmproxy 12.3 swapped `zstandard` for `backports.zstd` under us). deptry knows Python packaging:
which distribution provides which module, extras, and the standard library of the running Python.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPTRY = Path(sys.executable).parent / "deptry"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def deptry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(DEPTRY), "--no-ansi", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_gateway_imports_only_its_runtime_dependencies():
    """addons/ may import what [project].dependencies declares, and nothing from the test extra."""
    result = deptry("addons")
    assert result.returncode == 0, result.stdout + result.stderr


def test_tests_and_scripts_import_only_declared_packages():
    """The test extra counts as regular dependencies here, so an unused test package is reported too."""
    result = deptry("addons", "tests", "scripts", "--optional-dependencies-dev-groups", "")
    assert result.returncode == 0, result.stdout + result.stderr


def test_deptry_reports_an_undeclared_import(tmp_path):
    """The check can fail: a package importing a module nothing declares is refused."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("import zstandard\nimport yaml\n")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "0"\ndependencies = ["pyyaml"]\n')
    result = subprocess.run([str(DEPTRY), "--no-ansi", "pkg"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert re.search(r"DEP00[13] 'zstandard'", result.stdout + result.stderr)


def _locked(name: str) -> dict[str, str]:
    """{normalised package name: version} of a requirements lock file."""
    text = (ROOT / "requirements" / name).read_text()
    return {m[1].lower().replace("_", "-"): m[2] for m in re.finditer(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", text, re.M)}


def _names(specs: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!\[;~]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


@pytest.mark.parametrize("lock, groups", [("gateway.txt", ["dependencies"]), ("test.txt", ["dependencies", "test"])])
def test_lock_holds_every_declared_dependency(lock, groups):
    """scripts/lock was run after pyproject.toml last changed (at least every declared name is locked)."""
    project = PYPROJECT["project"]
    declared = set()
    for group in groups:
        declared |= _names(project["dependencies"] if group == "dependencies" else project["optional-dependencies"][group])
    missing = declared - set(_locked(lock))
    assert not missing, f"requirements/{lock} lacks {sorted(missing)}: run scripts/lock"


def test_gateway_lock_is_the_test_lock_less_the_test_packages():
    gateway, test = _locked("gateway.txt"), _locked("test.txt")
    assert {name: test.get(name) for name in gateway} == gateway
    for lock in ("gateway.txt", "test.txt"):  # every pin carries its hashes, so pip and uv install with --require-hashes
        pins = re.split(r"^(?=[A-Za-z0-9])", (ROOT / "requirements" / lock).read_text(), flags=re.M)
        assert all("--hash=sha256:" in pin for pin in pins if "==" in pin), lock


def test_no_second_lock_that_scripts_lock_does_not_refresh():
    """requirements/*.txt is the lock. A uv.lock beside it is what `uv sync` and `uv run` read, and scripts/lock
    never refreshes it: the one committed with issue 14 already lacked zstandard, the very module whose absence
    broke fresh machines. Any other lock file must hold every pin of requirements/test.txt."""
    stray = ROOT / "uv.lock"
    if stray.exists():
        locked = {p["name"].lower().replace("_", "-"): p.get("version")
                  for p in tomllib.loads(stray.read_text())["package"]}
        assert {n: locked.get(n) for n in _locked("test.txt")} == _locked("test.txt")
