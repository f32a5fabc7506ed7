"""Resume is exact. SOAP (bases refreshed before and after the save) and MoE runs stopped at a
checkpoint and resumed continue bit for bit: on the same mesh, on another mesh (fsdp 8 -> data 8,
expert 4 -> 8) and in 2 processes x 4 devices. kill -9 anywhere in an async save resumes from the
newest complete checkpoint and reproduces the uninterrupted run's losses and final state."""

import os
import re
import shutil
import time
from typing import NamedTuple

import jax
import numpy as np
import pytest

from gqlm import mesh as mesh_lib
from gqlm.config import ConfigDict
from gqlm.data.pipeline import to_global
from gqlm.train import checkpoint as ckpt_lib
from gqlm.train.experiment import build_experiment
from gqlm.train.loop import train
from gqlm.train.tasks.lm import LMTask
from tests.helpers import (MOE_SMOKE, SMOKE, assert_trees_equal, load, metric_rows, run_cli, smoke_config,
                           start_cli, train_rows, trees_differ)

STEPS, STOP = 6, 4
RUN = {"train.steps": STEPS, "train.checkpoint_every": 2, "train.keep_checkpoints": 3}
# SOAP's first call only builds the bases; with frequency 2 they are refreshed (QR step) at train
# steps 3 and 5: once before the save at step 4 and once after it.
SOAP = {**RUN, "optimizer.name": "soap", "optimizer.precondition_frequency": 2}
FSDP8, DATA8 = {"mesh.data": 1, "mesh.fsdp": 8}, {"mesh.data": 8, "mesh.fsdp": 1}
EXPERT8 = {"mesh.data": 1, "mesh.expert": 8}  # moe_tiny_cpu runs data=2 x expert=4


def losses(rows):
    return {r["step"]: r["loss"] for r in rows}


class Runs(NamedTuple):
    experiment: str
    overrides: dict
    config: ConfigDict
    straight: str  # STEPS steps in one go
    stopped: str  # a copy of the interrupted run as it was at STOP, for resuming elsewhere
    resumed: str  # stopped at STOP, then resumed to STEPS


def stop_and_resume(root, experiment, **overrides) -> Runs:
    config = smoke_config(experiment, **overrides)
    runs = Runs(experiment, overrides, config, *(str(root / name) for name in ("straight", "stopped", "resumed")))
    train(config, runs.straight, LMTask())
    train(config, runs.resumed, LMTask(), stop_at=STOP)
    shutil.copytree(runs.resumed, runs.stopped)
    train(config, runs.resumed, LMTask())
    return runs


def continue_in_memory(config, state, start, stop):
    """(losses, final state) of steps start+1..stop from host `state`, put on `config`'s mesh by
    jax.device_put and fed the batches after the first `start`: what a resume onto that mesh must
    reproduce, without any checkpoint in between."""
    task = LMTask()
    exp = build_experiment(config, task)
    batches = task.train_iterator(exp)
    for _ in range(start):
        next(batches)
    sharding = mesh_lib.batch_sharding(exp.mesh, exp.config.mesh.rules)
    with jax.set_mesh(exp.mesh):
        state, step, out = jax.device_put(state, exp.shardings), task.train_step(exp), {}
        for n in range(start + 1, stop + 1):
            state, metrics = step(state, to_global(next(batches), sharding))
            out[n] = float(metrics["loss"])
        return out, jax.device_get(state)


def assert_resume_is_exact(runs):
    """The resumed run logged every step once, with the straight run's losses, validation and state."""
    assert [r["step"] for r in train_rows(runs.resumed)] == list(range(1, STEPS + 1))
    assert losses(train_rows(runs.resumed)) == losses(train_rows(runs.straight))
    validation = [losses(r for r in metric_rows(w) if r["split"] == "validation")
                  for w in (runs.resumed, runs.straight)]
    assert validation[0] == validation[1] and list(validation[0]) == [STEPS]
    assert_trees_equal(load(runs.stopped, STOP, runs.config), load(runs.straight, STOP, runs.config))
    assert_trees_equal(load(runs.resumed, STEPS, runs.config), load(runs.straight, STEPS, runs.config))


def assert_resume_on_mesh_is_exact(runs, tmp_path, mesh):
    """Resumed from `runs.stopped` onto another mesh: what jax.device_put of the state onto that mesh
    and the same steps give, bit for bit. Returns the resumed losses."""
    workdir, other = str(tmp_path / "other_mesh"), smoke_config(runs.experiment, **{**runs.overrides, **mesh})
    shutil.copytree(runs.stopped, workdir)
    train(other, workdir, LMTask())
    resumed = losses(train_rows(workdir)[STOP:])
    want_losses, want_state = continue_in_memory(other, load(runs.straight, STOP, runs.config), STOP, STEPS)
    assert resumed == want_losses
    assert_trees_equal(load(workdir, STEPS, other), want_state)
    return resumed


# ----------------------------------------------------------------------------- SOAP


@pytest.fixture(scope="module")
def soap_runs(tmp_path_factory):
    return stop_and_resume(tmp_path_factory.mktemp("soap"), SMOKE, **SOAP, **FSDP8)


def soap_bases(state):
    flat = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    return [leaf for path, leaf in flat if "bases" in jax.tree_util.keystr(path)]


@pytest.mark.slow
def test_soap_resume_on_the_same_mesh_is_bit_identical(soap_runs):
    assert_resume_is_exact(soap_runs)
    # The save point sits between two refreshes: the bases at 2, 4 and 6 all differ.
    bases = [soap_bases(load(soap_runs.straight, step, soap_runs.config)) for step in (2, 4, 6)]
    assert bases[0] and trees_differ(bases[0], bases[1]) and trees_differ(bases[1], bases[2])


@pytest.mark.slow
def test_soap_resume_onto_another_mesh_is_bit_identical(soap_runs, tmp_path):
    resumed = assert_resume_on_mesh_is_exact(soap_runs, tmp_path, DATA8)
    # Against the run that stayed on fsdp=8 only closely: XLA splits the matmul reductions
    # differently on the two meshes (a fresh run's step-1 loss already differs in its last bit
    # between fsdp=8 and data=8), so the parameters drift apart by rounding, which SOAP amplifies.
    straight = losses(train_rows(soap_runs.straight))
    np.testing.assert_allclose([resumed[s] for s in resumed], [straight[s] for s in resumed], rtol=1e-4)


@pytest.mark.slow
def test_soap_resume_across_two_processes_is_bit_identical(tmp_path):
    """2 processes x 4 devices: straight, and resumed from its step-4 checkpoint (as if killed
    before step 6 was saved). Compared with each other, not with 1 process x 8 devices: a
    collective across processes (gloo) adds in another order than one inside a process, so the
    first real update's gradients already differ in their last bits (measured: SOAP's first
    moments after step 2), and SOAP's eigenbases of its near rank-deficient first statistics make
    that visible in the losses."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    overrides = {**SOAP, **FSDP8}
    result = run_cli(straight, num_processes=2, timeout=900, **overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    before = len(train_rows(resumed))
    result = run_cli(resumed, num_processes=2, timeout=900, **overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resumed from step {STOP} in" in result.stdout
    assert losses(train_rows(resumed)[before:]) == {s: l for s, l in losses(train_rows(straight)).items() if s > STOP}
    config = smoke_config(SMOKE, **overrides)
    assert_trees_equal(load(resumed, STEPS, config), load(straight, STEPS, config))


# ----------------------------------------------------------------------------- MoE


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    return stop_and_resume(tmp_path_factory.mktemp("moe"), MOE_SMOKE, **RUN)


@pytest.mark.slow
def test_moe_resume_on_the_same_mesh_is_bit_identical(moe_runs):
    assert_resume_is_exact(moe_runs)


@pytest.mark.slow
def test_moe_resume_onto_another_expert_axis_is_bit_identical(moe_runs, tmp_path):
    resumed = assert_resume_on_mesh_is_exact(moe_runs, tmp_path, EXPERT8)
    straight = losses(train_rows(moe_runs.straight))
    np.testing.assert_allclose([resumed[s] for s in resumed], [straight[s] for s in resumed], rtol=1e-5)


# ----------------------------------------------------------------------------- kill -9 in a save

KEEP = 2
KILL_RUN = {"train.steps": 32, "train.checkpoint_every": 8, "train.keep_checkpoints": KEEP}
TMP = ".orbax-checkpoint-tmp"  # orbax writes step N into N.orbax-checkpoint-tmp, then renames it N


def saves_in_progress(directory, first=0):
    """Temporary directories of steps >= first."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return [os.path.join(directory, n) for n in names if n.endswith(TMP) and int(n.split(".")[0]) >= first]


def has_files(directory):
    return any(files for _, _, files in os.walk(directory))


# Where to kill, in the order of a save (each a test of the directory, polled every millisecond).
def save_started(directory, first):
    return bool(saves_in_progress(directory, first))


def arrays_being_written(directory, first):
    return any(has_files(os.path.join(tmp, "state" + TMP)) for tmp in saves_in_progress(directory, first))


def items_committed_step_not_renamed(directory, first):
    return any(os.path.isdir(os.path.join(tmp, "state")) for tmp in saves_in_progress(directory, first))


def published_unsealed_while_deleting_old(directory, first):
    """The new step is renamed into place, its manifest not written yet, and the checkpoint it
    pushes out of train.keep_checkpoints is not deleted yet (orbax deletes it in the background)."""
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
    return (bool(steps) and max(steps) >= first and len(steps) > KEEP
            and not os.path.exists(os.path.join(directory, str(max(steps)), ckpt_lib.MANIFEST)))


KILL_POINTS = (save_started, arrays_being_written, items_committed_step_not_renamed,
               published_unsealed_while_deleting_old)


def kill_at(proc, directory, point, first, timeout=600):
    """SIGKILLs `proc` as soon as `point` holds for a save of a step >= first; returns its stdout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            hit = point(directory, first)
        except FileNotFoundError:  # renamed or deleted while we looked
            hit = False
        if hit:
            proc.kill()
            return proc.communicate(timeout=60)[0]
        assert proc.poll() is None, f"the run ended before {point.__name__}: {proc.communicate()}"
        time.sleep(0.001)
    raise AssertionError(f"no {point.__name__} within {timeout} s")


def resumed_from(stdout):
    found = re.search(r"resumed from step (\d+) in", stdout)
    return int(found.group(1)) if found else 0


def newest_state(directory):
    """(newest published step or 0, whether its manifest is written, steps of saves left unfinished)."""
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
    newest = max(steps, default=0)
    sealed = newest > 0 and os.path.exists(os.path.join(directory, str(newest), ckpt_lib.MANIFEST))
    return newest, sealed, [int(os.path.basename(t).split(".")[0]) for t in saves_in_progress(directory)]


@pytest.mark.slow
def test_kill_9_anywhere_in_a_save_resumes_from_the_newest_complete_checkpoint(tmp_path):
    """One workdir, killed at each point of KILL_POINTS in turn (each run resuming the last), then
    run to the end: every run restores the newest complete checkpoint, never an unfinished save,
    and every step's loss and the final state are those of one uninterrupted run."""
    reference, workdir = tmp_path / "reference", tmp_path / "killed"
    config = smoke_config(**KILL_RUN)
    train(config, str(reference), LMTask())
    expected = losses(train_rows(reference))
    checkpoints, every, after_kills = str(workdir / "checkpoints"), KILL_RUN["train.checkpoint_every"], []
    left_over = tmp_path / "left_over"  # the workdir with the first unfinished save a kill left
    for point in KILL_POINTS + (None,):
        newest = newest_state(checkpoints)[0]
        before = len(train_rows(workdir))
        if point is None:  # the last run finishes
            result = run_cli(workdir, **KILL_RUN)
            assert result.returncode == 0, result.stderr[-3000:]
            stdout = result.stdout
        else:  # killed in a save of a step >= first, so that a complete checkpoint precedes it
            stdout = kill_at(start_cli(workdir, **KILL_RUN), checkpoints, point, max(newest, every) + every)
            after_kills.append(newest_state(checkpoints))
            if after_kills[-1][2] and not left_over.exists():
                shutil.copytree(workdir, left_over)
        assert resumed_from(stdout) == newest, (point, stdout[-2000:])
        logged = losses(train_rows(workdir)[before:])
        assert list(logged) == list(range(newest + 1, newest + 1 + len(logged))) and logged
        assert logged == {s: expected[s] for s in logged}, point
    assert max(logged) == KILL_RUN["train.steps"]
    # The kills did leave unfinished saves (newer than the newest checkpoint) and a newest
    # checkpoint without its manifest: the first were never restored, the second was.
    assert any(unfinished and max(unfinished) > step for step, _, unfinished in after_kills)
    assert not after_kills[-1][1]
    final = KILL_RUN["train.steps"]
    assert_trees_equal(load(workdir, final, config), load(reference, final, config))
    assert not saves_in_progress(checkpoints)
    assert not os.path.exists(checkpoints + "_corrupt")  # nothing was taken for corrupt
    # A restart that stops before that step is saved again removes the unfinished save too.
    newest, _, unfinished = newest_state(str(left_over / "checkpoints"))
    assert unfinished and min(unfinished) > newest + every // 2
    train(config, str(left_over), LMTask(), stop_at=newest + every // 2)
    assert not saves_in_progress(str(left_over / "checkpoints"))
