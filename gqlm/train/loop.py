"""The runner: one loop for every experiment, on any mesh.

Per step: fetch this host's slice of the batch, assemble the global array, dispatch the jitted
step, then read the *previous* step's metrics (so the host never stalls the device). Evaluation,
checkpoints and preemption are checked between steps. What is trained (the LM or the GQ-VAE
tokenizer model: batches, state, steps, evaluation) is the task's (tasks/), picked by the caller.

Optional (off by default): metrics also to Weights & Biases (train.wandb_project), a profiler
trace of a window of steps (train.profile_steps). The host's waits for data and inside checkpoint
calls are logged with the throughput (data_wait_s, checkpoint_block_s).

Reliability: SIGTERM/SIGINT (or TPU's preemption sync point) -> checkpoint, exit cleanly; a
non-finite step is never applied (train.nonfinite: 'skip' counts it, 'stop' checkpoints the last
good state and raises TrainingStopped); checkpoints are atomic and verified (checkpoint.py).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from gqlm import mesh as mesh_lib
from gqlm.config import ConfigDict
from gqlm.data.pipeline import to_global
from gqlm.train import state as state_lib
from gqlm.train.checkpoint import Checkpointer, warn_config_changes
from gqlm.train.experiment import Experiment, build_experiment
from gqlm.train.metrics import MetricWriter, Throughput, tensorboard_dir
from gqlm.train.profiling import ProfileWindow
from gqlm.train.tasks.base import Task
from gqlm.train.wandb_sink import import_wandb


class TrainingStopped(RuntimeError):
    """Training ended early on purpose (non-finite loss with train.nonfinite='stop')."""


class PreemptionWatcher:
    """Turns SIGTERM/SIGINT into a flag checked between steps (and TPU's preemption sync point).
    The first signal asks for a checkpoint and a clean exit; a second one acts as it normally would."""

    def __init__(self):
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = True
        self.restore()

    def should_stop(self, step: int) -> bool:
        if not self.requested and jax.process_count() > 1:
            try:
                from jax.experimental import multihost_utils
                self.requested = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # No preemption service (CPU/GPU without the coordinator hook).
                pass
        return self.requested

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def __enter__(self) -> "PreemptionWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def train(config: ConfigDict, workdir: str, task: Task, stop_at: int | None = None) -> dict[str, float]:
    """Trains (or resumes) `task`'s experiment of `config` in `workdir`; returns the final
    validation metrics, skipped_steps and checkpoint_block_s (the run's total). `stop_at` ends this
    run early (with a checkpoint) at that step, e.g. for a time-limited allocation."""
    with contextlib.ExitStack() as cleanup:  # Closed in reverse: profiler, writer, mesh, checkpointer, signals.
        watcher = cleanup.enter_context(PreemptionWatcher())  # From the start: a signal in set-up saves at step 1.
        exp = build_experiment(config, task)
        cfg, train_cfg = exp.config, exp.config.train
        is_main = jax.process_index() == 0
        data_iter = make_train_iterator(task, exp)
        eval_batches = task.eval_batches(exp)
        batch_sharding = mesh_lib.batch_sharding(exp.mesh, cfg.mesh.rules)
        throughput = task.throughput(exp)
        if train_cfg.wandb_project and is_main:
            import_wandb(train_cfg.wandb_project)  # a missing extra fails before anything is written
        # The Checkpointer is the first write to the workdir: every input has been checked by now.
        checkpointer = cleanup.enter_context(Checkpointer(workdir, train_cfg))
        save, wait = throughput.time_checkpoints(checkpointer.save), throughput.time_checkpoints(checkpointer.wait)
        cleanup.enter_context(jax.set_mesh(exp.mesh))
        state = restore_or_init(checkpointer, task, exp, data_iter)  # an incompatible checkpoint: no log written
        writer = cleanup.enter_context(contextlib.closing(MetricWriter(workdir, cfg)))
        train_step, evaluate = task.train_step(exp), task.evaluator(exp)
        profiler = cleanup.enter_context(ProfileWindow(train_cfg, tensorboard_dir(workdir)))
        start, last = int(jax.device_get(state.step)), min(train_cfg.steps, stop_at or train_cfg.steps)
        progress = tqdm(range(start, last), initial=start, total=train_cfg.steps,
                        disable=not (is_main and train_cfg.progress), dynamic_ncols=True, desc="train")
        say = progress.write if is_main else (lambda message: None)
        log = lambda pending: report(pending, writer, progress, throughput, train_cfg.log_every,  # noqa: E731
                                     task.progress_keys, task.watch, say)
        pending, eval_metrics, skipped = None, {}, 0
        for step in progress:
            with profiler.step(step):
                batch = to_global(throughput.next_batch(data_iter), batch_sharding)
                with jax.transfer_guard("disallow"):
                    state, metrics = train_step(state, batch)
            profiler.step_done(step, state)
            done = step + 1
            if pending is not None:  # Step t-1's metrics, read while step t runs.
                skipped += log(pending)
                stop_if_nonfinite(skipped, pending[0], state, checkpointer, data_iter, cfg)
            pending = (done, metrics)
            if done % train_cfg.eval_every == 0 or done == train_cfg.steps:
                eval_metrics = evaluate(state.params, eval_batches)
                writer.write(done, eval_metrics, prefix="validation")
                say(f"step {done}: {task.eval_summary(eval_metrics)}")
            preempted = watcher.should_stop(done)
            if done % train_cfg.checkpoint_every == 0 or done == last or preempted:
                save(done, state, data_iter, cfg)
            if preempted:
                wait()
                say(f"preempted: saved step {done} to {checkpointer.step_dir(done)}")
                break
        if pending is not None:
            skipped += log(pending)
            stop_if_nonfinite(skipped, pending[0], state, checkpointer, data_iter, cfg)
        progress.close()
        wait()  # Sealed (manifest written) before the sample, which may take a while.
        if is_main and int(jax.device_get(state.step)) == train_cfg.steps:
            task.finish(exp, state)
    return {**eval_metrics, "skipped_steps": skipped, "checkpoint_block_s": throughput.checkpoint_block_total}


def restore_or_init(checkpointer: Checkpointer, task: Task, exp: Experiment, data_iter: Any) -> Any:
    """The newest checkpoint's state (rewinding `data_iter` to it), or a fresh one."""
    state = checkpointer.restore_latest(exp.abstract, data_iter)
    if state is None:
        return task.init_state(exp)
    step = int(jax.device_get(state.step))
    if jax.process_index() == 0:
        print(f"resumed from step {step} in {checkpointer.directory}", flush=True)
    warn_config_changes(checkpointer, step, exp.config)
    return state


def make_train_iterator(task: Task, exp) -> Any:
    """The task's training batches (one name, so a test can wrap the stream the loop reads)."""
    return task.train_iterator(exp)


def report(pending: tuple[int, dict], writer: MetricWriter, progress: tqdm, throughput: Throughput,
           log_every: int, keys: tuple[str, ...] = ("loss", "bpb"),
           watch: Callable[[int, dict], str | None] = lambda step, values: None,
           say: Callable[[str], None] = print) -> int:
    """Logs one step's metrics every `log_every` steps (and every non-finite one), says the warning
    `watch` returns for them, if any; returns 1 if non-finite."""
    step, metrics = pending
    nonfinite = int(jax.device_get(metrics["nonfinite"]))
    if step % log_every == 0 or nonfinite:
        values = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
        values.update(throughput(step))
        writer.write(step, values)
        progress.set_postfix({k: f"{values[k]:.3f}" for k in keys}, refresh=False)
        warning = watch(step, values)
        if warning:
            say(f"step {step}: WARNING: {warning}")
    return nonfinite


def stop_if_nonfinite(skipped: int, bad_step: int, state: state_lib.TrainState, checkpointer: Checkpointer,
                      data_iter, cfg: ConfigDict) -> None:
    """With train.nonfinite='stop', checkpoints the current state (no non-finite update was ever
    applied to it) and raises TrainingStopped."""
    if not skipped or cfg.train.nonfinite != "stop":
        return
    state_step = int(jax.device_get(state.step))
    checkpointer.save(state_step, state, data_iter, cfg)  # No-op if this step was just saved.
    checkpointer.wait()
    raise TrainingStopped(
        f"non-finite loss or gradient at step {bad_step} (train.nonfinite='stop'); the last good state "
        f"is saved as step {state_step} in {checkpointer.directory}")
