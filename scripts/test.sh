#!/usr/bin/env bash
# Sets up (with the test, parity and beam extras) and runs the whole test suite, slow tests included.
# Extra arguments go to pytest, e.g. -m "not slow" or -k soap.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,parity,beam
exec .venv/bin/python -m pytest -n 2 -q "$@"
