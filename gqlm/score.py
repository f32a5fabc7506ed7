"""Per-document loss of a checkpoint on a corpus split, for data selection (gqlm/data/selection.py).

    python -m gqlm.score --workdir CKPT --split train --out scores.parquet \
        [--config.data.corpus=text_files --config.data.glob='data/*.txt'] [--batches N]

Writes one row per document: `doc` (index in the split), `name`, `nats` (summed target
cross-entropy), `bytes` (UTF-8 bytes of the targets) and `tokens`, as Parquet (pyarrow, which
tensorflow-datasets already installs); the file's metadata records the corpus, split, tokenizer
and checkpoint so `selection` can check two score files describe the same documents.

Documents are scored as the runner evaluates them: the split's `[bos] doc [eos]` stream cut into
rows of data.seq_len (a document crossing a row boundary loses its context there), every target
scored exactly once and credited to the document it belongs to; the BOS of each document is not a
target. The data may come from another corpus than training (overrides), never another tokenizer.
Single-process (one host, any number of local devices).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import optax
from absl import flags
from flax import nnx

from gqlm import cli
from gqlm import mesh as mesh_lib
from gqlm.config import ConfigDict, ConfigError, apply_overrides
from gqlm.config.data import PREPARED
from gqlm.data import corpora, pipeline, synthetic
from gqlm.data.prepared import window_rows
from gqlm.data.score_files import write_scores
from gqlm.train.checkpoint import restore_trained
from gqlm.train.tasks.lm import LMTask

def checked_config(saved: ConfigDict, workdir: str, overrides: dict[str, str]) -> ConfigDict:
    """`saved` (the checkpoint's config) with data overrides; another tokenizer than the checkpoint's is an error."""
    config = apply_overrides(saved.copy_and_resolve_references(), overrides)
    if config.data.tokenizer != saved.data.tokenizer:
        raise ConfigError(f"data.tokenizer={config.data.tokenizer!r} differs from the tokenizer of the checkpoint in "
                          f"{workdir!r} ({saved.data.tokenizer!r}); scores are only defined under the model's own tokenizer")
    if synthetic.is_synthetic(config.data.corpus) or config.data.corpus == PREPARED:
        raise ConfigError(f"data.corpus={config.data.corpus!r}: gqlm.score scores the documents of a built-in "
                          "corpus (shakespeare, python_stdlib, text_files), which name their files")
    return config


def make_token_loss_fn(graphdef: nnx.GraphDef, token_bytes_V: jax.Array):
    """Per-token masked cross-entropy (nats) and target bytes, `[B, T]` each."""
    def token_loss(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        logits_BTV, _ = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
        ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
        return ce_BT * batch["loss_mask"], token_bytes_V[batch["targets"]] * batch["loss_mask"]
    return token_loss


def score_documents(exp, params: Any, split: str, max_batches: int | None = None) -> dict[str, np.ndarray]:
    """{nats, bytes, tokens} per document of `split` (call under `jax.set_mesh(exp.mesh)`)."""
    if jax.process_count() > 1:
        raise ConfigError("gqlm.score runs on one process (it reads every document on this host)")
    cfg = exp.config
    splits, _ = pipeline.open_split(cfg, exp.tokenizer, split)
    if len(splits) != 1:
        raise ConfigError(f"data.sources names {len(splits)} sources; gqlm.score scores one at a time")
    source, T, B = splits[0], cfg.data.seq_len, cfg.data.batch_size
    num_docs, num_rows = int(source.doc_base[-1]), source.rows(T, full=False)
    num_batches = -(-num_rows // B) if max_batches is None else min(max_batches, -(-num_rows // B))
    token_loss = jax.jit(make_token_loss_fn(exp.model.graphdef, exp.token_bytes))
    sharding = mesh_lib.batch_sharding(exp.mesh, cfg.mesh.rules)
    out = {k: np.zeros(num_docs) for k in ("nats", "bytes", "tokens")}
    for b in range(num_batches):
        rows = b * B + np.arange(B)
        batch, target_doc_BT = window_rows(source, np.where(rows < num_rows, rows, -1), T, exp.tokenizer.pad_id)
        ce_BT, bytes_BT = jax.device_get(token_loss(params, pipeline.to_global(batch, sharding)))
        mask = batch["loss_mask"] > 0
        doc = target_doc_BT[mask]
        out["nats"] += np.bincount(doc, np.asarray(ce_BT)[mask], num_docs)
        out["bytes"] += np.bincount(doc, np.asarray(bytes_BT)[mask], num_docs)
        out["tokens"] += np.bincount(doc, None, num_docs)
    return out


def define_flags() -> None:
    """Flags of the command (defined only when run, so importing this module defines none)."""
    cli.define_saved_run_flags("Training workdir whose checkpoint scores the documents.")
    flags.DEFINE_string("split", "train", "Corpus split to score: train or validation.")
    flags.DEFINE_string("out", None, "Output Parquet file.")
    flags.DEFINE_integer("batches", None, "Score only the first N batches (default: the whole split).")


def main(argv: list[str]) -> None:
    FLAGS = flags.FLAGS
    if not FLAGS.workdir or not FLAGS.out:
        cli.fail("--workdir and --out are required")
    if FLAGS.batches is not None and FLAGS.batches < 1:  # 0 or less would write a file of zero scores
        cli.fail(f"--batches={FLAGS.batches} must be >= 1 (leave it out to score the whole split)")
    if os.path.isdir(FLAGS.out):  # checked before the (long) scoring, not by pyarrow after it
        cli.fail(f"--out={FLAGS.out!r} is a directory; give the path of a Parquet file")
    exp, step, state = restore_trained(FLAGS.workdir, LMTask(), FLAGS.step,
                                       lambda saved: checked_config(saved, FLAGS.workdir, cli.overrides()))
    with jax.set_mesh(exp.mesh):
        scores = score_documents(exp, state.params, FLAGS.split, FLAGS.batches)
    docs = corpora.load_documents(exp.config.data, FLAGS.split)
    d = exp.config.data
    meta = {"workdir": os.path.abspath(FLAGS.workdir), "step": step, "split": FLAGS.split, "corpus": d.corpus,
            "glob": d.glob, "data_dir": d.data_dir, "tokenizer": d.tokenizer,
            "tokenizer_fingerprint": exp.tokenizer.fingerprint(),
            "corpus_fingerprint": corpora.corpus_fingerprint(d, FLAGS.split)}
    write_scores(FLAGS.out, scores, [docs.name(i) for i in range(len(docs))], meta)
    total = scores["nats"].sum() / max(scores["bytes"].sum(), 1) / np.log(2)
    print(json.dumps({"out": FLAGS.out, "documents": len(docs), "bpb": float(total), "step": step}))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
