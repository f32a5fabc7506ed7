"""Command-line behaviour: bad input -> one line naming the culprit, exit 2, nothing written."""

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


def bad_inputs(tmp):
    empty = tmp / "empty.txt"
    empty.write_text("")
    broken = tmp / "broken.py"
    broken.write_text("def get_config(:\n")
    return [
        (["--config.model.num_layerz=2"], "model.num_layerz"),
        (["--config.model.num_layers=two"], "model.num_layers"),
        (["--config.model.num_layers"], "--config.model.num_layers"),
        (["--config.mesh.data=3"], "mesh"),
        (["--config.model.num_heads=3"], "model.num_heads=3"),
        (["--config.data.batch_size=12"], "data.batch_size=12"),
        (["--config.data.seq_len=4096"], "data.seq_len=4096"),
        (["--config.data.corpus=text_files", f"--config.data.glob={tmp}/nothing/*.txt"], "data.glob"),
        (["--config.data.corpus=text_files", f"--config.data.glob={empty}"], "empty"),
        (["--config.data.tokenizer=bpe:/no/such/dir"], "/no/such/dir"),
        (["--config.optimizer.name=adamq"], "optimizer.name"),
        ({"config": str(tmp / "missing.py")}, "missing.py"),
        ({"config": str(broken)}, "broken.py"),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
    for args, culprit in bad_inputs(tmp_path):
        workdir = tmp_path / "workdir"
        config = args["config"] if isinstance(args, dict) else SMOKE
        extra = [] if isinstance(args, dict) else args
        result = run_cli("gqlm.train", "--config", config, "--workdir", str(workdir), *extra)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("gqlm: error:"), (args, result.stderr[-2000:])
        assert culprit in lines[0], (args, lines[0])
        assert not workdir.exists(), args


def test_dry_run_of_the_pod_model_allocates_nothing():
    result = run_cli("gqlm.train", "--config", "experiments/dense_1b.py", "--dry_run",
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
