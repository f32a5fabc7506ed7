"""The runner: one loop for every experiment, on any mesh.

Per step: fetch this host's slice of the batch, assemble the global array, dispatch the jitted
step, then read the *previous* step's metrics (so the host never stalls the device). Evaluation,
checkpoints and preemption are checked between steps.
"""

from __future__ import annotations

import signal
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from gqlm import mesh as mesh_lib
from gqlm.config import ConfigDict
from gqlm.data.pipeline import make_eval_batches, make_train_iterator, to_global
from gqlm.eval.bpb import evaluate
from gqlm.models.flops import flops_per_token
from gqlm.train import state as state_lib
from gqlm.train.checkpoint import Checkpointer
from gqlm.train.experiment import Experiment, build_experiment
from gqlm.train.metrics import MetricWriter, Throughput, device_peak_flops
from gqlm.train.sampling import sample_text
from gqlm.train.step import make_eval_step, make_train_step


class TrainingStopped(RuntimeError):
    """Training ended early on purpose (non-finite loss with train.nonfinite='stop')."""


class PreemptionWatcher:
    """Turns SIGTERM/SIGINT into a flag checked between steps (and TPU's preemption sync point)."""

    def __init__(self):
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = True

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


def train(config: ConfigDict, workdir: str, stop_at: int | None = None) -> dict[str, float]:
    """Trains (or resumes) the experiment in `workdir`; returns the final validation metrics.

    `stop_at` ends this run early (with a checkpoint) at that step, e.g. for a time-limited allocation.
    """
    exp = build_experiment(config)
    cfg, train_cfg = exp.config, exp.config.train
    is_main = jax.process_index() == 0
    data_iter = make_train_iterator(cfg, exp.tokenizer)
    eval_batches = make_eval_batches(cfg, exp.tokenizer, "validation", train_cfg.eval_batches)
    batch_sharding = mesh_lib.batch_sharding(exp.mesh, cfg.mesh.rules)
    checkpointer = Checkpointer(workdir, train_cfg)  # First write to the workdir: inputs are valid.
    throughput = Throughput(cfg.data.batch_size * cfg.data.seq_len, flops_per_token(cfg.model, cfg.data.seq_len),
                            device_peak_flops(train_cfg.peak_flops_per_device))
    watcher = PreemptionWatcher()
    with jax.set_mesh(exp.mesh):
        state = checkpointer.restore_latest(exp.abstract, data_iter)
        if state is not None and is_main:
            print(f"resumed from step {int(jax.device_get(state.step))} in {checkpointer.directory}", flush=True)
        else:
            state = state_lib.init_state(cfg.model, exp.tx, cfg.seed, exp.shardings)
        writer = MetricWriter(workdir)
        train_step = jax.jit(make_train_step(exp.model.graphdef, exp.tx, exp.schedule, cfg, exp.token_bytes),
                             in_shardings=(exp.shardings, batch_sharding),
                             out_shardings=(exp.shardings, None), donate_argnums=0)
        eval_step = jax.jit(make_eval_step(exp.model.graphdef, exp.token_bytes),
                            in_shardings=(exp.shardings.params, batch_sharding))
        start = int(jax.device_get(state.step))
        last = min(train_cfg.steps, stop_at or train_cfg.steps)
        progress = tqdm(range(start, last), initial=start, total=train_cfg.steps,
                        disable=not (is_main and train_cfg.progress), dynamic_ncols=True, desc="train")
        pending, eval_metrics, skipped = None, {}, 0
        for step in progress:
            batch = to_global(next(data_iter), batch_sharding)
            with jax.transfer_guard("disallow"):
                state, metrics = train_step(state, batch)
            done = step + 1
            if pending is not None:  # Step t-1's metrics, read while step t runs.
                skipped += report(pending, writer, progress, throughput, train_cfg.log_every)
                if skipped and train_cfg.nonfinite == "stop":
                    checkpointer.save(done, state, data_iter, cfg, force=True)
                    checkpointer.wait()
                    raise TrainingStopped(
                        f"non-finite loss or gradient at step {pending[0]} (train.nonfinite='stop'); "
                        f"the last good state is saved as step {done} in {checkpointer.directory}")
            pending = (done, metrics)
            if done % train_cfg.eval_every == 0 or done == train_cfg.steps:
                eval_metrics = evaluate(eval_step, state.params, eval_batches, exp.mesh, cfg.mesh.rules)
                writer.write(done, eval_metrics, prefix="validation")
                progress.write(f"step {done}: validation loss {eval_metrics['loss']:.4f}, bpb {eval_metrics['bpb']:.4f}")
            preempted = watcher.should_stop(done)
            if done % train_cfg.checkpoint_every == 0 or done == last or preempted:
                checkpointer.save(done, state, data_iter, cfg, force=True)
            if preempted:
                checkpointer.wait()
                progress.write(f"preempted: saved step {done} to {checkpointer.directory}")
                break
        if pending is not None:
            skipped += report(pending, writer, progress, throughput, train_cfg.log_every)
        progress.close()
        checkpointer.wait()
        if is_main and train_cfg.sample_tokens and int(jax.device_get(state.step)) == train_cfg.steps:
            text = sample_text(exp, state.params, train_cfg.sample_prompt, train_cfg.sample_tokens)
            print(f"--- sample ({train_cfg.sample_tokens} tokens) ---\n{text}\n---")
    watcher.restore()
    checkpointer.close()
    writer.close()
    return {**eval_metrics, "skipped_steps": skipped}


def report(pending: tuple[int, dict], writer: MetricWriter, progress: tqdm, throughput: Throughput,
           log_every: int) -> int:
    """Logs one step's metrics every `log_every` steps; returns 1 if the step was non-finite."""
    step, metrics = pending
    nonfinite = int(jax.device_get(metrics["nonfinite"]))
    if step % log_every == 0 or nonfinite:
        values = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
        values.update(throughput(step))
        writer.write(step, values)
        progress.set_postfix(loss=f"{values['loss']:.3f}", bpb=f"{values['bpb']:.3f}", refresh=False)
    return nonfinite
