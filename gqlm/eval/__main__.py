"""python -m gqlm.eval --workdir DIR [--split validation] [--batches N] [--config.a.b=v ...]

Bits per byte of a training workdir's latest checkpoint on a split of its corpus (or another
corpus via overrides, e.g. --config.data.corpus=python_stdlib). By default it evaluates the
batches the training loop did (the run's train.eval_batches), so it reproduces the loop's
validation bpb exactly; --batches N evaluates the first N batches instead.
"""

import functools
import json

import jax
from absl import flags

from gqlm import cli
from gqlm.config import apply_overrides
from gqlm.data.pipeline import make_eval_sets
from gqlm.train.checkpoint import restore_trained
from gqlm.train.tasks.lm import LMTask

cli.define_saved_run_flags()
flags.DEFINE_string("split", "validation", "Corpus split to evaluate.")
flags.DEFINE_integer("batches", 0, "Number of batches (of data.batch_size rows); 0: the run's train.eval_batches.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if not FLAGS.workdir:
        cli.fail("--workdir is required")
    if FLAGS.batches < 0:
        cli.fail(f"--batches={FLAGS.batches} must be >= 0 (0: the run's train.eval_batches)")
    edit = functools.partial(apply_overrides, overrides=cli.overrides())
    task = LMTask()
    exp, step, state = restore_trained(FLAGS.workdir, task, FLAGS.step, edit)
    # The loop's evaluator on the loop's sets (per source of a mixture), so the sums add up in
    # the same order and the default reproduces the loop's validation bpb bit for bit.
    sets = make_eval_sets(exp.config, exp.tokenizer, FLAGS.split, FLAGS.batches or exp.config.train.eval_batches)
    with jax.set_mesh(exp.mesh):
        metrics = task.evaluator(exp)(state.params, sets)
    print(json.dumps({"step": step, "split": FLAGS.split, "corpus": exp.config.data.corpus, **metrics}))


if __name__ == "__main__":
    cli.run(main)
