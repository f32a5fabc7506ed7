"""Reliability: verified checkpoints and fallback, non-finite steps (skip / stop), preemption by
signal, and bit-identical resume after `kill -9`. Signals are tested on real training processes."""

import glob
import json
import os
import random
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from gqlm import config as config_lib
from gqlm.data.pipeline import make_train_iterator
from gqlm.train import checkpoint as ckpt_lib
from gqlm.train import loop
from gqlm.train.experiment import build_experiment
from gqlm.train.loop import TrainingStopped, train
from gqlm.train.tasks.lm import LMTask
from tests.helpers import (assert_trees_equal, load, run_cli, saved_steps, smoke_config, start_cli, train_rows,
                           trees_differ)


def wait_for_step(proc, workdir, step, timeout=240):
    """Blocks until metrics.jsonl logs `step` (the process is then at step + 1 or later)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step for r in train_rows(workdir)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


# ----------------------------------------------------------------------------- verified checkpoints


def test_manifest_detects_changed_missing_and_truncated_files(tmp_path):
    step_dir = tmp_path / "7"
    (step_dir / "state" / "d").mkdir(parents=True)
    (step_dir / "state" / "d" / "blob").write_bytes(bytes(range(256)) * 40)
    (step_dir / "meta").write_text("{}")
    assert ckpt_lib.check_manifest(str(step_dir)) is None  # no manifest yet: accepted
    ckpt_lib.write_manifest(str(step_dir))
    assert ckpt_lib.check_manifest(str(step_dir)) is None
    manifest = json.loads((step_dir / ckpt_lib.MANIFEST).read_text())["files"]
    assert sorted(manifest) == ["meta", "state/d/blob"] and manifest["state/d/blob"][0] == 10240

    blob = step_dir / "state" / "d" / "blob"
    data = bytearray(blob.read_bytes())
    data[5000] ^= 1  # same size, one bit flipped
    blob.write_bytes(bytes(data))
    assert "state/d/blob fails its CRC-32" in ckpt_lib.check_manifest(str(step_dir))
    blob.write_bytes(bytes(data[:100]))
    assert "state/d/blob has 100 bytes" in ckpt_lib.check_manifest(str(step_dir))
    blob.unlink()
    assert "state/d/blob is missing" in ckpt_lib.check_manifest(str(step_dir))
    (step_dir / ckpt_lib.MANIFEST).write_text('{"files": ')  # torn manifest: not trusted
    assert "unreadable" in ckpt_lib.check_manifest(str(step_dir))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with verified checkpoints at steps 2 and 4 (built once, copied by each test)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    config = smoke_config(**{"train.steps": 4, "train.checkpoint_every": 2})
    train(config, str(workdir), LMTask())
    return workdir, config


def damage_largest_file(step_dir, how):
    path = max(glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True),
               key=lambda p: os.path.getsize(p) if os.path.isfile(p) else -1)
    data = bytearray(open(path, "rb").read())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_latest_checkpoint_falls_back_to_previous(trained, tmp_path, capsys, how):
    source, config = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    assert saved_steps(workdir) == [2, 4]
    assert all(os.path.exists(workdir / "checkpoints" / str(s) / ckpt_lib.MANIFEST) for s in (2, 4))
    good2, good4 = load(workdir, 2, config), load(workdir, 4, config)
    damage_largest_file(workdir / "checkpoints" / "4", how)

    exp = build_experiment(config, LMTask())
    with jax.set_mesh(exp.mesh), ckpt_lib.Checkpointer(str(workdir), config.train) as checkpointer:
        state = checkpointer.restore_latest(exp.abstract, make_train_iterator(exp.config, exp.tokenizer))
    out = capsys.readouterr().out
    assert "gqlm: warning: checkpoint step 4" in out and "corrupt" in out and "falling back" in out
    assert int(state.step) == 2
    assert_trees_equal(jax.device_get(state), good2)
    # The corrupt one is moved aside (kept for inspection), so a resumed run can save step 4 again.
    assert saved_steps(workdir) == [2]
    assert [d.split("-")[0] for d in os.listdir(workdir / "checkpoints_corrupt")] == ["4"]
    train(config, str(workdir), LMTask())
    assert saved_steps(workdir) == [2, 4]
    assert_trees_equal(load(workdir, 4, config), good4)  # resume is deterministic


def test_bit_flip_is_silent_without_verification(trained, tmp_path):
    """Why the manifest exists: orbax restores a flipped bit without complaint."""
    source, config = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    good4 = load(workdir, 4, config)
    damage_largest_file(workdir / "checkpoints" / "4", "flip")
    unverified = config_lib.apply_override_strings(config.copy_and_resolve_references(),
                                            {"train.verify_checkpoints": "False"})
    exp = build_experiment(unverified, LMTask())
    with jax.set_mesh(exp.mesh), ckpt_lib.Checkpointer(str(workdir), unverified.train) as checkpointer:
        state = checkpointer.restore_latest(exp.abstract, make_train_iterator(exp.config, exp.tokenizer))
    assert int(state.step) == 4 and trees_differ(jax.device_get(state), good4)


# ----------------------------------------------------------------------------- non-finite steps


class NaNAtBatch:
    """Wraps the train iterator; batch number `bad` (1-based) gets a NaN loss mask -> NaN loss and grads."""

    def __init__(self, inner, bad):
        self.inner, self.bad, self.count = inner, bad, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.inner))
        self.count += 1
        if self.count == self.bad:
            batch["loss_mask"] = np.full_like(batch["loss_mask"], np.nan)
        return batch

    def get_state(self):
        return {"inner": self.inner.get_state(), "count": self.count}

    def set_state(self, state):
        self.inner.set_state(state["inner"])
        self.count = state["count"]


def inject_nan_at_batch_3(monkeypatch):
    make = loop.make_train_iterator
    monkeypatch.setattr(loop, "make_train_iterator", lambda *a, **k: NaNAtBatch(make(*a, **k), 3))


NAN_RUN = {"train.steps": 6, "train.checkpoint_every": 1, "train.keep_checkpoints": 10}


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory):
    """A run with a NaN batch at step 3 and train.nonfinite='skip': (workdir, config, returned metrics)."""
    workdir = tmp_path_factory.mktemp("skip")
    config = smoke_config(**NAN_RUN, **{"train.nonfinite": "skip"})
    with pytest.MonkeyPatch.context() as monkeypatch:
        inject_nan_at_batch_3(monkeypatch)
        metrics = train(config, str(workdir), LMTask())
    return workdir, config, metrics


def test_nonfinite_skip_does_not_apply_the_update(skip_run):
    workdir, config, metrics = skip_run
    assert metrics["skipped_steps"] == 1
    rows = {r["step"]: r for r in train_rows(workdir)}
    assert [rows[s]["nonfinite"] for s in range(1, 7)] == [0, 0, 1, 0, 0, 0]
    assert np.isnan(rows[3]["loss"]) and all(np.isfinite(rows[s]["loss"]) for s in (1, 2, 4, 5, 6))
    before, after, next_one = (load(workdir, s, config) for s in (2, 3, 4))
    assert_trees_equal(after.params, before.params)  # step 3's update was not applied...
    assert_trees_equal(after.opt_state, before.opt_state)  # ...not even to the moments or the count
    assert int(after.step) == 3 and trees_differ(next_one.params, after.params)  # training goes on


def test_nonfinite_stop_saves_last_good_state(skip_run, monkeypatch, tmp_path):
    skip_dir, skip_config, _ = skip_run
    inject_nan_at_batch_3(monkeypatch)
    config = smoke_config(**NAN_RUN, **{"train.nonfinite": "stop"})
    # The loop reads step t's metrics while step t + 1 runs, so it stops with step 4 applied.
    with pytest.raises(TrainingStopped, match=r"non-finite loss or gradient at step 3 .*saved as step 4"):
        train(config, str(tmp_path), LMTask())
    assert saved_steps(tmp_path) == [1, 2, 3, 4]
    stopped = load(tmp_path, 4, config)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(stopped.params))
    assert_trees_equal(stopped, load(skip_dir, 4, skip_config))  # exactly the state that skipping reaches
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the raise


@pytest.mark.slow
def test_nonfinite_stop_exits_3_with_one_clear_line(tmp_path):
    # An absurd learning rate: the first applied update is finite but huge, the next loss is not.
    result = run_cli(tmp_path, **{"optimizer.learning_rate": "1e30", "train.nonfinite": "stop",
                                  "train.steps": 20, "train.checkpoint_every": 100})
    assert result.returncode == 3, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("gqlm:")]
    assert len(lines) == 1 and lines[0].startswith("gqlm: stopped: non-finite loss or gradient at step"), lines
    saved = int(lines[0].split("saved as step ")[1].split()[0])
    assert saved_steps(tmp_path) == [saved]
    params = load(tmp_path, saved, smoke_config()).params
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- signals and kill -9


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_exits_0_and_resume_continues(tmp_path, signum):
    overrides = {"train.steps": 500, "train.checkpoint_every": 1000}
    proc = start_cli(tmp_path, **overrides)
    wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    line = next(line for line in out.splitlines() if line.startswith("preempted: saved step "))
    step = int(line.split()[3])
    assert 3 < step < 500 and line.endswith(os.path.join(str(tmp_path), "checkpoints", str(step)))
    assert saved_steps(tmp_path) == [step]  # the only checkpoint: the preemption one
    assert os.path.exists(tmp_path / "checkpoints" / str(step) / ckpt_lib.MANIFEST)
    assert max(r["step"] for r in train_rows(tmp_path)) == step  # every applied step was logged

    result = run_cli(tmp_path, f"--stop_at_step={step + 2}", **overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {step} in" in result.stdout
    assert saved_steps(tmp_path) == [step, step + 2]


@pytest.mark.slow
def test_kill_9_resume_is_bit_identical(tmp_path):
    overrides = {"train.steps": 40, "train.checkpoint_every": 4}  # killed by step ~25: margin to spare
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(smoke_config(**overrides), str(straight), LMTask())
    expected = {r["step"]: r["loss"] for r in train_rows(straight)}
    assert sorted(expected) == list(range(1, 41))

    kill_at = random.Random(8).randint(6, 25)
    proc = start_cli(killed, **overrides)
    wait_for_step(proc, killed, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    logged = {r["step"]: r["loss"] for r in train_rows(killed)}
    assert kill_at <= max(logged) < 40 and all(logged[s] == expected[s] for s in logged)

    result = run_cli(killed, **overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_from = int(result.stdout.split("resumed from step ")[1].split()[0])
    assert resumed_from % 4 == 0 and resumed_from <= max(logged)
    resumed = {}
    for r in train_rows(killed)[len(logged):]:  # rows appended by the resumed run
        resumed[r["step"]] = r["loss"]
    assert sorted(resumed) == list(range(resumed_from + 1, 41))
    assert all(resumed[s] == expected[s] for s in resumed), [(s, resumed[s], expected[s]) for s in resumed]
