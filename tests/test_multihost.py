"""The multi-host code path on one machine: several processes joined by jax.distributed (gloo).

Fast: environment detection, multi-slice device grids, per-process data slices, unreachable
coordinator. Slow: 2 processes x 4 devices train exactly like 1 process x 8 devices, and a
checkpoint saved by either restores in the other.
"""

import json
import math
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from gqlm import distributed
from gqlm.config import ConfigError, base_config
from gqlm.data import pipeline
from gqlm.distributed import Plan, detect
from gqlm.tokenizers.byte import ByteTokenizer
from tests.helpers import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
GQLM = {"GQLM_COORDINATOR_ADDRESS": "10.0.0.1:1234", "GQLM_NUM_PROCESSES": "4", "GQLM_PROCESS_ID": "2"}
SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16", "SLURM_PROCID": "3",
         "SLURM_LOCALID": "3"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize("env, on_tpu, plan", [
    ({}, False, None),
    (GQLM, False, Plan("gqlm", "10.0.0.1:1234", 4, 2, None)),
    ({**GQLM, "GQLM_LOCAL_DEVICE_IDS": "4,5"}, False, Plan("gqlm", "10.0.0.1:1234", 4, 2, (4, 5))),
    ({**GQLM, "GQLM_NUM_PROCESSES": "1", "GQLM_PROCESS_ID": "0"}, False, None),  # one process: nothing to join
    ({**GQLM, **SLURM}, False, Plan("gqlm", "10.0.0.1:1234", 4, 2, None)),  # explicit variables win
    (SLURM, False, Plan("slurm")),
    ({**SLURM, "SLURM_NTASKS": "1"}, False, None),
    ({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, False, None),  # sbatch shell, not srun
    ({}, True, Plan("tpu")),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.9"}, False, Plan("tpu")),
    ({"GQLM_DISTRIBUTED": "auto"}, True, Plan("tpu")),
    ({"GQLM_DISTRIBUTED": "auto"}, False, Plan("auto")),
    ({**GQLM, "GQLM_DISTRIBUTED": "off"}, True, None),
])
def test_detect(env, on_tpu, plan):
    assert detect(env, on_tpu_vm=on_tpu) == plan


@pytest.mark.parametrize("env, needle", [
    ({**GQLM, "GQLM_COORDINATOR_ADDRESS": "10.0.0.1"}, "host:port"),
    ({**GQLM, "GQLM_PROCESS_ID": "4"}, "GQLM_PROCESS_ID=4"),
    ({**GQLM, "GQLM_NUM_PROCESSES": "four"}, "GQLM_NUM_PROCESSES='four'"),
    ({k: v for k, v in GQLM.items() if k != "GQLM_PROCESS_ID"}, "GQLM_PROCESS_ID is not set"),
    ({**GQLM, "GQLM_LOCAL_DEVICE_IDS": "0;1"}, "GQLM_LOCAL_DEVICE_IDS"),
    ({"GQLM_DISTRIBUTED": "yes"}, "GQLM_DISTRIBUTED='yes'"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "two", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0"}, "SLURM_NTASKS='two' must be an integer"),
])
def test_detect_bad_variables(env, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        detect(env, on_tpu_vm=False)


def test_multislice_device_grid():
    devices = [SimpleNamespace(id=i, slice_index=i // 8, process_index=i // 4, platform="cpu", device_kind="cpu")
               for i in range(16)]  # 2 slices x 8 devices
    assert distributed.multislice_device_grid((16, 1, 1, 1), devices[:8]) is None  # one slice: plain mesh
    grid = distributed.multislice_device_grid((4, 2, 2, 1), devices)
    assert grid.shape == (4, 2, 2, 1)
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    # data rows 0-1 live in slice 0, rows 2-3 in slice 1: only the data axis crosses slices.
    np.testing.assert_array_equal(slice_of[:, 0, 0, 0], [0, 0, 1, 1])
    assert all(len(np.unique(slice_of[r])) == 1 for r in range(4))
    assert sorted(d.id for d in grid.flat) == list(range(16))
    with pytest.raises(ConfigError, match="mesh.data=3"):
        distributed.multislice_device_grid((3, 1, 1, 1), devices[:3] + devices[8:11])


# ----------------------------------------------------------------------------- data slices


@pytest.fixture(scope="module")
def text_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost_text")
    rng = np.random.default_rng(1)
    for i in range(6):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(["alas", "poor", "yorick", "I", "knew", "him"],
                                                               size=200)))
    c = base_config()
    c.data.corpus, c.data.glob, c.data.data_dir = "text_files", str(root / "*.txt"), str(root / "tfds")
    c.data.seq_len, c.data.batch_size = 16, 8
    return c


@pytest.mark.parametrize("num_processes", [2, 4, 8])
def test_process_slices_are_disjoint_and_cover_the_global_batch(text_config, num_processes):
    tok = ByteTokenizer()
    steps = 3
    whole = pipeline.make_train_iterator(text_config, tok, 0, 1)
    parts = [pipeline.make_train_iterator(text_config, tok, p, num_processes) for p in range(num_processes)]
    for _ in range(steps):
        batch = next(whole)
        rows = [bytes(r) for r in batch["inputs"].astype(np.int32)]
        assert len(set(rows)) == len(rows)  # distinct global rows, so a partition is also disjoint
        local = [next(it) for it in parts]
        for k in KEYS:
            assert all(x[k].shape == (8 // num_processes, 16) for x in local)
            # process p holds exactly global rows [p*B/P, (p+1)*B/P): each row once, none missing
            np.testing.assert_array_equal(np.concatenate([x[k] for x in local]), batch[k])


# ----------------------------------------------------------------------------- coordinator errors


def _initialize(env, timeout):
    code = f"from gqlm.distributed import maybe_initialize\nmaybe_initialize(initialization_timeout={timeout})\n"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
                          capture_output=True, text=True, timeout=120)


def test_unreachable_coordinator_is_a_clear_error():
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    result = _initialize({"GQLM_COORDINATOR_ADDRESS": address, "GQLM_NUM_PROCESSES": "2",
                          "GQLM_PROCESS_ID": "1"}, timeout=2)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gqlm.config.errors.ConfigError: coordinator " + address) and "unreachable after 2 s" in last


def test_missing_peer_ends_with_one_line():
    # Process 0 is the coordinator; process 1 never comes. jax alone would abort with a C++ stack trace.
    result = _initialize({"GQLM_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "GQLM_NUM_PROCESSES": "2",
                          "GQLM_PROCESS_ID": "0"}, timeout=2)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("gqlm: error: the coordinator 127.0.0.1:") and "within 2 s" in lines[-1]
    assert "Check failure stack trace" not in result.stderr


def test_entry_point_reports_unreachable_coordinator(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "GQLM_COORDINATOR_ADDRESS": address, "GQLM_NUM_PROCESSES": "2", "GQLM_PROCESS_ID": "1",
           "GQLM_INIT_TIMEOUT": "2"}
    result = subprocess.run([sys.executable, "-m", "gqlm.train", "--config", "experiments/tiny_cpu.py:smoke",
                             "--workdir", str(tmp_path / "w")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("gqlm: error:")]
    assert len(errors) == 1 and address in errors[0] and "unreachable" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- training across processes

def train(workdir, num_processes, stop_at=None):
    """Runs `python -m gqlm.train` on 8 devices in all: 1 process x 8 or N processes x 8/N (launch/local.py)."""
    extra = [f"--stop_at_step={stop_at}"] if stop_at else []
    result = run_cli(workdir, *extra, num_processes=num_processes, timeout=900, **{"train.steps": 6})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(workdir):
    """{(split, step): loss}; a step logged twice (by two processes) is an error."""
    seen = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            key = (record["split"], record["step"])
            assert key not in seen, f"{key} logged twice: only process 0 may write metrics"
            seen[key] = record["loss"]
    return seen


def assert_close(got, want, keys):
    for key in keys:
        assert math.isclose(got[key], want[key], rel_tol=1e-5), (key, got[key], want[key])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run of 1 process x 8 devices."""
    workdir = tmp_path_factory.mktemp("ref_1x8")
    train(workdir, 1)
    return losses(workdir)


@pytest.mark.slow
def test_two_processes_match_one_and_hand_over_a_checkpoint(reference, tmp_path):
    # 2 processes x 4 devices for 5 steps: the same losses as 1 process x 8 devices.
    train(tmp_path, 2, stop_at=5)
    two = losses(tmp_path)
    assert_close(two, reference, [("train", s) for s in range(1, 6)])
    assert ("train", 6) not in two
    # Their checkpoint (step 5) restores in 1 process, which continues as if never interrupted.
    train(tmp_path, 1)
    assert_close(losses(tmp_path), reference, [("train", 6), ("validation", 6)])


@pytest.mark.slow
def test_checkpoint_of_one_process_restores_in_two(reference, tmp_path):
    train(tmp_path, 1, stop_at=3)
    train(tmp_path, 2)
    resumed = losses(tmp_path)
    assert_close(resumed, reference, [("train", s) for s in range(1, 7)] + [("validation", 6)])


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan"])
def test_bad_init_timeout_is_a_config_error_naming_it(value, capsys):
    """GQLM_INIT_TIMEOUT is read as float(...) by maybe_initialize: bad values must be caught first,
    and by the launchers before any process starts (launch/local.py --timeout)."""
    env = {"GQLM_COORDINATOR_ADDRESS": "127.0.0.1:1", "GQLM_NUM_PROCESSES": "2", "GQLM_PROCESS_ID": "0",
           "GQLM_INIT_TIMEOUT": value}
    with pytest.raises(ConfigError, match=f"GQLM_INIT_TIMEOUT='{value}' must be a positive number"):
        detect(env)
    from launch import local
    with pytest.raises(SystemExit) as e:
        local.main(["--num_processes", "2", "--timeout", value if value.lstrip("-").isdigit() else "0", "--", "true"])
    assert e.value.code == 2 and "GQLM_INIT_TIMEOUT" in capsys.readouterr().err
    assert detect({**env, "GQLM_INIT_TIMEOUT": "2.5"}).num_processes == 2
