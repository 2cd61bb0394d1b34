# Shared by the scripts: find a Python >= 3.12 and make the project's virtualenv when it is missing.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LLM_GATEWAY_VENV:-$ROOT/.venv}"

# The machine's python3 may be older; pyenv may hold a 3.12 whose shim only works with PYENV_VERSION.
find_python312() {
  local candidate version
  if [ -n "${LLM_GATEWAY_PYTHON:-}" ]; then echo "$LLM_GATEWAY_PYTHON"; return 0; fi
  for candidate in python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9]' | sort -V); do
      candidate="$(pyenv root)/versions/$version/bin/python3"
      if [ -x "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
        echo "$candidate"; return 0
      fi
    done
  fi
  return 1
}

ensure_venv() {  # ensure_venv [extras]: create .venv and install the project (with extras) if needed
  local extras="${1:-}" marker
  marker="$VENV/.installed${extras:+-$extras}"
  for done in "$marker" "$VENV/.installed-test"; do  # the test install includes the plain one
    if [ -x "$VENV/bin/python" ] && [ -f "$done" ] && [ "$done" -nt "$ROOT/pyproject.toml" ]; then
      return 0
    fi
  done
  if [ ! -x "$VENV/bin/python" ]; then
    local py
    py="$(find_python312)" || {
      echo "error: mitmproxy 12 needs Python >= 3.12 and none was found (tried python3.12, python3.13, python3, pyenv versions). Install one or set LLM_GATEWAY_PYTHON=/path/to/python3.12." >&2
      return 1
    }
    echo "creating $VENV with $py" >&2
    "$py" -m venv "$VENV" || return 1
  fi
  echo "installing the gateway${extras:+ with [$extras]} into $VENV" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT${extras:+[$extras]}" 2> >(grep -v '^WARNING: Location' >&2) || return 1
  touch "$marker"
}
