"""python -m gqlm.train --config experiments/X.py[:arg] --workdir DIR [--config.a.b=v ...] [--dry_run]

The task (language model, or the GQ-VAE tokenizer model with gqvae.train_tokenizer=True) is
picked here, from the config. Exit codes: 0 done (or preempted by SIGTERM/SIGINT, with a
checkpoint), 2 bad input (one line on stderr, nothing written), 3 stopped on a non-finite loss
with train.nonfinite='stop'.
"""

import os
import sys

import jax
from absl import flags

from gqlm import cli
from gqlm.train import state as state_lib
from gqlm.train.compiled_memory import compiled_memory
from gqlm.train.compiled_memory import describe as describe_compiled
from gqlm.train.experiment import Experiment, build_experiment
from gqlm.train.loop import TrainingStopped, train
from gqlm.train.tasks import task_for
from gqlm.train.tasks.base import Task

cli.define_config_file()
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs; re-running resumes from it.")
flags.DEFINE_bool("dry_run", False, "Build the mesh and abstract state, print the layout, exit.")
flags.DEFINE_bool("dry_run_compile", True, "--dry_run also compiles the train step for XLA's per-device "
                  "memory (minutes for a pod-sized model on a CPU host).")
flags.DEFINE_integer("stop_at_step", None, "End this run (with a checkpoint) at this step; resume later.")
FLAGS = flags.FLAGS


def dry_run_report(exp: Experiment, task: Task) -> str:
    """Parameter count, FLOPs/token, per-device memory (state, and the train step as XLA
    compiles it) and every parameter's sharding."""
    memory = state_lib.describe(exp.abstract)
    model_lines, optimizer = task.describe(exp)
    lines = [
        f"mesh: {dict(exp.mesh.shape)} ({jax.device_count()} devices, {jax.devices()[0].platform})",
        *model_lines,
        f"per-device memory: params {memory['param_bytes_per_device'] / 2**20:,.1f} MiB, "
        f"optimizer state {memory['opt_bytes_per_device'] / 2**20:,.1f} MiB ({optimizer})",
        "parameter shardings:",
    ]
    batch = task.abstract_batch(exp) if FLAGS.dry_run_compile else None
    if batch is not None:
        memory = compiled_memory(task.train_step(exp), exp.abstract, batch)
        lines.insert(-1, describe_compiled(memory, jax.devices()[0].platform))
    for name, shape, spec in state_lib.param_sharding_table(exp.model):
        lines.append(f"  {name:<48} {str(shape):<22} {spec}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config = cli.config()
    task = task_for(config, dry_run=FLAGS.dry_run)
    if FLAGS.dry_run:
        print(dry_run_report(build_experiment(config, task), task))
        return
    if not FLAGS.workdir:
        cli.fail("--workdir is required (where checkpoints and metrics go)")
    if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
        cli.fail(f"--workdir={FLAGS.workdir!r} exists and is not a directory")
    if FLAGS.stop_at_step is not None and FLAGS.stop_at_step < 1:
        cli.fail(f"--stop_at_step={FLAGS.stop_at_step} must be >= 1")
    try:
        metrics = train(config, FLAGS.workdir, task, stop_at=FLAGS.stop_at_step)
    except TrainingStopped as e:
        if jax.process_index() == 0:
            print(f"gqlm: stopped: {e}", file=sys.stderr, flush=True)
        raise SystemExit(3)
    if jax.process_index() == 0:
        print("final validation: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    cli.run(main)
