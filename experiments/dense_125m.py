"""GPT-2-small-shaped dense LM (12 x 768) on python_stdlib; a GPU/TPU-slice job.

    python -m gqlm.train --config experiments/dense_125m.py --workdir DIR [--dry_run]
"""

from gqlm.presets import dense_experiment


def get_config(arg: str = ""):
    return dense_experiment(arg or "125m")
