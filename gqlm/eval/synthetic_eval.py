"""Per-length accuracy of a model on its synthetic task. B batch, T length, V vocab.

An example is correct when every answer token is the argmax of the teacher-forced logits (exact
match). Evaluation rows hold examples of one fixed length n, from a stream disjoint from training.

    python -m gqlm.eval.synthetic_eval --workdir DIR [--lengths 8,16,32] [--batches 2] [--out F.json]

Default lengths: min_len, max_len, 2 x max_len, 4 x max_len (train length L, test up to 4L).
Phonebook (memorization) evaluates its fixed book instead: length n = the entries with n-digit
numbers, each asked once, so accuracy is the fraction of the book memorized (default: every
length the book has).
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from gqlm import cli
from gqlm import mesh as mesh_lib
from gqlm.config import ConfigError, apply_overrides
from gqlm.data import synthetic
from gqlm.data.pipeline import process_slice
from gqlm.train.checkpoint import restore_trained
from gqlm.train.tasks.lm import LMTask


def exact_match(correct_BT: np.ndarray, loss_mask_BT: np.ndarray, segment_ids_BT: np.ndarray
                ) -> tuple[int, int]:
    """(correct examples, examples): an example is the answer tokens of one (row, segment)."""
    answer = loss_mask_BT > 0
    key_BT = np.arange(answer.shape[0])[:, None] * (segment_ids_BT.max() + 1) + segment_ids_BT
    examples = np.unique(key_BT[answer])
    wrong = np.unique(key_BT[answer & ~correct_BT.astype(bool)])
    return len(examples) - len(wrong), len(examples)


def argmax_correct(logits_BTV: jax.Array, targets_BT: jax.Array, vocab_limit: int = 0) -> jax.Array:
    """argmax == target, the argmax taken over the tokenizer's ids only (`vocab_limit` > 0): the
    embedding's padding past it is never decoded (models/decode.py masks it too), so a padded id
    that happens to hold the largest logit must not turn a right answer into a wrong one."""
    if 0 < vocab_limit < logits_BTV.shape[-1]:
        logits_BTV = logits_BTV[..., :vocab_limit]
    return jnp.argmax(logits_BTV, axis=-1) == targets_BT


def make_correct_fn(graphdef: nnx.GraphDef, vocab_limit: int = 0):
    def correct(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        logits_BTV, _ = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
        return argmax_correct(logits_BTV, batch["targets"], vocab_limit)
    return correct


def default_lengths(data_cfg) -> list[int]:
    spec = synthetic.Spec.from_config(data_cfg)
    if spec.task == "phonebook":
        return synthetic.lengths_of(spec)
    return sorted({spec.min_len, spec.max_len, 2 * spec.max_len, 4 * spec.max_len})


def score_batches(batches: Sequence[dict[str, np.ndarray]], correct_fn: Callable[[dict[str, np.ndarray]], np.ndarray]
                  ) -> dict[str, float]:
    """{accuracy, token_accuracy, examples} of host batches; `correct_fn(batch)` -> bool `[B, T]`
    (prediction == target at each position)."""
    hits = count = tokens_right = tokens = 0
    for batch in batches:
        correct_BT = np.asarray(correct_fn(batch)).astype(bool)
        h, c = exact_match(correct_BT, batch["loss_mask"], batch["segment_ids"])
        hits, count = hits + h, count + c
        tokens_right += int((correct_BT & (batch["loss_mask"] > 0)).sum())
        tokens += int((batch["loss_mask"] > 0).sum())
    return {"accuracy": hits / max(count, 1), "token_accuracy": tokens_right / max(tokens, 1), "examples": count}


def accuracy_by_length(exp, params: Any, lengths: Sequence[int], num_batches: int = 2) -> dict[int, dict[str, float]]:
    """{n: {accuracy, token_accuracy, examples}} for every length n (call under `jax.set_mesh`)."""
    cfg = exp.config
    if not synthetic.is_synthetic(cfg.data.corpus):
        raise ConfigError(f"data.corpus={cfg.data.corpus!r} is not a synthetic task (synthetic:TASK)")
    spec = synthetic.Spec.from_config(cfg.data)
    for n in lengths:  # every length checked before any is evaluated
        synthetic.check_length(spec, n)
    sharding = mesh_lib.batch_sharding(exp.mesh, cfg.mesh.rules)
    correct_fn = jax.jit(make_correct_fn(exp.model.graphdef, exp.tokenizer.vocab_size if exp.tokenizer else 0))
    lo, hi = process_slice(cfg.data.batch_size)

    def model_correct(batch: dict[str, np.ndarray]) -> np.ndarray:
        global_batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
        return np.asarray(jax.device_get(_local(correct_fn(params, global_batch))))

    return {n: score_batches(synthetic.length_batches(cfg, exp.tokenizer, n, num_batches, lo, hi), model_correct)
            for n in lengths}


def _local(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    if jax.process_count() == 1:
        return x
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows, seen = [], set()
    for s in shards:
        if (s.index[0].start or 0) not in seen:
            seen.add(s.index[0].start or 0)
            rows.append(np.asarray(s.data))
    return np.concatenate(rows)


# ----------------------------------------------------------------------------- command line

def define_flags() -> None:
    """Flags of the command (defined only when run, so importing this module defines none)."""
    cli.define_saved_run_flags("A training workdir of a synthetic-task run.")
    flags.DEFINE_list("lengths", [], "Input lengths to evaluate (default: min, max, 2max, 4max).")
    flags.DEFINE_integer("batches", 2, "Batches (of data.batch_size rows) per length.")
    flags.DEFINE_string("out", None, "Also write the results as JSON here.")


def main(argv: list[str]) -> None:
    FLAGS = flags.FLAGS
    if not FLAGS.workdir:
        cli.fail("--workdir is required")
    try:
        lengths = [int(n) for n in FLAGS.lengths]
    except ValueError:
        cli.fail(f"--lengths={','.join(FLAGS.lengths)} must be integers")
    edit = functools.partial(apply_overrides, overrides=cli.overrides())
    exp, step, state = restore_trained(FLAGS.workdir, LMTask(), FLAGS.step, edit)
    with jax.set_mesh(exp.mesh):
        results = accuracy_by_length(exp, state.params, lengths or default_lengths(exp.config.data), FLAGS.batches)
    if jax.process_index() == 0:
        out = {"step": step, "corpus": exp.config.data.corpus, "position": exp.config.model.position,
               "train_lengths": [exp.config.data.synthetic_min_len, exp.config.data.synthetic_max_len],
               "by_length": results}
        print(json.dumps(out))
        if FLAGS.out:
            with open(FLAGS.out, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
