"""CoLoR-Filter data selection (Brandfonbrener et al. 2024) from two `gqlm.score` files.

score(x) = loss of x under a prior model - loss of x under the prior fine-tuned on target data
(conditional minus marginal log-likelihood): documents the target-tuned model finds much easier
than the prior are the ones that look like the target. Keep the top fraction, write them as a
directory of text files the runner trains on:

    python -m gqlm.score --workdir PRIOR  --split train --out prior.parquet  [--config.data...]
    python -m gqlm.score --workdir TARGET --split train --out target.parquet [--config.data...]
    python -m gqlm.data.selection --prior prior.parquet --target target.parquet --fraction 0.25 --out DIR
    python -m gqlm.train --config experiments/tiny_cpu.py --workdir W \
        --config.data.corpus=text_files --config.data.glob='DIR/*.txt'

Losses are compared per byte by default (documents differ in length; `--per_document` compares
summed nats, as the paper does for its fixed-length sequences). The runner's `text_files` corpus
holds out ~10% of the selected files as its validation split.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from absl import flags

from gqlm import cli
from gqlm.config import ConfigDict, ConfigError, base_config
from gqlm.data import corpora
from gqlm.data.score_files import read_scores
from gqlm.tokenizers.base import text_to_bytes


def color_filter_scores(prior_nats: np.ndarray, target_nats: np.ndarray, num_bytes: np.ndarray | None = None
                        ) -> np.ndarray:
    """prior loss - target loss per document (per byte when `num_bytes` is given)."""
    diff = np.asarray(prior_nats, np.float64) - np.asarray(target_nats, np.float64)
    return diff if num_bytes is None else diff / np.maximum(np.asarray(num_bytes, np.float64), 1.0)


def select_top(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices (ascending) of the ceil(fraction x n) highest scores; ties go to the lower index."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"--fraction={fraction} must lie in (0, 1]")
    scores = np.asarray(scores, np.float64)
    keep = int(np.ceil(fraction * len(scores)))
    order = np.lexsort((np.arange(len(scores)), -scores))  # by score descending, then index
    return np.sort(order[:keep])


def file_bytes(doc: str) -> bytes:
    """The bytes a corpus document was read from: corpora decode files with surrogateescape, so
    encoding the same way restores them exactly; other strings use the lossless gqlm mapping."""
    try:
        return doc.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text_to_bytes(doc)


def write_text_files(docs: Sequence[str], indices: np.ndarray, out_dir: str) -> list[str]:
    """Writes docs[i] for i in `indices` as OUT/NNNNNN.txt (raw bytes kept exactly); refuses a
    non-empty directory so an earlier selection is never mixed in."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"--out={out_dir!r} is not empty; choose a new directory")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out={out_dir!r} is a file; give a new directory")
    if len(indices) and int(np.max(indices)) >= len(docs):  # checked first: never a half-written selection
        raise ConfigError(f"the corpus now holds {len(docs)} documents but the score files rank document "
                          f"{int(np.max(indices))}; it changed since scoring: score it again")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in indices:
        path = os.path.join(out_dir, f"{int(i):06d}.txt")
        with open(path, "wb") as f:
            f.write(file_bytes(docs[int(i)]))
        paths.append(path)
    return paths


def check_same_documents(prior_meta: dict, target_meta: dict, n_prior: int, n_target: int) -> None:
    for key in ("corpus", "glob", "split", "corpus_fingerprint"):
        if prior_meta.get(key) != target_meta.get(key):
            raise ConfigError(f"the score files describe different documents: {key} {prior_meta.get(key)!r} "
                              f"(prior) vs {target_meta.get(key)!r} (target)")
    if n_prior != n_target:
        raise ConfigError(f"the score files hold {n_prior} (prior) and {n_target} (target) documents")


def check_same_rows(prior: dict, target: dict) -> None:
    """Row i of both files must be the same document: scores are compared row by row."""
    for key in ("doc", "name"):
        differ = np.flatnonzero(np.asarray(prior[key]) != np.asarray(target[key]))
        if len(differ):
            i = int(differ[0])
            raise ConfigError(f"the score files list their documents differently: row {i} is {key} "
                              f"{prior[key][i]!r} (prior) vs {target[key][i]!r} (target)")
    for name, columns in (("prior", prior), ("target", target)):
        if not np.all(np.isfinite(np.asarray(columns["nats"], np.float64))):
            raise ConfigError(f"the {name} score file holds non-finite losses (nats); score it again")


def data_config_of(meta: dict) -> ConfigDict:
    config = base_config()
    config.data.corpus, config.data.glob, config.data.data_dir = meta["corpus"], meta["glob"], meta["data_dir"]
    return config.data


def define_flags() -> None:
    """Flags of the command (defined only when run, so importing this module defines none)."""
    flags.DEFINE_string("prior", None, "gqlm.score file of the prior model.")
    flags.DEFINE_string("target", None, "gqlm.score file of the target-finetuned model (same documents).")
    flags.DEFINE_float("fraction", 0.25, "Fraction of documents to keep.")
    flags.DEFINE_string("out", None, "New directory for the selected documents (text files).")
    flags.DEFINE_bool("per_document", False, "Compare summed nats instead of nats per byte.")


def main(argv: list[str]) -> None:
    FLAGS = flags.FLAGS
    if not (FLAGS.prior and FLAGS.target and FLAGS.out):
        cli.fail("--prior, --target and --out are required")
    prior, prior_meta = read_scores(FLAGS.prior)
    target, target_meta = read_scores(FLAGS.target)
    check_same_documents(prior_meta, target_meta, len(prior["doc"]), len(target["doc"]))
    check_same_rows(prior, target)
    scores = color_filter_scores(prior["nats"], target["nats"], None if FLAGS.per_document else prior["bytes"])
    keep = select_top(scores, FLAGS.fraction)
    docs = corpora.load_documents(data_config_of(prior_meta), prior_meta["split"])
    write_text_files(docs, keep, FLAGS.out)
    with open(os.path.join(FLAGS.out, "selection.json"), "w") as f:  # not matched by DIR/*.txt
        json.dump({"prior": FLAGS.prior, "target": FLAGS.target, "fraction": FLAGS.fraction,
                   "selected": [str(prior["name"][i]) for i in keep]}, f, indent=1)
    print(json.dumps({"selected": len(keep), "of": len(scores), "out": FLAGS.out,
                      "glob": os.path.join(FLAGS.out, "*.txt")}))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
