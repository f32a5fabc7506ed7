"""python -m gqlm.sample --workdir DIR --prompt TEXT [--prompt TEXT ...] [--num_tokens 200]
[--temperature 0.8] [--top_k 40]

Temperature 0 is greedy decoding. Several `--prompt`s are continued together in one batch (KV
cache, models/decode.py) and printed one after another, separated by a `---` line.
"""

import functools
import math

import jax
from absl import flags

from gqlm import cli
from gqlm.config import apply_overrides
from gqlm.train.checkpoint import restore_trained
from gqlm.train.sampling import sample_texts
from gqlm.train.tasks.lm import LMTask

cli.define_saved_run_flags()
flags.DEFINE_multi_string("prompt", ["\n"], "Text to continue; repeat the flag for a batch of prompts.")
flags.DEFINE_integer("num_tokens", 200, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 40, "Sample among the k most likely tokens; 0 = all.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if not FLAGS.workdir:
        cli.fail("--workdir is required")
    if not 0 <= FLAGS.temperature < math.inf:  # also refuses nan, which would sample garbage
        cli.fail(f"--temperature={FLAGS.temperature} must be finite and >= 0 (0: greedy)")
    if FLAGS.top_k < 0 or FLAGS.num_tokens < 1:
        cli.fail("--top_k must be >= 0 and --num_tokens >= 1")
    edit = functools.partial(apply_overrides, overrides=cli.overrides())
    exp, _, state = restore_trained(FLAGS.workdir, LMTask(), FLAGS.step, edit)
    with jax.set_mesh(exp.mesh):
        texts = sample_texts(exp, state.params, FLAGS.prompt, FLAGS.num_tokens,
                             temperature=FLAGS.temperature, top_k=FLAGS.top_k, seed=FLAGS.seed)
    print("\n---\n".join(prompt + text for prompt, text in zip(FLAGS.prompt, texts)))


if __name__ == "__main__":
    cli.run(main)
