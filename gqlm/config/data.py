"""The `data` section (corpus, tokenizer, batch shape, synthetic tasks) and its checks.

The synthetic-task checks are also what gqlm/data/synthetic.py calls when it builds a task's
examples from values that did not come through a config.
"""

from __future__ import annotations

import ml_collections

from gqlm.config.errors import check, check_choice

BUILTIN_CORPORA = ("shakespeare", "python_stdlib", "text_files")  # gqlm/data/corpora.py
PREPARED = "prepared"  # data.sources: directories written by python -m gqlm.prepare (data/prepared.py)
SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_TASKS = ("copy", "recall", "parity", "addition", "phonebook")  # gqlm/data/synthetic.py
CORPORA = BUILTIN_CORPORA + (PREPARED,) + tuple(SYNTHETIC_PREFIX + t for t in SYNTHETIC_TASKS)
PHONEBOOK_NAMES = 26**4  # phonebook names are 4 lowercase letters (gqlm/data/synthetic.py)


def defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        corpus="shakespeare",  # CORPORA
        glob="",  # files for corpus=text_files
        sources="",  # corpus=prepared: "DIR_A=0.7,DIR_B=0.3" (weights are token shares; one DIR alone: weight 1)
        data_dir="",  # tfds data dir; "" = ~/.cache/gqlm/tfds
        tokenizer="byte",  # byte | bpe:DIR | gqvae:DIR
        seq_len=256,
        batch_size=32,  # global, across all processes
        worker_count=0,  # grain worker processes; 0 = in-process
        num_epochs=1000,  # the training stream repeats (reshuffled) this many times
        # Synthetic tasks (data.corpus="synthetic:TASK", gqlm/data/synthetic.py): train/validation
        # examples have lengths drawn uniformly from [min_len, max_len]; evaluation picks its own.
        synthetic_min_len=1,
        synthetic_max_len=8,
        synthetic_seed=0,  # the example stream and parity's secret positions
        synthetic_parity_k=3,  # k of k-sparse parity (secret positions < synthetic_min_len)
        synthetic_phonebook_size=2000,  # entries of phonebook's fixed book (4-letter names, seed-fixed)
    ))


def validate(d: ml_collections.ConfigDict, max_seq_len: int) -> None:
    check(d.seq_len > 0, f"data.seq_len={d.seq_len} must be positive")
    check(d.seq_len <= max_seq_len, f"data.seq_len={d.seq_len} exceeds model.max_seq_len={max_seq_len}")
    check(d.batch_size > 0, f"data.batch_size={d.batch_size} must be positive")
    check_corpus(d.corpus)
    check_glob(d)
    if d.corpus == PREPARED:
        parse_sources(d.sources)
    if d.corpus.startswith(SYNTHETIC_PREFIX):
        check(1 <= d.synthetic_min_len <= d.synthetic_max_len,
              f"data.synthetic_min_len={d.synthetic_min_len} and data.synthetic_max_len="
              f"{d.synthetic_max_len} must satisfy 1 <= min_len <= max_len")
        if d.corpus == SYNTHETIC_PREFIX + "parity":
            check_parity_k(d.synthetic_parity_k, d.synthetic_min_len)
        if d.corpus == SYNTHETIC_PREFIX + "phonebook":
            check_phonebook_size(d.synthetic_phonebook_size)


def check_corpus(corpus: str) -> None:
    check_choice("data.corpus", corpus, CORPORA)


def check_glob(d: ml_collections.ConfigDict) -> None:
    check(d.corpus != "text_files" or bool(d.glob), "data.glob must be set when data.corpus='text_files'")


def check_parity_k(k: int, min_len: int) -> None:
    check(1 <= k <= min_len, f"data.synthetic_parity_k={k} must lie in [1, data.synthetic_min_len={min_len}]")


def check_phonebook_size(size: int) -> None:
    check(1 <= size <= PHONEBOOK_NAMES,
          f"data.synthetic_phonebook_size={size} must lie in [1, {PHONEBOOK_NAMES}] (the distinct 4-letter names)")


def parse_sources(text: str) -> list[tuple[str, float]]:
    """`DIR[=weight],...` -> [(DIR, weight)], weights normalised to sum 1."""
    check(bool(text.strip()), "data.sources must name at least one prepared directory when data.corpus='prepared'")
    out = []
    for item in text.split(","):
        path, sep, weight = item.strip().rpartition("=") if "=" in item else (item.strip(), "", "1")
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")
        check(bool(path) and value > 0 and value < float("inf"),
              f"data.sources entry {item.strip()!r} must be DIR or DIR=WEIGHT with a positive number as WEIGHT")
        # ArrayRecord's reader opens local files only: a bucket is read through a mount.
        check("://" not in path, f"data.sources entry {path!r}: training reads prepared shards from a local "
              "path; mount the bucket (gcsfuse, as on TPU VMs) and name the mounted directory")
        out.append((path, value))
    total = sum(w for _, w in out)
    return [(p, w / total) for p, w in out]
