"""Command-line entry points: dry run, and train -> eval -> sample end to end.

Bad input (one line naming the culprit, exit 2, workdir untouched) is tests/test_bad_inputs.py."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SMOKE = "experiments/tiny_cpu.py:smoke"


def run_cli(module, *args, cwd=ROOT):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_dry_run_of_the_pod_model_allocates_nothing():
    result = run_cli("gqlm.train", "--config", "experiments/dense_1b.py", "--dry_run", "--nodry_run_compile",
                     "--config.mesh.fsdp=-1", "--config.mesh.data=1")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "parameters:" in out and "FLOPs per token" in out and "per-device memory" in out
    assert "fsdp" in out  # parameters are sharded along fsdp
    total = int(re.search(r"total ([\d,]+)", out).group(1).replace(",", ""))
    assert 0.8e9 < total < 2.5e9


@pytest.mark.slow
def test_train_eval_sample_entry_points(tmp_path):
    workdir = str(tmp_path / "run")
    result = run_cli("gqlm.train", "--config", SMOKE, "--workdir", workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final validation" in result.stdout and "sample" in result.stdout
    assert os.path.isdir(os.path.join(workdir, "tensorboard"))
    result = run_cli("gqlm.eval", "--workdir", workdir, "--batches", "2")
    assert result.returncode == 0 and '"bpb"' in result.stdout, result.stderr[-3000:]
    result = run_cli("gqlm.sample", "--workdir", workdir, "--prompt", "KING", "--num_tokens", "8",
                     "--temperature", "0")
    assert result.returncode == 0 and result.stdout.startswith("KING"), result.stderr[-3000:]
