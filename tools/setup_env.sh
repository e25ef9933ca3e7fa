#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs the pinned dependencies and jaxeff
# (editable). Idempotent: a second run only checks a stamp and returns.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.jaxeff-setup-stamp"

find_python() {
  local candidates=()
  [ -n "${JAXEFF_PYTHON:-}" ] && candidates+=("$JAXEFF_PYTHON")
  candidates+=(python3.14 python3.13 python3.12 python3 python)
  if command -v pyenv >/dev/null 2>&1; then
    local proot; proot="$(pyenv root 2>/dev/null || true)"
    if [ -n "$proot" ]; then
      for p in "$proot"/versions/3.1[2-9]*/bin/python3.1[2-9]; do [ -x "$p" ] && candidates+=("$p"); done
    fi
  fi
  for p in "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3.1[2-9] /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
    [ -x "$p" ] && candidates+=("$p")
  done
  for c in "${candidates[@]}"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  return 1
}

want="$(cat "$root/requirements/dev.txt" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  py="$(find_python)" || {
    echo "jaxeff needs Python >= 3.12 with venv: install it (e.g. 'pyenv install 3.12' or 'apt-get install python3.12 python3.12-venv') or set JAXEFF_PYTHON=/path/to/python3.12" >&2
    exit 1
  }
  echo "setup: creating .venv with $py ($("$py" --version 2>&1))" >&2
  "$py" -m venv "$venv"
fi
echo "setup: installing pinned dependencies into .venv" >&2
pip_quiet() {  # pip's output minus warnings about absent local mirrors
  "$venv/bin/python" -m pip "$@" 2> >(grep -v -e "is ignored: it is neither" -e "BuildBackendWarning" >&2)
}
pip_quiet install -q --disable-pip-version-check -r "$root/requirements/dev.txt"
pip_quiet install -q --disable-pip-version-check --no-deps -e "$root" >/dev/null
echo "$want" > "$stamp"
echo "setup: done" >&2
