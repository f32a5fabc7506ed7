"""python -m gqlm.eval --workdir DIR [--split validation] [--batches 16] [--config.a.b=v ...]

Bits per byte of a training workdir's latest checkpoint on a split of its corpus (or another
corpus via overrides, e.g. --config.data.corpus=python_stdlib).
"""

import functools
import json

import jax
from absl import flags

from gqlm import cli
from gqlm.config import apply_overrides
from gqlm.data.pipeline import make_eval_batches
from gqlm.train.checkpoint import restore_trained
from gqlm.train.evaluation import evaluate
from gqlm.train.experiment import jit_eval_step
from gqlm.train.tasks.lm import LMTask

cli.define_saved_run_flags()
flags.DEFINE_string("split", "validation", "Corpus split to evaluate.")
flags.DEFINE_integer("batches", 16, "Number of batches (of data.batch_size rows).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if not FLAGS.workdir:
        cli.fail("--workdir is required")
    edit = functools.partial(apply_overrides, overrides=cli.overrides())
    exp, step, state = restore_trained(FLAGS.workdir, LMTask(), FLAGS.step, edit)
    batches = make_eval_batches(exp.config, exp.tokenizer, FLAGS.split, FLAGS.batches)
    with jax.set_mesh(exp.mesh):
        metrics = evaluate(jit_eval_step(exp), state.params, batches, exp.mesh, exp.config.mesh.rules)
    print(json.dumps({"step": step, "split": FLAGS.split, "corpus": exp.config.data.corpus, **metrics}))


if __name__ == "__main__":
    cli.run(main)
