#!/usr/bin/env bash
# Sets up (with the test, parity, beam, eval and wandb extras) and runs the whole test suite, slow tests included.
# Extra arguments go to pytest, e.g. -m "not slow" or -k soap.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,parity,beam,eval,wandb
exec .venv/bin/python -m pytest -n 2 -q "$@"
