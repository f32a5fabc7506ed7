"""A pod-scale ~1B dense LM: FSDP over all devices, bf16 compute, remat, seq 2048.

    python -m gqlm.train --config experiments/dense_1b.py --workdir gs://BUCKET/dense_1b   # on a pod
    python -m gqlm.train --config experiments/dense_1b.py --workdir /tmp/x --dry_run       # anywhere
"""

from gqlm.presets import dense_experiment


def get_config(arg: str = ""):
    return dense_experiment(arg or "1b")
