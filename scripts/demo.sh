#!/usr/bin/env bash
# Sets up and trains the demo (experiments/tiny_cpu.py) on an 8-device CPU mesh.
# Extra arguments go to the trainer, e.g. --config.train.steps=100.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORKDIR="${GQLM_DEMO_WORKDIR:-workdirs/tiny_cpu_$(date +%Y%m%d_%H%M%S)}"
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
.venv/bin/python -m gqlm.train --config experiments/tiny_cpu.py --workdir "$WORKDIR" "$@"
echo "workdir: $WORKDIR  (tensorboard --logdir $WORKDIR/tensorboard)"
