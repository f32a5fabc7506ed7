"""Shared by the end-to-end training tests: configs, the training CLI (one or several processes),
what a run wrote (metrics.jsonl, checkpoints) and exact tree comparisons."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from gqlm import config as config_lib
from gqlm.train import checkpoint as ckpt_lib
from gqlm.train.experiment import build_experiment
from gqlm.train.tasks.lm import LMTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "experiments/tiny_cpu.py:smoke"
MOE_SMOKE = "experiments/moe_tiny_cpu.py:smoke"
QUIET = {"train.sample_tokens": 0, "train.eval_every": 1000, "train.log_every": 1}
CPU8 = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}


def smoke_config(experiment=SMOKE, **overrides):
    """`experiment` ("path:arg") with QUIET logging (every step, no sample) and `overrides`."""
    config = config_lib.load_experiment(os.path.join(ROOT, experiment))
    return config_lib.apply_overrides(config, {**QUIET, **overrides})


def cli_command(workdir, *extra, experiment=SMOKE, num_processes=1, **overrides):
    """`python -m gqlm.train` on 8 CPU devices in all: 1 process x 8, or N x 8/N (launch/local.py)."""
    command = [sys.executable, "-m", "gqlm.train", "--config", experiment, "--workdir", str(workdir),
               *[f"--config.{k}={v}" for k, v in {**QUIET, **overrides}.items()], *extra]
    if num_processes > 1:
        command = [sys.executable, "launch/local.py", f"--num_processes={num_processes}",
                   f"--devices_per_process={8 // num_processes}", "--timeout=120", "--", *command]
    return command


def start_cli(workdir, *extra, **overrides):
    return subprocess.Popen(cli_command(workdir, *extra, **overrides), cwd=ROOT, env={**os.environ, **CPU8},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_cli(workdir, *extra, timeout=300, **overrides):
    return subprocess.run(cli_command(workdir, *extra, **overrides), cwd=ROOT, env={**os.environ, **CPU8},
                          capture_output=True, text=True, timeout=timeout)


def metric_rows(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]  # a row being written is skipped


def train_rows(workdir):
    return [r for r in metric_rows(workdir) if r["split"] == "train"]


def saved_steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def load(workdir, step, config):
    """The checkpoint's train state (no data iterator) on `config`'s mesh, as host arrays."""
    exp = build_experiment(config, LMTask())
    with jax.set_mesh(exp.mesh):
        return jax.device_get(ckpt_lib.load_state(str(workdir), exp.abstract, step)[1])


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def trees_differ(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
