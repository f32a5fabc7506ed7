"""Dense decoder LMs by size: `--config experiments/dense.py:SIZE`, SIZE in tiny, d512, 125m, 350m, 1b.

    python -m gqlm.train --config experiments/dense.py:350m --workdir DIR --dry_run
"""

from gqlm.presets import dense_experiment


def get_config(size: str = "125m"):
    return dense_experiment(size)
