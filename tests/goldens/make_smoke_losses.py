"""Writes tests/goldens/smoke_losses.json: per-step losses of the smoke configs, trained through the CLI.

The refactor test (tests/test_architecture.py) retrains the same configs and requires bit-identical
losses. The goldens were generated from the last commit before the one-way-architecture refactor:

    git checkout f9fd266 && .venv/bin/python tests/goldens/make_smoke_losses.py

The script uses only the CLI and the `metrics.jsonl` it writes, so it runs on both sides of the change.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

# (name, experiment spec, overrides): the LM demo's smoke variant and the GQ-VAE tokenizer's.
RUNS = (
    ("lm_smoke", "experiments/tiny_cpu.py:smoke", ("--config.train.log_every=1",)),
    ("gqvae_smoke", "experiments/gqvae_shakespeare.py:smoke",
     ("--config.train.log_every=1", "--config.train.steps=12")),
)
GOLDEN = pathlib.Path(__file__).with_name("smoke_losses.json")
REPO = pathlib.Path(__file__).resolve().parents[2]


def train_losses(spec: str, overrides: tuple[str, ...]) -> list[str]:
    """Per-step training losses (float.hex, so equality is bitwise) of one CLI run."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    with tempfile.TemporaryDirectory() as workdir:
        subprocess.run([sys.executable, "-m", "gqlm.train", "--config", spec, "--workdir", workdir,
                        "--config.train.sample_tokens=0", "--config.train.progress=False", *overrides],
                       cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [float(r["loss"]).hex() for r in rows if r["split"] == "train"]


def main() -> None:
    golden = {name: {"spec": spec, "overrides": list(overrides), "losses": train_losses(spec, overrides)}
              for name, spec, overrides in RUNS}
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
