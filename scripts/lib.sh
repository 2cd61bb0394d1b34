# Shared by the scripts: find a Python >= 3.12, bring uv, and make the project's virtualenv from the lock.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LLM_GATEWAY_VENV:-$ROOT/.venv}"
CACHE="${LLM_GATEWAY_CACHE:-$HOME/.cache/llm-gateway}"
# uv installs the locked set (and refreshes the lock: scripts/lock). Pinned, so every machine resolves alike.
UV_VERSION=0.13.9
# uv must never fetch a Python of its own: the scripts hand it one that is on the machine.
export UV_PYTHON_DOWNLOADS=never

# help_text USAGE: print USAGE, then the calling script's opening comment (what it does, its switches), for
# --help: which must answer at once, never install anything.
help_text() {
  echo "usage: $1"
  sed -n '2,/^[^#]/s/^#\( \|$\)//p' "$0"
}

# python_ok PY [MINOR]: PY runs and is >= 3.12 (or exactly 3.MINOR when given).
python_ok() {
  local want="${2:-}"
  if [ -n "$want" ]; then
    "$1" -c "import sys; sys.exit(sys.version_info[:2] != (3, $want))" 2>/dev/null
  else
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null
  fi
}

# find_python [MINOR]: print the path of a Python >= 3.12 (or of 3.MINOR). The machine's python3 may be
# older; pyenv may hold one whose `python3.12` shim works only with PYENV_VERSION, so pyenv's own folders
# are searched for the real binary.
find_python() {
  local want="${1:-}" candidate version
  if [ -z "$want" ] && [ -n "${LLM_GATEWAY_PYTHON:-}" ]; then
    python_ok "$LLM_GATEWAY_PYTHON" && { echo "$LLM_GATEWAY_PYTHON"; return 0; }
    echo "error: LLM_GATEWAY_PYTHON=$LLM_GATEWAY_PYTHON is not a Python >= 3.12 (mitmproxy 12 needs one)" >&2
    return 1
  fi
  local names=(python3.12 python3.13 python3)
  [ -n "$want" ] && names=("python3.$want")
  for candidate in "${names[@]}"; do
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate" "$want"; then
      "$candidate" -c 'import sys; print(sys.executable)'; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for version in $(pyenv versions --bare 2>/dev/null | grep -E "^3\.${want:-1[2-9]}(\.|$)" | sort -V); do
      candidate="$(pyenv root)/versions/$version/bin/python3"
      if [ -x "$candidate" ] && python_ok "$candidate" "$want"; then
        echo "$candidate"; return 0
      fi
    done
  fi
  return 1
}

# ensure_uv: set UV to a uv of version UV_VERSION, installing it into $CACHE/uv-$UV_VERSION when missing.
ensure_uv() {
  local dir="$CACHE/uv-$UV_VERSION" py
  if command -v uv >/dev/null 2>&1 && [ "$(uv --version 2>/dev/null | awk '{print $2}')" = "$UV_VERSION" ]; then
    UV="$(command -v uv)"; return 0
  fi
  UV="$dir/bin/uv"
  if [ -x "$UV" ] && [ -f "$dir/.installed" ]; then return 0; fi
  py="$(find_python)" || { echo "error: no Python >= 3.12 found to install uv with" >&2; return 1; }
  echo "installing uv $UV_VERSION into $dir" >&2
  rm -rf "$dir"
  mkdir -p "$CACHE"
  "$py" -m venv "$dir" && "$dir/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION" \
    2> >(grep -v '^WARNING: Location' >&2) || { echo "error: could not install uv $UV_VERSION" >&2; return 1; }
  touch "$dir/.installed"
}

# lock_stamp FILE...: one line that changes when any of the files does (what an install was made from).
lock_stamp() { cat "$@" | sha256sum | cut -c1-16; }

# ensure_venv [test]: create $VENV and install exactly the locked set (requirements/gateway.txt, or
# requirements/test.txt with "test"), then the project itself without dependencies. Done again only when
# the lock or pyproject.toml changed since the last install into this venv.
ensure_venv() {
  local extras="${1:-}" lock marker stamp py
  lock="$ROOT/requirements/${extras:-gateway}.txt"
  [ -f "$lock" ] || { echo "error: $lock is missing (scripts/lock makes it)" >&2; return 1; }
  # one stamp for both sets, so a venv holding the test set also counts as holding the gateway's
  stamp="$(lock_stamp "$ROOT"/requirements/*.txt "$ROOT/pyproject.toml")"
  for marker in "$VENV/.installed-${extras:-gateway}" "$VENV/.installed-test"; do  # test includes the plain set
    if [ -x "$VENV/bin/python" ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$stamp" ]; then
      return 0
    fi
  done
  if [ -x "$VENV/bin/python" ] && ! python_ok "$VENV/bin/python"; then  # left from an older Python: never reused
    echo "error: $VENV has $("$VENV/bin/python" -V 2>&1); mitmproxy 12 needs Python >= 3.12. Remove it (rm -rf $VENV) and run again." >&2
    return 1
  fi
  ensure_uv || return 1
  if [ ! -x "$VENV/bin/python" ]; then
    py="$(find_python)" || {
      echo "error: mitmproxy 12 needs Python >= 3.12 and none was found (tried python3.12, python3.13, python3, pyenv versions). Install one or set LLM_GATEWAY_PYTHON=/path/to/python3.12." >&2
      return 1
    }
    echo "creating $VENV with $py" >&2
    "$UV" venv -q --python "$py" "$VENV" || return 1
  fi
  echo "installing the locked set ${lock#"$ROOT"/} into $VENV" >&2
  "$UV" pip sync -q --python "$VENV/bin/python" --require-hashes "$lock" || return 1
  "$UV" pip install -q --python "$VENV/bin/python" --no-deps -e "$ROOT" || return 1
  rm -f "$VENV"/.installed-*
  echo "$stamp" > "$VENV/.installed-${extras:-gateway}"
}
