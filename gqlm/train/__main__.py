"""python -m gqlm.train --config experiments/X.py[:arg] --workdir DIR [--config.a.b=v ...] [--dry_run]

Exit codes: 0 done (or preempted by SIGTERM/SIGINT, with a checkpoint), 2 bad input (one line on
stderr, nothing written), 3 stopped on a non-finite loss with train.nonfinite='stop'.
"""

import os
import sys

import jax
from absl import flags

from gqlm import cli

flags.DEFINE_string("config", None, "Experiment file, optionally with an argument: path.py[:arg].")
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs; re-running resumes from it.")
flags.DEFINE_bool("dry_run", False, "Build the mesh and abstract state, print the layout, exit.")
flags.DEFINE_integer("stop_at_step", None, "End this run (with a checkpoint) at this step; resume later.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config = cli.config_from_flags(FLAGS.config)
    from gqlm.train.experiment import build_experiment, dry_run_report  # After flags: jax setup is done.
    if FLAGS.dry_run:
        print(dry_run_report(build_experiment(config)))
        return
    if not FLAGS.workdir:
        cli.fail("--workdir is required (where checkpoints and metrics go)")
    if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
        cli.fail(f"--workdir={FLAGS.workdir!r} exists and is not a directory")
    if FLAGS.stop_at_step is not None and FLAGS.stop_at_step < 1:
        cli.fail(f"--stop_at_step={FLAGS.stop_at_step} must be >= 1")
    from gqlm.train.loop import TrainingStopped, train
    try:
        metrics = train(config, FLAGS.workdir, stop_at=FLAGS.stop_at_step)
    except TrainingStopped as e:
        if jax.process_index() == 0:
            print(f"gqlm: stopped: {e}", file=sys.stderr, flush=True)
        raise SystemExit(3)
    if jax.process_index() == 0:
        print("final validation: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    cli.run(main)
